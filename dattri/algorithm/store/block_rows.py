"""Storage of compressed gradients and preconditioners (offload none / cpu / disk).

* ``"none"``: everything stays on the compute device;
* ``"cpu"``: rows live in CPU memory (pinned when the device is CUDA) and are moved
  to the device block by block;
* ``"disk"``: rows are appended to raw binary files in ``cache_dir`` and read back
  through :class:`numpy.memmap`; preconditioners are ``.npy`` files. Nothing is ever
  written outside ``cache_dir``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["OFFLOAD_MODES", "MatrixStore", "RowStore", "write_metadata"]

OFFLOAD_MODES = ("none", "cpu", "disk")

#: torch dtype -> (numpy dtype of the file, torch dtype viewed as that numpy dtype)
_DISK_DTYPES = {
    torch.float64: (np.float64, torch.float64),
    torch.float32: (np.float32, torch.float32),
    torch.float16: (np.float16, torch.float16),
    torch.bfloat16: (np.int16, torch.int16),
}


def _disk_dtype(dtype: torch.dtype) -> tuple[Any, torch.dtype]:
    """Numpy file dtype for a torch dtype.

    Args:
        dtype: torch dtype of the rows.

    Returns:
        ``(numpy dtype, torch view dtype)``.

    Raises:
        TypeError: If the dtype cannot be stored.
    """
    if dtype not in _DISK_DTYPES:
        msg = f"offload='disk' supports float64/32/16 and bfloat16 gradients, got {dtype}."
        raise TypeError(msg)
    return _DISK_DTYPES[dtype]


class RowStore:
    """Append-only ``(n, dim)`` matrix stored according to an offload mode.

    Args:
        offload: ``"none"``, ``"cpu"`` or ``"disk"``.
        device: compute device (rows are returned there).
        path: file for ``"disk"`` (truncated on creation), else ignored.
    """

    def __init__(self, offload: str, device: torch.device, path: Path | None = None) -> None:
        self.offload = offload
        self.device = device
        self.path = path
        self.n = 0
        self.dim: int | None = None
        self.dtype: torch.dtype | None = None
        self._parts: list[Tensor] = []
        self._data: Tensor | np.memmap | None = None
        self._fh: Any = None
        if offload == "disk":
            if path is None:
                msg = "RowStore needs a path for offload='disk'."
                raise ValueError(msg)
            # written under a temporary name and renamed by finalize(), so that a
            # memory map of a previous file at ``path`` stays valid
            self._tmp = path.with_name(path.name + ".partial")
            self._fh = self._tmp.open("wb")

    def append(self, rows: Tensor) -> None:
        """Append a ``(B, dim)`` block.

        Args:
            rows: the rows.

        Raises:
            RuntimeError: If the store was already finalised.
            ValueError: If the width or dtype changes.
        """
        if self._data is not None:
            msg = "RowStore is finalised; create a new store to write again."
            raise RuntimeError(msg)
        if self.dim is None:
            self.dim, self.dtype = int(rows.shape[1]), rows.dtype
        elif rows.shape[1] != self.dim or rows.dtype != self.dtype:
            msg = (
                f"RowStore rows changed from (*, {self.dim}) {self.dtype} to "
                f"{tuple(rows.shape)} {rows.dtype}."
            )
            raise ValueError(msg)
        rows = rows.detach()
        if self.offload == "disk":
            _, view = _disk_dtype(rows.dtype)
            self._fh.write(rows.to("cpu").contiguous().view(view).numpy().tobytes())
        elif self.offload == "cpu":
            self._parts.append(rows.to("cpu"))
        else:
            self._parts.append(rows.to(self.device))
        self.n += int(rows.shape[0])

    def finalize(self) -> None:
        """Finish writing; the rows become readable."""
        if self._data is not None:
            return
        if self.dim is None:
            msg = "RowStore is empty: no rows were appended."
            raise ValueError(msg)
        if self.offload == "disk":
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self.path)
            np_dtype, _ = _disk_dtype(self.dtype)
            self._data = np.memmap(self.path, dtype=np_dtype, mode="r", shape=(self.n, self.dim))
            return
        data = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
        self._parts = []
        if self.offload == "cpu" and self.device.type == "cuda" and torch.cuda.is_available():
            data = data.pin_memory()
        self._data = data

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` on the compute device.

        Args:
            start: first row.
            stop: one past the last row.

        Returns:
            ``(stop - start, dim)`` tensor.
        """
        if self._data is None:
            msg = "RowStore is not finalised yet."
            raise RuntimeError(msg)
        if isinstance(self._data, np.memmap):
            block = torch.from_numpy(np.array(self._data[start:stop]))
            block = block.view(self.dtype)
        else:
            block = self._data[start:stop]
        return block.to(self.device, non_blocking=True)

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        """Iterate over row blocks.

        Args:
            block_rows: rows per block.

        Yields:
            ``(start, rows on device)``.
        """
        for start in range(0, self.n, max(1, block_rows)):
            yield start, self.rows(start, min(start + block_rows, self.n))

    def close(self) -> None:
        """Release the file handle / memory map."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._data = None
        self._parts = []


class MatrixStore:
    """Indexed square matrices (per-layer preconditioners) under an offload mode.

    Args:
        offload: ``"none"``, ``"cpu"`` or ``"disk"``.
        device: compute device.
        directory: folder of the ``.npy`` files for ``"disk"``.
        prefix: file name prefix.
    """

    def __init__(
        self, offload: str, device: torch.device, directory: Path | None, prefix: str
    ) -> None:
        self.offload = offload
        self.device = device
        self.directory = directory
        self.prefix = prefix
        self._items: dict[int, Tensor | Path | None] = {}

    def put(self, idx: int, mat: Tensor | None) -> None:
        """Store matrix ``idx`` (None means identity / not needed).

        Args:
            idx: index.
            mat: the matrix or None.
        """
        if mat is None:
            self._items[idx] = None
        elif self.offload == "disk":
            path = self.directory / f"{self.prefix}_{idx}.npy"
            np.save(path, mat.detach().to("cpu").numpy())
            self._items[idx] = path
        elif self.offload == "cpu":
            self._items[idx] = mat.detach().to("cpu")
        else:
            self._items[idx] = mat.detach().to(self.device)

    def get(self, idx: int) -> Tensor | None:
        """Matrix ``idx`` on the compute device (None if stored as None).

        Args:
            idx: index.

        Returns:
            The matrix or None.
        """
        item = self._items[idx]
        if isinstance(item, Path):
            return torch.from_numpy(np.load(item)).to(self.device)
        if item is None:
            return None
        return item.to(self.device)

    def __contains__(self, idx: int) -> bool:
        return idx in self._items


def write_metadata(cache_dir: Path, info: dict[str, Any]) -> Path:
    """Write a small JSON file describing the cache layout (never read back implicitly).

    Args:
        cache_dir: the cache folder.
        info: JSON-serialisable layout description.

    Returns:
        The file path.
    """
    path = cache_dir / "block_projected_if_metadata.json"
    path.write_text(json.dumps(info, indent=2, sort_keys=True))
    return path
