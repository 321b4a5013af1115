"""Read pickles of plain data (lists, dicts, strings, numbers) without running code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global, so only built-in containers and scalars can load."""

    def find_class(self, module: str, name: str) -> Any:
        msg = (
            f"Refusing to load {module}.{name}: this file must hold plain data "
            "(lists, dicts, strings, numbers) only."
        )
        raise pickle.UnpicklingError(msg)


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """Load a pickle of plain data.

    Args:
        path: The pickle file.

    Returns:
        The unpickled object.

    Raises:
        pickle.UnpicklingError: If the pickle references any class or function.
    """
    with Path(path).open("rb") as fh:
        return _PlainDataUnpickler(fh).load()
