"""The on-disk layout of the memmap feature store: storage dtypes, row ranges, atomic files.

A store directory::

    manifest.json          settings + fingerprint, arrays (name, shape, dtype)
    <array>.npy            one ``.npy`` file per array, rows = training samples
    _checksum_<array>.npy  (n,) uint64: checksum of every row as written
    _data_hash.npy         (n,) uint64: fingerprint of every training sample
    done-r<rank>.json      row ranges already written and the arrays, per unit
                           (e.g. a checkpoint)

Pure helpers of :mod:`dattri.algorithm.store.memmap_store`: the storage dtypes (numpy
has no bfloat16: it is stored as raw 16-bit words), the row-range arithmetic of the
per-rank progress files, and an atomic JSON write (a crash never leaves half a file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "STORE_DTYPES",
    "merge_ranges",
    "numpy_dtype",
    "parse_store_dtype",
    "range_difference",
    "range_mask",
    "subtract_rows",
    "write_json_atomic",
]

STORE_DTYPES = {
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),  # numpy has no bfloat16: stored as raw bits
    "float32": (torch.float32, np.float32),
    "float64": (torch.float64, np.float64),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype an array of storage dtype ``name`` is written with."""
    return np.dtype(np.uint64 if name == "uint64" else STORE_DTYPES[name][1])


def parse_store_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> str:
    """Name of a storage dtype (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``).

    Args:
        dtype: a torch dtype, its name, or None for ``default``.
        default: dtype used when ``dtype`` is None.

    Raises:
        ValueError: for any other dtype.
    """
    if dtype is None:
        dtype = default
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype
    if name not in STORE_DTYPES:
        msg = (
            f"store_dtype must be one of {list(STORE_DTYPES)} (or the torch dtype), got {dtype!r}."
        )
        raise ValueError(msg)
    return name


def subtract_rows(ranges: list[list[int]], rows: Iterable[int]) -> list[list[int]]:
    """``ranges`` without the given rows."""
    drop = sorted(set(int(r) for r in rows))
    out = []
    for a, b in ranges:
        cuts = [r for r in drop if a <= r < b]
        start = a
        for r in cuts:
            if r > start:
                out.append([start, r])
            start = r + 1
        if start < b:
            out.append([start, b])
    return out


def range_difference(ranges: list[list[int]], minus: list[list[int]]) -> list[list[int]]:
    """Merged ``ranges`` without the merged ranges ``minus``."""
    out = []
    for a, b in ranges:
        start = a
        for c, d in minus:
            if d <= start or c >= b:
                continue
            if c > start:
                out.append([start, c])
            start = max(start, d)
        if start < b:
            out.append([start, b])
    return out


def range_mask(ranges: Iterable[Sequence[int]], start: int, stop: int) -> np.ndarray:
    """Boolean ``(stop - start,)``: rows of ``[start, stop)`` inside ``ranges``."""
    mask = np.zeros(stop - start, dtype=bool)
    for a, b in ranges:
        lo, hi = max(a, start), min(b, stop)
        if hi > lo:
            mask[lo - start : hi - start] = True
    return mask


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sorted union of half-open ``[start, stop)`` ranges."""
    out: list[list[int]] = []
    for a, b in sorted((int(r[0]), int(r[1])) for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
