"""Integrity checks of the on-disk feature store: data fingerprints, row checksums, files.

* :func:`sample_hashes`: a 64-bit fingerprint (SHA-256, truncated) of every sample of a batch (all
  its tensors' bytes, shapes and dtypes), so that a store reused on changed data is
  caught at the first changed sample, whatever the batch size.
* :func:`row_checksums`: a 64-bit checksum (SHA-256, truncated) of every stored row, computed from
  the bytes as written, so that a row zeroed or overwritten later is caught on reuse.
* :func:`check_npy_file`, :func:`load_json`: a truncated or damaged ``.npy`` /
  JSON file raises a ``ValueError`` naming the file and the fix instead of a bare
  numpy/JSON error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "StoreDamagedError",
    "check_npy_file",
    "checkpoint_fingerprint",
    "damaged",
    "format_rows",
    "load_json",
    "row_checksums",
    "sample_hashes",
]

_DIGEST = 8  # bytes kept of each SHA-256 digest: one uint64 per sample / row
#: SHA-256 rather than BLAKE2b: with the SHA extensions of current x86/ARM CPUs
#: OpenSSL's SHA-256 is about twice as fast as hashlib's BLAKE2b (measured in
#: benchmarks/bench_store_integrity.py); both release the GIL on large buffers.
_hash = hashlib.sha256


class StoreDamagedError(ValueError):
    """A file of a feature store is missing, truncated or not what the manifest says."""


def damaged(path: Path, what: str) -> StoreDamagedError:
    """The error for a damaged store file: names the file and the fix.

    Args:
        path: the damaged file.
        what: what is wrong with it (one clause).

    Returns:
        The error (to raise).
    """
    folder = path.parent
    return StoreDamagedError(
        f"The feature store file {str(path)!r} is damaged: {what}. Delete the folder "
        f"{str(folder)!r} to recompute the features (or pass a new cache_dir)."
    )


def load_json(path: Path) -> Any:
    """Read a JSON file of the store.

    Raises:
        StoreDamagedError: if the file is not valid JSON (e.g. truncated).
    """
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise damaged(path, f"it is not valid JSON ({err}); it may be truncated") from err


def check_npy_file(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Check an ``.npy`` file's header and size against the manifest.

    Args:
        path: the file.
        shape: expected shape.
        dtype: expected numpy dtype.

    Returns:
        The byte offset of the data.

    Raises:
        StoreDamagedError: if the header is unreadable, describes another array, or
            the file is shorter or longer than the header says.
    """
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(fh)
            else:
                header = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except (ValueError, OSError, SyntaxError) as err:
        raise damaged(path, f"its .npy header cannot be read ({err}); it may be truncated") from err
    got_shape, fortran, got_dtype = header
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype) or fortran:
        what = f"it holds a {got_dtype} array of shape {tuple(got_shape)}"
        raise damaged(path, f"{what}, the manifest says {np.dtype(dtype)} {tuple(shape)}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        raise damaged(path, f"it is {kind} ({size} bytes, expected {expected})")
    return offset


def _digests(hashers: list[Any]) -> np.ndarray:
    return np.frombuffer(b"".join(h.digest()[:_DIGEST] for h in hashers), dtype="<u8").copy()


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """64-bit checksum (truncated SHA-256) of every row's bytes.

    Args:
        rows: ``(R, ...)`` C-contiguous array (any dtype).

    Returns:
        ``(R,)`` ``uint64``.
    """
    flat = np.ascontiguousarray(rows).reshape(rows.shape[0], -1).view(np.uint8)
    return np.frombuffer(
        b"".join(_hash(row).digest()[:_DIGEST] for row in flat),
        dtype="<u8",
    ).copy()


def _leaves(batch: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """``(path, leaf)`` of a batch in a fixed order (dict keys sorted)."""
    if isinstance(batch, Mapping):
        for key in sorted(batch, key=str):
            yield from _leaves(batch[key], f"{path}/{key}")
    elif isinstance(batch, (list, tuple)) and not _is_value_list(batch):
        for i, item in enumerate(batch):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield path, batch


def _is_value_list(item: Any) -> bool:
    """A list of plain values (e.g. collated strings), hashed per sample."""
    return (
        isinstance(item, (list, tuple))
        and len(item) > 0
        and all(isinstance(v, (str, bytes, int, float, bool)) for v in item)
    )


def sample_hashes(batch: Any, size: int) -> np.ndarray:
    """64-bit fingerprint (truncated SHA-256) of every sample of a batch.

    Each sample's fingerprint covers, for every tensor (or numpy array) of the batch
    whose first dimension is ``size``, the sample's row bytes with the tensor's place
    in the batch, trailing shape and dtype; other tensors and values are hashed into
    every sample's fingerprint. The batch size does not enter, so fingerprints can be
    compared between loaders of different batch sizes.

    Args:
        batch: a tensor, tuple/list or dict of tensors (as yielded by the loader).
        size: the batch size ``B``.

    Returns:
        ``(B,)`` ``uint64``.
    """
    hashers = [_hash() for _ in range(size)]
    for path, leaf in _leaves(batch):
        if isinstance(leaf, Tensor):
            leaf = leaf.detach().cpu()
            if leaf.layout != torch.strided:
                leaf = leaf.to_dense()
            if leaf.dtype == torch.bfloat16:
                leaf = leaf.view(torch.int16)
            leaf = leaf.resolve_conj().resolve_neg().contiguous().numpy()
        if isinstance(leaf, np.ndarray) and leaf.ndim > 0 and leaf.shape[0] == size:
            tag = f"{path}:{leaf.shape[1:]}:{leaf.dtype};".encode()
            flat = np.ascontiguousarray(leaf).reshape(size, -1).view(np.uint8)
            for h, row in zip(hashers, flat):
                h.update(tag)
                h.update(row)
        elif _is_value_list(leaf) and len(leaf) == size:
            for h, value in zip(hashers, leaf):
                h.update(f"{path}:{type(value).__name__}:{value!r};".encode())
        else:
            if isinstance(leaf, np.ndarray):
                common = f"{path}:{leaf.shape}:{leaf.dtype};".encode() + leaf.tobytes()
            else:
                common = f"{path}:{leaf!r};".encode()
            for h in hashers:
                h.update(common)
    return _digests(hashers)


def format_rows(rows: Iterable[int], limit: int = 6) -> str:
    """``"3, 7-9, 12"``: sorted row indices as ranges (at most ``limit`` ranges shown)."""
    ranges: list[list[int]] = []
    for r in sorted(set(int(r) for r in rows)):
        if ranges and r == ranges[-1][1] + 1:
            ranges[-1][1] = r
        else:
            ranges.append([r, r])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more ranges)")
    return ", ".join(parts)


def checkpoint_fingerprint(task: Any, ckpt_indices: Sequence[int] | None = None) -> str:
    """SHA-256 of the trainable parameters (names, shapes, dtypes, values) of checkpoints.

    Args:
        task: an :class:`~dattri.task.AttributionTask`.
        ckpt_indices: checkpoints to hash (default: all).

    Returns:
        A hex digest; equal checkpoints give equal digests in any process.
    """
    digest = hashlib.sha256()
    indices = range(len(task.get_checkpoints())) if ckpt_indices is None else ckpt_indices
    for k in indices:
        for name, value in sorted(task.get_param_dict(k).items()):
            t = value.detach().cpu().contiguous()
            digest.update(f"{k}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
