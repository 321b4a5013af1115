"""Per-token attribution of sequence models, streamed.

For a query sequence with next-token targets ``y_1 .. y_T``, the sequence target is
(usually) the mean token loss ``f = (1/T) sum_t l_t``. Every attributor whose score is
linear in the test gradient (TracIn/Grad-Dot, TRAK, the influence-function family,
LoGra/FactGraSS, DVEmb) then splits the sequence score exactly into per-token scores::

    S[i, j] = sum_t S[i, j, t],        S[i, j, t] = score of training sequence i
                                                    against (1/T) l_t of query j

(``reduction="sum"``: without the ``1/T``). :func:`attribute_per_token` computes
``S[i, j, t]`` by scoring "token queries": copies of each query sequence whose targets
are all masked except token ``t`` (``mask_fn``), so the task's own target function,
which averages over the unmasked targets, gives ``l_t``. The ``(n_train, n_test, T)``
result is produced a chunk of token queries at a time and either kept in memory,
written to a ``.npy`` file (memory-mapped, never held in memory) or reduced to the
top-k training sequences of every (query, token).

The iterative IF solvers are linear in the query once converged (CG to its ``tol``,
Arnoldi and LiSSA always: fixed projections / a fixed recursion); an unconverged CG
solve is not, and its token scores then only approximately add up.

Grad-Cos (``normalized_grad=True``) normalises the test gradient and is not linear in
it; RPS, KNN-Shapley and Data Shapley have no test gradient. They are refused with the
reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from dattri.algorithm.runtime.batching import check_loader, iterate
from dattri.algorithm.score.tiles import ScoreFile

__all__ = ["PerTokenTopK", "attribute_per_token", "mask_all_but"]

_REDUCTIONS = ("mean", "sum")


@dataclass
class PerTokenTopK:
    """The ``k`` most helpful and most harmful training sequences of every query token.

    Attributes:
        helpful_indices: ``(n_test, T, k)`` training indices, largest score first.
        helpful_scores: ``(n_test, T, k)`` their per-token scores.
        harmful_indices: ``(n_test, T, k)`` training indices, smallest score first.
        harmful_scores: ``(n_test, T, k)`` their per-token scores.
        token_valid: ``(n_test, T)`` bool, False where the query has no target
            (already ignored by the target function); those entries hold index ``-1``
            and score 0.
    """

    helpful_indices: Tensor
    helpful_scores: Tensor
    harmful_indices: Tensor
    harmful_scores: Tensor
    token_valid: Tensor


def _targets_of(sample: Any) -> tuple[Tensor, int, Callable[[Tensor], Any]]:
    """Find the target tensor of a default-format sample.

    Args:
        sample: ``(x, y)`` (tuple/list, ``y`` the ``(T,)`` next-token targets, ignore
            index ``-1``) or a dict with ``"labels"`` (ignore index ``-100``).

    Returns:
        ``(targets, ignore_index, rebuild)`` where ``rebuild(new_targets)`` gives the
        sample with its targets replaced.

    Raises:
        ValueError: for another sample format (pass ``mask_fn``).
    """
    if isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], Tensor):
        return sample[1], -1, lambda y: type(sample)((sample[0], y))
    if isinstance(sample, dict) and isinstance(sample.get("labels"), Tensor):
        return sample["labels"], -100, lambda y: {**sample, "labels": y}
    msg = (
        "attribute_per_token: cannot find the token targets of a query sample of type "
        f"{type(sample).__name__}; the default mask_fn handles (x, y) pairs (ignore index "
        "-1, as dattri's GPT) and dicts with 'labels' (ignore index -100, as transformers). "
        "Pass mask_fn=(sample, t) -> sample whose target keeps token t only."
    )
    raise ValueError(msg)


def mask_all_but(sample: Any, t: int) -> Any:
    """Default ``mask_fn``: keep target token ``t`` of a sample, ignore the others.

    Args:
        sample: ``(x, y)`` with ``y`` of shape ``(T,)`` (ignore index ``-1``) or a dict
            with ``"labels"`` ``(T,)`` (ignore index ``-100``).
        t: token position.

    Returns:
        The sample with every target except position ``t`` set to the ignore index.
    """
    y, ignore, rebuild = _targets_of(sample)
    keep = torch.full_like(y, ignore)
    keep[t] = y[t]
    return rebuild(keep)


def _valid_tokens(sample: Any, num_tokens: int) -> Tensor:
    """``(T,)`` bool: positions with a target (default formats), all True otherwise."""
    try:
        y, ignore, _ = _targets_of(sample)
    except ValueError:
        return torch.ones(num_tokens, dtype=torch.bool)
    return (y.reshape(-1) != ignore).cpu()


def _scorer(attributor: Any, train_dataloader: Iterable | None) -> Callable[[list], Tensor]:
    """``f(test_batches) -> (n_train, n_test_tokens)`` for a linear attributor.

    Args:
        attributor: a cached attributor.
        train_dataloader: the training rows (None where the attributor keeps them).

    Returns:
        The scoring function.

    Raises:
        ValueError: for attributors that are not linear in the test gradient.
    """
    from dattri.algorithm.base import BaseInnerProductAttributor
    from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor

    if isinstance(attributor, TRAKAttributor):
        return lambda test: attributor.attribute(test, train_dataloader)
    if isinstance(attributor, DVEmbAttributor):
        return lambda test: attributor.attribute(test)
    if isinstance(attributor, TracInAttributor) and attributor.normalized_grad:
        msg = (
            "attribute_per_token: Grad-Cos (normalized_grad=True) normalises the test "
            "gradient, so its score is not linear in it and per-token scores would not "
            "add up to the sequence score. Use normalized_grad=False (Grad-Dot/TracIn)."
        )
        raise ValueError(msg)
    if isinstance(
        attributor, (TracInAttributor, BaseInnerProductAttributor, BlockProjectedIFAttributor)
    ):
        if train_dataloader is None:
            msg = f"attribute_per_token: {type(attributor).__name__} needs train_dataloader."
            raise ValueError(msg)
        return lambda test: attributor.attribute(train_dataloader, test)
    msg = (
        f"attribute_per_token: {type(attributor).__name__} is not linear in the test "
        "gradient (or has none), so its sequence score does not split into token scores. "
        "Supported: TracIn/Grad-Dot, TRAK, the IF family, LoGra/FactGraSS, DVEmb."
    )
    raise ValueError(msg)


def _token_queries(
    test_dataloader: Iterable, num_tokens: int | None, verbose: bool
) -> Iterator[tuple[int, Any, Tensor]]:
    """Yield ``(test_index, sample, valid (T,))`` for every query sequence."""
    j = 0
    for batch in iterate(test_dataloader, "per-token queries", verbose):
        n = _batch_len(batch)
        for i in range(n):
            sample = _index(batch, i)
            yield j, sample, _valid_tokens(sample, num_tokens or 0)
            j += 1


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    return _batch_len(batch[0])


def _index(batch: Any, i: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[i]
    if isinstance(batch, dict):
        return {k: _index(v, i) for k, v in batch.items()}
    return type(batch)(_index(v, i) for v in batch)


def _seq_len(sample: Any) -> int:
    try:
        return int(_targets_of(sample)[0].reshape(-1).shape[0])
    except ValueError:
        msg = "attribute_per_token: pass num_tokens with a custom mask_fn/sample format."
        raise ValueError(msg) from None


class _Sink:
    """Collects ``(n_train, c)`` column blocks into the requested output."""

    def __init__(
        self, n_test: int, num_tokens: int, k: int | None, out: str | os.PathLike | None
    ) -> None:
        self.n_test, self.t, self.k, self.out = n_test, num_tokens, k, out
        self.valid = torch.zeros(n_test, num_tokens, dtype=torch.bool)
        self.dense: Tensor | None = None
        self.mm: np.ndarray | None = None
        self.top: list[Tensor] | None = None

    def _alloc(self, n_train: int, dtype: torch.dtype) -> None:
        if self.k is not None:
            k = min(self.k, n_train)
            shape = (self.n_test, self.t, k)
            self.top = [
                torch.full(shape, -1, dtype=torch.long),
                torch.zeros(shape, dtype=dtype),
                torch.full(shape, -1, dtype=torch.long),
                torch.zeros(shape, dtype=dtype),
            ]
        elif self.out is not None:
            self.mm = np.lib.format.open_memmap(
                os.fspath(self.out), mode="w+", dtype=np.float32,
                shape=(n_train, self.n_test, self.t),
            )  # fmt: skip
        else:
            self.dense = torch.zeros(n_train, self.n_test, self.t, dtype=dtype)

    def add(self, block: Tensor, cols: list[tuple[int, int]]) -> None:
        """Store ``block`` ``(n_train, c)``; column ``m`` is (test, token) ``cols[m]``."""
        block = block.detach().cpu()
        if self.dense is None and self.mm is None and self.top is None:
            self._alloc(block.shape[0], block.dtype)
        js = torch.tensor([c[0] for c in cols])
        ts = torch.tensor([c[1] for c in cols])
        self.valid[js, ts] = True
        if self.top is not None:
            kk = self.top[0].shape[-1]
            hv, hi = torch.topk(block.T, kk, dim=1, largest=True, sorted=True)
            lv, li = torch.topk(block.T, kk, dim=1, largest=False, sorted=True)
            for dst, src in zip(self.top, (hi, hv.to(self.top[1].dtype), li, lv), strict=True):
                dst[js, ts] = src.to(dst.dtype)
        elif self.mm is not None:
            arr = block.to(torch.float32).numpy()
            for m, (j, t) in enumerate(cols):
                self.mm[:, j, t] = arr[:, m]
        else:
            self.dense[:, js, ts] = block.to(self.dense.dtype)

    def result(self) -> Tensor | PerTokenTopK:
        if self.top is not None:
            return PerTokenTopK(*self.top, token_valid=self.valid)
        if self.mm is not None:
            self.mm.flush()
            return torch.from_numpy(np.load(os.fspath(self.out), mmap_mode="r+"))
        return self.dense


def attribute_per_token(
    attributor: Any,
    test_dataloader: Iterable,
    train_dataloader: Iterable | None = None,
    *,
    reduction: str = "mean",
    mask_fn: Callable[[Any, int], Any] | None = None,
    num_tokens: int | None = None,
    k: int | None = None,
    out: ScoreFile = None,
    token_batch_size: int = 64,
    verbose: bool = False,
) -> Tensor | PerTokenTopK:
    """Influence of each training sequence on each token of each query sequence.

    The attributor must already be cached (``attributor.cache(...)``, or for DVEmb the
    recorded training run) and its target function must average (``reduction="mean"``)
    or sum (``"sum"``) the token losses that ``mask_fn`` leaves unmasked, e.g. dattri's
    GPT with ``ignore_index=-1`` targets, or a ``transformers`` causal LM with
    ``labels`` (``-100`` ignored). Then, up to floating point::

        result.sum(-1) == sequence scores of the same attributor (n_train, n_test)

    Args:
        attributor: a cached TracIn/Grad-Dot, TRAK, IF (Explicit/CG/LiSSA/Arnoldi/
            DataInf/EK-FAC), LoGra/FactGraSS or DVEmb attributor.
        test_dataloader: the query sequences (not shuffled); each sample ``(x, y)``
            with ``y`` ``(T,)`` or a dict with ``"labels"`` ``(T,)`` for the default
            ``mask_fn``.
        train_dataloader: the training rows (required except for TRAK after ``cache``
            and DVEmb); the same loader given to ``cache`` reuses the cached features.
        reduction: ``"mean"`` (the sequence target averages its ``T`` token losses:
            per-token scores carry ``1/T``, ``T`` = number of non-ignored targets of
            that query) or ``"sum"``.
        mask_fn: ``(sample, t) -> sample`` whose target keeps token ``t`` only
            (default :func:`mask_all_but`).
        num_tokens: ``T``; default the query's target length (default formats).
        k: keep only the ``k`` most helpful and most harmful training sequences per
            (query, token): memory ``O(n_test * T * k)``.
        out: ``.npy`` path: write the full ``(n_train, n_test, T)`` float32 array there
            (memory-mapped) and return a tensor view of the file.
        token_batch_size: token queries scored per call (bounds the test-side memory:
            one ``(n_train, token_batch_size)`` block at a time).
        verbose: progress bar over the query batches.

    Returns:
        ``(n_train, n_test, T)`` scores (memory-mapped with ``out``; zero at positions
        without a target), or a :class:`PerTokenTopK` when ``k`` is given.

    Raises:
        ValueError: for an unsupported attributor (not linear in the test gradient),
            a bad ``reduction``/``k``/``token_batch_size``, both ``k`` and ``out``, or
            queries of different lengths.
    """
    if reduction not in _REDUCTIONS:
        msg = f"reduction must be one of {_REDUCTIONS}, got {reduction!r}."
        raise ValueError(msg)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        msg = f"k must be None or a positive int, got {k!r}."
        raise ValueError(msg)
    if k is not None and out is not None:
        msg = "Pass either k (top-k per token) or out (full array on disk), not both."
        raise ValueError(msg)
    if isinstance(token_batch_size, bool) or not isinstance(token_batch_size, int):
        msg = f"token_batch_size must be a positive int, got {token_batch_size!r}."
        raise ValueError(msg)
    if token_batch_size < 1:
        msg = f"token_batch_size must be a positive int, got {token_batch_size!r}."
        raise ValueError(msg)
    check_loader(test_dataloader, "test_dataloader")
    score = _scorer(attributor, train_dataloader)
    mask = mask_all_but if mask_fn is None else mask_fn
    queries = list(_token_queries(test_dataloader, num_tokens, verbose))
    n_test = len(queries)
    length = num_tokens if num_tokens is not None else _seq_len(queries[0][1])
    sink = _Sink(n_test, length, k, out)
    pending: list[tuple[Any, int, int, float]] = []

    def flush() -> None:
        batch = default_collate([p[0] for p in pending])
        block = score([batch])
        weights = torch.tensor([p[3] for p in pending], dtype=block.dtype, device=block.device)
        sink.add(block * weights, [(p[1], p[2]) for p in pending])
        pending.clear()

    for j, sample, valid in queries:
        if valid.shape[0] != length:
            msg = (
                f"Query {j} has {valid.shape[0]} target tokens, expected {length}; "
                "per-token attribution needs queries of one length (pad with the ignore "
                "index)."
            )
            raise ValueError(msg)
        count = int(valid.sum())
        if count == 0:
            continue
        weight = 1.0 / count if reduction == "mean" else 1.0
        for t in torch.nonzero(valid).flatten().tolist():
            pending.append((mask(sample, t), j, t, weight))
            if len(pending) >= token_batch_size:
                flush()
    if pending:
        flush()
    return sink.result()
