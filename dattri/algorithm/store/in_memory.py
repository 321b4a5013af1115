"""In-memory per-checkpoint feature rows of one loader (the default store).

:func:`collect_features` runs a featurizer (e.g.
:class:`~dattri.algorithm.features.gradients.GradientFeaturizer`) over a whole loader,
checkpoint-outer so each checkpoint is loaded once, and returns a
:class:`ProjectedGradientStore`: the ``(n, d)`` feature matrix of every checkpoint plus
optional per-sample extras (TRAK's ``Q``). The on-disk form of the same rows is
:mod:`dattri.algorithm.store.memmap_store`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.features.gradients import GradientFeaturizer
from dattri.algorithm.runtime.batching import iterate, move_to_device

__all__ = ["ProjectedGradientStore", "collect_features"]


@dataclass
class ProjectedGradientStore:
    """In-memory per-checkpoint features of a fixed loader.

    Attributes:
        loader: the loader the rows come from (identity-compared to reuse the store).
        features: per checkpoint, ``(n, d)`` features (row ``i`` = ``i``-th sample in
            loader order).
        extras: per checkpoint, ``(n, ...)`` per-sample extras (empty if unused).
        state: free-form per-checkpoint state kept by the attributor (e.g. factors).
    """

    loader: Iterable | None
    features: list[Tensor]
    extras: list[Tensor] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    #: rows per scoring block (None: at most ``max_elems`` score elements per block).
    block_rows: int | None = None

    def is_for(self, loader: Iterable | None) -> bool:
        """Whether ``loader`` is the very loader this store was built from."""
        return loader is not None and loader is self.loader

    @property
    def num_samples(self) -> int:
        """Number of rows ``n``."""
        return int(self.features[0].shape[0])

    def row_blocks(
        self, n_cols: int, max_elems: int = 1 << 22, shard: bool = False
    ) -> Iterator[slice]:
        """Row slices such that a ``(rows, n_cols)`` block has at most ``max_elems``.

        ``block_rows``, when set, fixes the rows per block instead. With ``shard`` and
        torch.distributed, only this rank's contiguous share of the blocks is yielded.
        """
        n = self.num_samples
        step = self.block_rows or max(1, min(n, max_elems // max(n_cols, 1)))
        starts = range(0, n, step)
        if shard:
            from dattri.algorithm.runtime.distributed import shard_range

            mine = shard_range(len(starts))
            starts = starts[mine.start : mine.stop]
        for start in starts:
            yield slice(start, min(start + step, n))


def collect_features(
    featurizer: GradientFeaturizer,
    loader: Iterable,
    num_checkpoints: int,
    *,
    target: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    extra: Callable[[int, Any], Tensor] | None = None,
    verbose: bool = True,
    desc: str = "gradients",
) -> ProjectedGradientStore:
    """Featurize every sample of ``loader`` at every checkpoint.

    Checkpoints are the outer loop, so each is loaded once.

    Args:
        featurizer: the featurizer.
        loader: the batches (tensor, tuple/list or dict batches).
        num_checkpoints: number of checkpoints ``K``.
        target: gradients of the target function instead of the loss.
        transform: optional map applied to each ``(B, d)`` feature block.
        extra: optional ``extra(ckpt_idx, batch) -> (B, ...)`` collected alongside.
        verbose: show a progress bar.
        desc: progress-bar label.

    Returns:
        A :class:`ProjectedGradientStore` with ``features[k]`` of shape ``(n, d)``.
    """
    with featurizer.reuse_buffers():
        features, extras = _collect(
            featurizer, loader, num_checkpoints, target, transform, extra, verbose, desc
        )
    return ProjectedGradientStore(loader=loader, features=features, extras=extras)


def _collect(
    featurizer: GradientFeaturizer,
    loader: Iterable,
    num_checkpoints: int,
    target: bool,
    transform: Callable[[Tensor], Tensor] | None,
    extra: Callable[[int, Any], Tensor] | None,
    verbose: bool,
    desc: str,
) -> tuple[list[Tensor], list[Tensor]]:
    features: list[Tensor] = []
    extras: list[Tensor] = []
    for ckpt_idx in range(num_checkpoints):
        feats: list[Tensor] = []
        ext: list[Tensor] = []
        label = desc if num_checkpoints == 1 else f"{desc} (ckpt {ckpt_idx})"
        for b, batch in enumerate(iterate(loader, label, verbose)):
            batch = move_to_device(batch, featurizer.device)
            f = featurizer(ckpt_idx, batch, target=target, where=f" {b} of the loader")
            feats.append(transform(f) if transform is not None else f)
            if extra is not None:
                ext.append(extra(ckpt_idx, batch))
        if not feats:
            msg = f"The loader for {desc} yielded no batch."
            raise ValueError(msg)
        features.append(torch.cat(feats))
        if extra is not None:
            extras.append(torch.cat(ext))
    return features, extras
