"""Batch helpers shared by the per-sample gradient functions.

Batches are a Tensor or (nested) tuple/list/dict of Tensors sharing a leading
batch dimension ``B``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "LossPass",
    "NonFiniteGradientError",
    "batch_size",
    "check_names",
    "chunk_bounds",
    "first_sample",
    "nonfinite_rows",
    "preparer",
    "raise_nonfinite",
    "tree_map",
    "valid_list",
]


def tree_map(fn: Callable[[Tensor], Any], data: Any) -> Any:
    """Apply ``fn`` to every tensor of a (nested) tuple/list/dict batch.

    Args:
        fn: Function on tensors.
        data: Tensor, or tuple/list/dict (possibly nested) of tensors.

    Returns:
        The same structure with ``fn`` applied to each tensor.

    Raises:
        TypeError: If a leaf is not a tensor.
    """
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: tree_map(fn, v) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(tree_map(fn, v) for v in data))
    if isinstance(data, (tuple, list)):
        return type(data)(tree_map(fn, v) for v in data)
    msg = (
        "data must be a Tensor or a tuple/list/dict of Tensors with a leading batch "
        f"dimension; found a leaf of type {type(data).__name__}."
    )
    raise TypeError(msg)


def batch_size(data: Any) -> int:
    """Common leading dimension of all tensors of a batch.

    Args:
        data: Tensor or tuple/list/dict of tensors.

    Returns:
        The batch size ``B`` (> 0).

    Raises:
        ValueError: If tensors disagree on ``B``, are 0-d, or the batch is empty.
    """
    sizes: list[int] = []

    def record(t: Tensor) -> Tensor:
        if t.ndim == 0:
            msg = "data tensors need a leading batch dimension; got a 0-d tensor."
            raise ValueError(msg)
        sizes.append(t.shape[0])
        return t

    tree_map(record, data)
    if not sizes:
        msg = "data contains no tensors."
        raise ValueError(msg)
    if len(set(sizes)) != 1:
        msg = f"All data tensors must share the batch dimension; got sizes {sizes}."
        raise ValueError(msg)
    if sizes[0] == 0:
        msg = "data is an empty batch (batch size 0); pass at least one sample."
        raise ValueError(msg)
    return sizes[0]


def preparer(keep_batch_dim: bool) -> Callable[[Any], Any]:
    """Map a vmapped (un-batched) sample to the shape convention of the loss.

    Args:
        keep_batch_dim: Add a leading axis of size 1 to every tensor.

    Returns:
        The mapping function.
    """
    if keep_batch_dim:
        return lambda s: tree_map(lambda t: t.unsqueeze(0), s)
    return lambda s: s


def first_sample(data: Any, keep_batch_dim: bool) -> Any:
    """The first sample of a batch as the loss sees it.

    Args:
        data: The batch.
        keep_batch_dim: Keep a leading axis of size 1.

    Returns:
        The sample.
    """
    if keep_batch_dim:
        return tree_map(lambda t: t[:1], data)
    return tree_map(lambda t: t[0], data)


def chunk_bounds(b: int, chunk_size: int | None, verbose: bool) -> Iterator[tuple]:
    """Yield ``(start, stop)`` chunk bounds.

    Args:
        b: Batch size.
        chunk_size: Max chunk length, ``None`` for one chunk.
        verbose: Show a progress bar.

    Yields:
        ``(start, stop)`` pairs.

    Raises:
        ValueError: If ``chunk_size`` is not a positive int.
    """
    if chunk_size is None:
        chunk_size = b
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        msg = f"chunk_size must be a positive int or None, got {chunk_size!r}."
        raise TypeError(msg)
    if chunk_size < 1:
        msg = f"chunk_size must be a positive int or None, got {chunk_size}."
        raise ValueError(msg)
    starts = range(0, b, chunk_size)
    for s in tqdm(starts, desc="per-sample grads", disable=not verbose):
        yield s, min(s + chunk_size, b)


@dataclass(frozen=True)
class LossPass:
    """A functional loss over one batch, walked chunk by chunk.

    The settings every per-sample function shares (see
    :func:`dattri.func.per_sample_grad.per_sample_grad`), kept together so that the
    routes and the layer-factor functions slice a batch one way.

    Attributes:
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: All parameters by name.
        data: The batch: a Tensor or (nested) tuple/list/dict of Tensors with
            leading dimension ``B``.
        keep_batch_dim: Loss sample convention (see :func:`preparer`).
        chunk_size: Max samples per chunk; ``None``: one chunk.
        verbose: Show a progress bar over chunks.
    """

    loss_func: Callable
    params: Mapping[str, Tensor]
    data: Any
    keep_batch_dim: bool = False
    chunk_size: int | None = None
    verbose: bool = False

    def first_sample(self) -> Any:
        """The first sample of the batch as the loss sees it.

        Returns:
            See :func:`first_sample`.
        """
        return first_sample(self.data, self.keep_batch_dim)

    def prepare(self) -> Callable[[Any], Any]:
        """The map of a vmapped sample to the loss convention.

        Returns:
            See :func:`preparer`.
        """
        return preparer(self.keep_batch_dim)

    def chunks(self) -> Iterator[tuple[int, int, Any]]:
        """Walk the batch in chunks of at most ``chunk_size`` samples.

        Yields:
            ``(start, stop, chunk)``: the chunk is ``data`` sliced to
            ``[start:stop]`` along the batch dimension.

        Raises:
            ValueError: For an invalid batch or ``chunk_size``.
        """
        for s, e in chunk_bounds(batch_size(self.data), self.chunk_size, self.verbose):
            yield s, e, tree_map(lambda t, s=s, e=e: t[s:e], self.data)


def valid_list(names: list[str], limit: int = 30) -> str:
    """Comma-separated list of names, truncated.

    Args:
        names: Names.
        limit: Max names shown.

    Returns:
        Text.
    """
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_names(
    names: Sequence[str], valid: Sequence[str], *, unknown: str, repeated: str | None = None
) -> None:
    """Check a selection of names against the allowed ones.

    Args:
        names: Selected names.
        valid: Allowed names (in model order).
        unknown: Message for names outside ``valid``, formatted with ``names``
            (the unknown ones) and ``valid`` (the allowed ones, as :func:`valid_list`).
        repeated: Message for a name selected twice, formatted with ``names``
            (the whole selection); ``None`` lets names repeat.

    Raises:
        ValueError: For an unknown or repeated name.
    """
    allowed = set(valid)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(unknown.format(names=bad, valid=valid_list(list(valid))))
    if repeated is not None and len(set(names)) != len(names):
        raise ValueError(repeated.format(names=list(names)))


def nonfinite_rows(x: Tensor) -> Tensor:
    """Rows of a ``(B, D)`` tensor that contain NaN or inf.

    A row sum is non-finite whenever the row is; only those candidate rows (or
    rows whose sum merely overflowed) are checked element-wise.

    Args:
        x: ``(B, D)`` floating tensor.

    Returns:
        Boolean mask ``(B,)``.
    """
    bad = ~torch.isfinite(x.sum(dim=1))
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        bad[rows] = ~torch.isfinite(x[rows]).all(dim=1)
    return bad


class NonFiniteGradientError(ValueError):
    """Some per-sample gradients are NaN or infinite.

    Attributes:
        indices: positions of the offending samples within the batch.
    """

    def __init__(self, msg: str, indices: list[int]) -> None:
        super().__init__(msg)
        self.indices = indices


def raise_nonfinite(bad: Tensor) -> None:
    """Raise if any sample has a non-finite gradient.

    Args:
        bad: Boolean mask ``(B,)`` of samples with NaN/inf gradients.

    Raises:
        NonFiniteGradientError: (a ``ValueError``) naming the sample indices.
    """
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        shown = idx[:20] + (["..."] if len(idx) > 20 else [])
        msg = (
            f"Non-finite (NaN/inf) per-sample gradients for {len(idx)} sample(s) at "
            f"batch indices {shown}. Check the loss and inputs of these samples."
        )
        raise NonFiniteGradientError(msg, idx)
