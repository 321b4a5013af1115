"""Import an optional dependency or say how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_optional(module: str, hint: str) -> ModuleType:
    """Import ``module``; if it is missing, raise an ``ImportError`` carrying ``hint``.

    Args:
        module: Dotted module name, e.g. ``"PIL.Image"``.
        hint: What needs the module and how to install it (the error message).

    Returns:
        The imported module.

    Raises:
        ImportError: With ``hint`` as its message, if ``module`` cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(hint) from exc
