"""Feature collection that scales: on-disk store, memory budget, torch.distributed.

:class:`ScaleOptions` holds the three settings shared by TRAK and TracIn
(``cache_dir``, ``store_dtype``, ``max_memory``); :func:`collect_features_scaled` is
:func:`~dattri.algorithm.features.gradients.collect_features` with them:

* no option and one process: exactly ``collect_features`` (features in memory);
* torch.distributed without ``cache_dir``: each rank featurizes its contiguous share
  of the batches, the rows are gathered in rank order (every rank holds all rows);
* ``cache_dir``: rows go to a :class:`~dattri.algorithm.store.memmap_store.MemmapFeatureStore`
  (each rank writes its share; an interrupted run resumes; a store written for other
  settings or other data is refused, rows damaged since are recomputed; a one-line
  message says when a store is reused or resumed) and are read back block by block through
  :class:`~dattri.algorithm.store.memmap_store.StoredRows`.
* ``max_memory`` without ``cache_dir``: when the features would take more than half
  the budget, a temporary store directory is used (removed with the attributor).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import Tensor

from dattri.algorithm.features.gradients import GradientFeaturizer
from dattri.algorithm.runtime.batching import iterate, move_to_device
from dattri.algorithm.runtime.distributed import (
    gather_rows,
    is_distributed,
    rank_world,
    shard_range,
)
from dattri.algorithm.score.tiles import parse_memory
from dattri.algorithm.store.in_memory import ProjectedGradientStore, collect_features
from dattri.algorithm.store.memmap_store import (
    MemmapFeatureStore,
    StoredRows,
    batch_plan,
    checkpoint_fingerprint,
    iter_batches,
    parse_store_dtype,
)

__all__ = ["ScaleKwargs", "ScaleOptions", "collect_features_scaled"]


class ScaleKwargs(TypedDict, total=False):
    """The keyword arguments of :class:`ScaleOptions` every attributor accepts."""

    cache_dir: str | os.PathLike | None
    store_dtype: str | torch.dtype | None
    max_memory: int | str | None


@dataclass
class ScaleOptions:
    """Scaling settings of an attributor (all None = single-process, in memory).

    Args:
        cache_dir: directory of the on-disk feature store (shared by all ranks).
        store_dtype: storage dtype of the features (``"float16"``, ``"bfloat16"``,
            ``"float32"``, ``"float64"`` or a torch dtype); default: the model's.
            Scores are always computed in the model's dtype (at least float32).
        max_memory: budget for the working buffers (bytes or ``"2GB"``); chooses
            block sizes and spills features to disk when needed.
    """

    cache_dir: str | os.PathLike | None = None
    store_dtype: str | torch.dtype | None = None
    max_memory: int | str | None = None
    _tmp: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            msg = f"cache_dir must be None or a directory path, got {type(self.cache_dir)}."
            raise TypeError(msg)
        if self.store_dtype is not None:
            parse_store_dtype(self.store_dtype, torch.float32)
        self.max_memory = parse_memory(self.max_memory)

    @property
    def active(self) -> bool:
        """Whether any option is set or torch.distributed is running."""
        return self.cache_dir is not None or self.max_memory is not None or is_distributed()

    def store_dir(self, owner: object, nbytes: int) -> str | None:
        """The store directory to use for ``nbytes`` of features (None: in memory)."""
        if self.cache_dir is not None:
            return os.fspath(self.cache_dir)
        if self.max_memory is None or 2 * nbytes <= self.max_memory:
            return None
        if is_distributed():
            msg = (
                f"The features ({nbytes} bytes) do not fit in half of max_memory="
                f"{self.max_memory}: pass cache_dir (a directory shared by all ranks)."
            )
            raise ValueError(msg)
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="dattri-store-")
            weakref.finalize(owner, shutil.rmtree, self._tmp, True)
        return self._tmp


def collect_features_scaled(
    featurizer: GradientFeaturizer,
    loader: Iterable,
    num_checkpoints: int,
    options: ScaleOptions,
    owner: object,
    *,
    target: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    extra: Callable[[int, Any], Tensor] | None = None,
    kind: str = "",
    verbose: bool = True,
    desc: str = "gradients",
) -> ProjectedGradientStore:
    """Featurize ``loader`` at every checkpoint under ``options``.

    Args:
        featurizer: the featurizer.
        loader: the batches (not shuffled).
        num_checkpoints: ``K``.
        options: the scaling options.
        owner: the attributor (owns a temporary store directory, if any).
        target: gradients of the target instead of the loss.
        transform: optional map of each ``(B, d)`` feature block.
        extra: optional ``extra(ckpt_idx, batch) -> (B,)`` per-sample values.
        kind: what the attributor stores (part of the store settings).
        verbose: progress bars.
        desc: progress-bar label.

    Returns:
        A :class:`~dattri.algorithm.features.gradients.ProjectedGradientStore`; with a
        store directory its ``features`` are :class:`StoredRows`.
    """
    if not options.active:
        return collect_features(
            featurizer,
            loader,
            num_checkpoints,
            target=target,
            transform=transform,
            extra=extra,
            verbose=verbose,
            desc=desc,
        )
    with featurizer.reuse_buffers():
        return _collect_scaled(
            featurizer,
            loader,
            num_checkpoints,
            options,
            owner,
            target,
            transform,
            extra,
            kind,
            verbose,
            desc,
        )


def _collect_scaled(
    featurizer: GradientFeaturizer,
    loader: Iterable,
    num_checkpoints: int,
    options: ScaleOptions,
    owner: object,
    target: bool,
    transform: Callable[[Tensor], Tensor] | None,
    extra: Callable[[int, Any], Tensor] | None,
    kind: str,
    verbose: bool,
    desc: str,
) -> ProjectedGradientStore:
    sizes = batch_plan(loader)
    if not sizes:
        msg = f"The loader for {desc} yielded no batch."
        raise ValueError(msg)
    n, d = sum(sizes), featurizer.out_dim
    dtype = featurizer.task.get_param(0)[0].dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)
    item = torch.empty((), dtype=compute_dtype).element_size()
    directory = options.store_dir(owner, n * d * num_checkpoints * item)

    def compute(k: int, b: int, batch: Any) -> tuple[Tensor, Tensor | None]:
        batch = move_to_device(batch, featurizer.device)
        f = featurizer(k, batch, target=target, where=f" {b} of the loader")
        f = transform(f) if transform is not None else f
        return f, (extra(k, batch) if extra is not None else None)

    if directory is None:  # in memory (rows gathered over torch.distributed ranks)
        mine = list(shard_range(len(sizes)))
        features, extras = [], []
        for k in range(num_checkpoints):
            feats, ext = [], []
            label = desc if num_checkpoints == 1 else f"{desc} (ckpt {k})"
            pairs = iter_batches(loader, mine)
            for b, batch in iterate(pairs, label, verbose, total=len(mine)):
                f, e = compute(k, b, batch)
                feats.append(f)
                if e is not None:
                    ext.append(e)
            local = torch.cat(feats) if feats else torch.zeros(0, d, dtype=compute_dtype)
            features.append(gather_rows(local.to(featurizer.device)))
            if extra is not None:
                local_e = torch.cat(ext) if ext else torch.zeros(0, dtype=compute_dtype)
                extras.append(gather_rows(local_e.to(featurizer.device)))
        return ProjectedGradientStore(loader=loader, features=features, extras=extras)

    store_dtype = parse_store_dtype(options.store_dtype, dtype)
    settings = {
        "kind": kind,
        "target": bool(target),
        "checkpoints": checkpoint_fingerprint(featurizer.task),
        "num_checkpoints": num_checkpoints,
        **featurizer.settings(),
    }
    arrays: dict[str, tuple[tuple[int, ...], str]] = {}
    for k in range(num_checkpoints):
        arrays[f"features_{k}"] = ((d,), store_dtype)
        if extra is not None:
            arrays[f"extra_{k}"] = ((), "float64")
    store = MemmapFeatureStore.open(directory, settings, n, arrays)
    line = store.progress_line([f"ckpt{k}" for k in range(num_checkpoints)])
    if line is not None and verbose and rank_world()[0] == 0:
        print(line, file=sys.stderr, flush=True)
    for k in range(num_checkpoints):

        def compute_k(b: int, batch: Any, k: int = k) -> dict[str, Tensor]:
            f, e = compute(k, b, batch)
            out = {f"features_{k}": f}
            if e is not None:
                out[f"extra_{k}"] = e
            return out

        label = desc if num_checkpoints == 1 else f"{desc} (ckpt {k})"
        store.fill(f"ckpt{k}", loader, sizes, compute_k, verbose=verbose, desc=label)
    store.sync()
    missing = [k for k in range(num_checkpoints) if not store.is_complete(f"ckpt{k}")]
    if missing:
        msg = f"The feature store is incomplete after cache() for checkpoints {missing}."
        raise RuntimeError(msg)
    device = featurizer.device
    features = [
        StoredRows(store, f"features_{k}", compute_dtype, device) for k in range(num_checkpoints)
    ]
    extras = []
    if extra is not None:
        extras = [
            store.read(f"extra_{k}", slice(None), compute_dtype, device)
            for k in range(num_checkpoints)
        ]
    result = ProjectedGradientStore(loader=loader, features=features, extras=extras)
    result.state["store"] = store
    return result
