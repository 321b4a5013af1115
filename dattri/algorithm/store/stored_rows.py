"""Tensor-like, block-by-block read access to one array of a memmap feature store."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dattri.algorithm.store.memmap_store import MemmapFeatureStore

__all__ = ["StoredRows"]


class StoredRows:
    """Read-only, tensor-like view of one store array, read block by block.

    Supports ``len``, ``.shape``, ``.dtype``, ``.device`` and slicing with a step-1
    slice (returns a tensor); :meth:`materialize` loads everything.

    Args:
        store: the store.
        name: the array.
        dtype: compute dtype of returned rows.
        device: device of returned rows.
    """

    def __init__(
        self, store: MemmapFeatureStore, name: str, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.store = store
        self.name = name
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> torch.Size:
        """``(n_samples, ...)``."""
        return torch.Size(self.store.shape(self.name))

    def __len__(self) -> int:
        return self.store.n_samples

    def __getitem__(self, rows: slice) -> Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            msg = "StoredRows supports step-1 slices only (e.g. rows[100:200])."
            raise TypeError(msg)
        return self.store.read(self.name, rows, self.dtype, self.device)

    def materialize(self) -> Tensor:
        """All rows as one tensor."""
        return self[0 : len(self)]
