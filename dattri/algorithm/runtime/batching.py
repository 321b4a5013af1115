"""Batch and loader helpers shared by the attributors.

Batches may be a tensor, a tuple/list of tensors (``(x, y)``) or a dict of tensors
(Hugging Face style ``{"input_ids": ..., "labels": ...}``); every tensor has the
batch dimension first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

__all__ = [
    "ReusableBuffer",
    "batch_plan",
    "batch_size_of",
    "check_loader",
    "gather_fields",
    "iter_batches",
    "iterate",
    "move_to_device",
    "slice_batch",
    "unsqueeze_batch",
]


def move_to_device(batch: Any, device: str | torch.device) -> Any:
    """Move every tensor of a batch to ``device`` (tuple/list/dict structure kept).

    Args:
        batch: a tensor, a tuple/list or a dict of tensors (non-tensors are kept).
        device: target device.

    Returns:
        The batch on ``device``.
    """
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_to_device(v, device) for v in batch)
    return batch


def unsqueeze_batch(batch: Any, dim: int = 0) -> Any:
    """Insert a dimension of size 1 in every tensor of a batch (upstream IF convention).

    Args:
        batch: a tensor, tuple/list or dict of tensors.
        dim: where to insert the dimension.

    Returns:
        The batch with tensors of shape ``(1, B, ...)`` for ``dim=0``.
    """
    if isinstance(batch, Tensor):
        return batch.unsqueeze(dim)
    if isinstance(batch, Mapping):
        return {k: unsqueeze_batch(v, dim) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return tuple(unsqueeze_batch(v, dim) for v in batch)
    msg = f"Batches must be tensors, tuples/lists or dicts of tensors, got {type(batch)}."
    raise TypeError(msg)


def batch_size_of(batch: Any) -> int:
    """Return the leading dimension of the first tensor in a batch.

    Raises:
        TypeError: if the batch holds no tensor.
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, Iterable):
        for v in values:
            if isinstance(v, Tensor):
                return int(v.shape[0])
    msg = (
        "Could not find a tensor in the batch to read its size; batches must be tensors, "
        f"tuples/lists or dicts of tensors, got {type(batch).__name__}."
    )
    raise TypeError(msg)


def check_loader(loader: Any, name: str, order_matters: bool = True) -> None:
    """Validate a data loader argument.

    Args:
        loader: the loader (any iterable of batches; a ``DataLoader`` is checked more).
        name: the argument name, used in messages.
        order_matters: warn when a ``DataLoader`` shuffles, since score rows/columns
            follow the loader's iteration order.

    Raises:
        TypeError: if ``loader`` is not iterable.
        ValueError: if the loader is empty.
    """
    if loader is None or not isinstance(loader, Iterable):
        msg = f"{name} must be a DataLoader (or an iterable of batches), got {type(loader)}."
        raise TypeError(msg)
    if isinstance(loader, DataLoader):
        if len(loader.dataset) == 0 or (hasattr(loader, "__len__") and len(loader) == 0):
            msg = f"{name} is empty: it yields no batch."
            raise ValueError(msg)
        if order_matters and isinstance(loader.sampler, RandomSampler):
            warnings.warn(
                f"{name} shuffles (RandomSampler): score rows/columns follow the loader's "
                "random order, not the dataset order. Use shuffle=False (or a "
                "SequentialSampler / SubsetSampler) to get scores in dataset order.",
                UserWarning,
                stacklevel=3,
            )


def iterate(
    loader: Iterable,
    desc: str,
    verbose: bool,
    total: int | None = None,
) -> Iterator[Any]:
    """Iterate over a loader with an optional tqdm progress bar.

    Args:
        loader: the batches.
        desc: progress-bar description.
        verbose: show the bar.
        total: number of batches if ``len(loader)`` is not available.

    Yields:
        The batches (a warning names the first sample with a huge finite input,
        see :func:`dattri.algorithm.runtime.validation.scan_huge_values`).
    """
    from dattri.algorithm.runtime.validation import batch_rows, scan_huge_values

    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    rows, warned = 0, False
    for item in tqdm(loader, desc=desc, total=total, disable=not verbose, leave=False):
        if not warned:  # one cheap max(|x|) per batch until a huge input is reported
            warned = scan_huge_values(item, desc, rows)
            rows += batch_rows(item)
        yield item


class ReusableBuffer:
    """One scratch ``(rows, cols)`` tensor reused across the batches of a loop.

    On CPU a fresh multi-megabyte tensor per batch costs a page fault per 4 KiB on
    first touch (about as long as filling it); reusing one avoids that. The buffer
    only exists inside :meth:`active` (freed when the outermost block exits), so
    nothing stays allocated between calls. A tensor returned by :meth:`get` is
    overwritten by the next :meth:`get`: use it only for values consumed before then.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._buffer: Tensor | None = None

    @property
    def is_active(self) -> bool:
        """Whether a :meth:`active` block is open."""
        return self._depth > 0

    @contextmanager
    def active(self) -> Iterator[None]:
        """Enable reuse within the block."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._buffer = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """A contiguous ``(rows, cols)`` view of the buffer, or None outside :meth:`active`."""
        if self._depth == 0:
            return None
        buf = self._buffer
        fits = buf is not None and buf.shape[0] >= rows and buf.shape[1] == cols
        if not fits or buf.dtype != dtype or buf.device != torch.device(device):
            self._buffer = None  # free the old one before allocating
            buf = self._buffer = torch.empty(rows, cols, dtype=dtype, device=device)
        return buf[:rows]


def slice_batch(batch: Any, rows: slice) -> Any:
    """Rows ``rows`` of every tensor of a batch (tuple/list/dict structure kept)."""
    if isinstance(batch, Tensor):
        return batch[rows]
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, rows) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, rows) for v in batch)
    return batch


def batch_plan(loader: Iterable) -> list[int]:
    """Size of every batch of ``loader``, in order.

    For a map-style ``DataLoader`` the sizes come from its batch sampler (no data is
    loaded); any other iterable is iterated once.

    Raises:
        ValueError: if the loader shuffles (rows would not match between passes).
    """
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, RandomSampler):
            msg = (
                "A feature store / torch.distributed sharding needs a loader in a fixed "
                "order: use shuffle=False."
            )
            raise ValueError(msg)
        if loader.batch_sampler is not None and hasattr(loader.dataset, "__len__"):
            return [len(b) for b in loader.batch_sampler]
    return [batch_size_of(b) for b in loader]


def iter_batches(loader: Iterable, selected: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """Yield ``(batch_index, batch)`` for the sorted batch indices ``selected``.

    A map-style ``DataLoader`` loads only the selected batches (same dataset, collate
    function and workers); any other iterable is iterated and filtered.
    """
    wanted = list(selected)
    if not wanted:
        return
    if (
        isinstance(loader, DataLoader)
        and loader.batch_sampler is not None
        and hasattr(loader.dataset, "__len__")
    ):
        index_lists = list(loader.batch_sampler)
        sub = DataLoader(
            loader.dataset,
            batch_sampler=[index_lists[i] for i in wanted],
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        yield from zip(wanted, sub)
        return
    keep = set(wanted)
    last = wanted[-1]
    for i, batch in enumerate(loader):
        if i in keep:
            yield i, batch
        if i >= last:
            return


def gather_fields(loader: Iterable, name: str) -> tuple[Tensor, ...]:
    """Concatenate a loader's ``(x, y, ...)`` batches (or a tensor tuple) field-wise.

    Args:
        loader: ``(inputs, targets, ...)`` batches, or one tuple of tensors.
        name: the argument's name, for error messages.

    Returns:
        One tensor per field, ``(n, ...)``.

    Raises:
        TypeError: on batches that are not tuples/lists of tensors.
        ValueError: on an empty loader or batches with differing fields.
    """
    if isinstance(loader, tuple | list) and loader and all(isinstance(t, Tensor) for t in loader):
        fields = [list(loader)]
    else:
        check_loader(loader, name)
        fields = []
        for batch in loader:
            if isinstance(batch, Tensor | Mapping):
                msg = (
                    f"{name}: needs (inputs, targets) batches (a tuple or "
                    f"list of tensors), got {type(batch).__name__}."
                )
                raise TypeError(msg)
            fields.append(list(batch))
    if not fields:
        msg = f"{name} is empty: it yields no batch."
        raise ValueError(msg)
    width = len(fields[0])
    if width < 2 or any(len(f) != width for f in fields):
        msg = f"{name}: every batch must be (inputs, targets, ...) with the same fields."
        raise ValueError(msg)
    return tuple(torch.cat([torch.as_tensor(f[i]) for f in fields]) for i in range(width))
