"""Training rows kept in host memory and handed to the compute device block by block.

LoGra's ``offload`` modes are modes of the shared stores: ``"none"`` keeps the rows of
:mod:`~dattri.algorithm.store.in_memory` on the device, ``"cpu"`` wraps them in
:class:`HostRows` (CPU memory, pinned for a CUDA device, moved to the device one row
block at a time) and ``"disk"`` is the memmap store of
:mod:`~dattri.algorithm.store.memmap_store` in ``cache_dir``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OFFLOAD_MODES", "HostRows"]

#: the accepted ``offload`` arguments.
OFFLOAD_MODES = ("none", "cpu", "disk")


class HostRows:
    """Read-only, tensor-like ``(n, d)`` rows in CPU memory, returned on ``device``.

    Supports ``len``, ``.shape``, ``.dtype``, ``.device`` (the compute device) and
    step-1 slicing (like :class:`~dattri.algorithm.store.memmap_store.StoredRows`);
    :meth:`materialize` returns every row on ``device``.

    Args:
        rows: the ``(n, d)`` rows (moved to the CPU).
        device: device of returned rows.
    """

    def __init__(self, rows: Tensor, device: torch.device) -> None:
        self.device = torch.device(device)
        rows = rows.detach().to("cpu")
        if self.device.type == "cuda" and torch.cuda.is_available():
            rows = rows.pin_memory()
        self.rows = rows
        self.dtype = rows.dtype

    @property
    def shape(self) -> torch.Size:
        """``(n, d)``."""
        return self.rows.shape

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, rows: slice) -> Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            msg = "HostRows supports step-1 slices only (e.g. rows[100:200])."
            raise TypeError(msg)
        return self.rows[rows].to(self.device, non_blocking=True)

    def materialize(self) -> Tensor:
        """All rows on ``device``."""
        return self[0 : len(self)]
