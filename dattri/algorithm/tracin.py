"""TracIn family: TracInCP, Grad-Dot and Grad-Cos.

``S[i, j] = sum_k w_k <P_k g_k(z_i), P_k g'_k(z_j)>`` where ``g_k`` is the per-sample
gradient of the loss at checkpoint ``k``, ``g'_k`` that of the target, ``P_k`` a random
projection with ``ensemble_id=k`` (the same for train and test) and ``w_k`` the
checkpoint weights. With ``normalized_grad=True`` the inner product is replaced by the
cosine of the projected vectors.

* TracInCP (Pruthi et al., 2020): ``weight_list`` = the learning rates at the checkpoints.
* Grad-Dot: one checkpoint, ``weight_list = torch.ones(1)``, ``normalized_grad=False``.
* Grad-Cos: the same with ``normalized_grad=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features.gradients import GradientFeaturizer, resolve_projection
from dattri.algorithm.runtime.batching import check_loader, iterate, move_to_device
from dattri.algorithm.runtime.validation import validate_loader
from dattri.algorithm.score.tiles import (
    ScoreFile,
    iter_loader_tiles,
    iter_store_tiles,
    make_sink,
    plan_tiles,
)
from dattri.algorithm.store.in_memory import ProjectedGradientStore, collect_features
from dattri.algorithm.store.memmap_store import batch_plan
from dattri.algorithm.store.scaled import collect_features_scaled
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["TracInAttributor"]


def _normalize_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class TracInAttributor(BaseAttributor):
    """TracInCP / Grad-Dot / Grad-Cos attributor.

    Scores are ``S[i, j] = sum_k w_k <P_k g_k(z_i), P_k g'_k(z_j)>`` (cosine of the
    projected vectors if ``normalized_grad``), with ``g_k`` the loss gradient of training
    sample ``z_i`` and ``g'_k`` the target gradient of test sample ``z_j`` at checkpoint
    ``k``. The user's loss sees un-batched samples (call ``x.unsqueeze(0)`` inside it).

    Projection: by default ``TracInProjectionParams()`` (``proj_dim=512``, ``"normal"``,
    seed 0); ``P_k`` is ``random_project(g, RandomProjectionParams(feature_batch_size=1,
    device=device, **proj_params.model_dump()))`` applied with ``ensemble_id=k``. Pass
    ``proj_params=TracInProjectionParams(proj_type="identity")`` (or
    ``projector_kwargs={"proj_type": "identity"}``) to use the exact gradients.

    Unlike upstream, NaN/inf gradients raise a ``ValueError`` instead of being
    silently replaced by zeros.

    Args:
        task: the attribution task.
        weight_list: one weight per checkpoint, ``(K,)`` (learning rates for TracInCP,
            ones for Grad-Dot/Grad-Cos).
        normalized_grad: use the cosine instead of the inner product.
        proj_params: projection params (``TracInProjectionParams``) or None (defaults).
        layer_name: None (all parameters), a parameter name or a list of names.
        device: device of the gradient computation.
        projector_kwargs: the older dict form of the projection settings, e.g.
            ``{"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0}``.
        verbose: show progress bars.
        **scale: ``cache_dir`` (a resumable on-disk store of the projected training
            gradients, shared by torch.distributed ranks), ``store_dtype`` (its storage
            dtype, e.g. ``"float16"``; scores are computed in the model's dtype, at
            least float32) and ``max_memory`` (bytes or e.g. ``"2GB"``: sets the block
            sizes and spills the features to a temporary store if needed).

    Raises:
        ValueError: if ``len(weight_list)`` differs from the number of checkpoints, or
            the projection settings are invalid.
        TypeError: for arguments of the wrong type.
    """

    streams_tiles = True

    def __init__(
        self,
        task: AttributionTask,
        weight_list: Tensor | Sequence[float],
        normalized_grad: bool,
        proj_params: Any | None = None,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        projector_kwargs: Mapping[str, Any] | None = None,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        self._setup(task, layer_name, device, verbose, **scale)
        if not isinstance(normalized_grad, bool):
            msg = f"normalized_grad must be a bool, got {type(normalized_grad).__name__}."
            raise TypeError(msg)
        try:
            weights = torch.as_tensor(weight_list, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as err:
            msg = (
                "weight_list must be a tensor or a list of floats (one weight per "
                f"checkpoint), got {type(weight_list).__name__}."
            )
            raise TypeError(msg) from err
        n_ckpt = len(task.get_checkpoints())
        if weights.numel() != n_ckpt:
            msg = (
                f"weight_list has {weights.numel()} entries but the task has {n_ckpt} "
                "checkpoint(s): pass one weight per checkpoint (learning rates for "
                "TracInCP, torch.ones(n) for Grad-Dot/Grad-Cos)."
            )
            raise ValueError(msg)
        if not bool(torch.isfinite(weights).all()):
            msg = "weight_list contains NaN/inf values."
            raise ValueError(msg)
        from dattri.params.projection import TracInProjectionParams

        self.weight_list = weights
        self.normalized_grad = normalized_grad
        self.proj_params = resolve_projection(proj_params, projector_kwargs, TracInProjectionParams)
        self.featurizer = GradientFeaturizer(task, layer_name, self.proj_params, self.device)
        self._store: ProjectedGradientStore | None = None

    # ----------------------------------------------------------------- helpers
    @property
    def num_checkpoints(self) -> int:
        """Number of checkpoints ``K``."""
        return len(self.task.get_checkpoints())

    def _weights(self) -> list[float]:
        return [float(w) for w in self.weight_list]

    def _target_is_loss(self) -> bool:
        return self.task.original_target_func is self.task.original_loss_func

    def _transform(self, x: Tensor) -> Tensor:
        return _normalize_rows(x) if self.normalized_grad else x

    def _features(self, ckpt_idx: int, batch: Any, target: bool, where: str = "") -> Tensor:
        return self._transform(self.featurizer(ckpt_idx, batch, target=target, where=where))

    def _collect(self, loader: Iterable, target: bool, desc: str) -> ProjectedGradientStore:
        return collect_features(
            self.featurizer,
            loader,
            self.num_checkpoints,
            target=target,
            transform=self._transform,
            verbose=self.verbose,
            desc=desc,
        )

    def _test_features(self, test_dataloader: Iterable) -> list[Tensor]:
        """Per checkpoint ``(n_test, d)`` transformed target features (computed once)."""
        store = self._store
        if store is not None and store.is_for(test_dataloader) and self._target_is_loss():
            return [getattr(f, "materialize", lambda f=f: f)() for f in store.features]
        return self._collect(test_dataloader, target=True, desc="test gradients").features

    # ------------------------------------------------------------------ phases
    def cache(self, full_train_dataloader: Iterable | None = None) -> None:
        """Store the projected training gradients of every checkpoint.

        Later :meth:`attribute` / :meth:`self_attribute` calls with this same loader
        object reuse them instead of recomputing (the store is keyed on the loader
        object: call ``cache`` again if its data change). Memory: ``K x (n, d)``
        tensors on ``device``. Upstream's ``cache()`` takes no argument; calling it
        without one is accepted and does nothing.

        Args:
            full_train_dataloader: the training data (not shuffled), or None.
        """
        if full_train_dataloader is None:
            return
        self._check_train_loader(full_train_dataloader, keep_batch_dim=False)
        self.featurizer.apply_budget(self.scale_options.max_memory)
        self._store = collect_features_scaled(
            self.featurizer,
            full_train_dataloader,
            self.num_checkpoints,
            self.scale_options,
            self,
            transform=self._transform,
            kind=f"TracIn train features (normalized={self.normalized_grad})",
            verbose=self.verbose,
            desc="train gradients",
        )

    def _test_block(self, n_test: int) -> int:
        """Set the row block of the store from ``max_memory``; return the test block."""
        budget = self.scale_options.max_memory
        if budget is None or self._store is None:
            return n_test
        d, n_ckpt = self.featurizer.out_dim, self.num_checkpoints
        plan = plan_tiles(
            self._store.num_samples,
            n_test,
            d * n_ckpt,
            budget,
            itemsize=8,
            reserved=n_ckpt * n_test * d * 8,
        )
        self._store.block_rows = plan.train_block
        return plan.test_block

    def _iter_tiles(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        shard: bool = False,
        full_width: bool = False,
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(row_start, col_start, tile)``; checkpoints summed inside each tile."""
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        validate_loader(
            self.task, test_dataloader, "test_dataloader", keep_batch_dim=False, target=True
        )
        test_feats = self._test_features(test_dataloader)
        weights = self._weights()
        n_test = test_feats[0].shape[0]
        store = self._store
        if store is not None and store.is_for(train_dataloader):
            block = n_test if full_width else self._test_block(n_test)
            yield from iter_store_tiles(store, test_feats, weights, None, block, shard)
            return

        def featurize(b: int, batch: Any) -> tuple[list[Tensor], None]:
            batch = move_to_device(batch, self.device)
            where = f" {b} of train"
            n_ckpt = len(test_feats)
            return [
                self._features(k, batch, target=False, where=where) for k in range(n_ckpt)
            ], None

        with self.featurizer.reuse_buffers():
            yield from iter_loader_tiles(
                train_dataloader, featurize, test_feats, weights, n_test, shard, self.verbose
            )

    def _iter_score_blocks(
        self, train_dataloader: Iterable, test_dataloader: Iterable
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(row_start, (B, n_test))`` blocks; checkpoints inside each block."""
        for row, _, block in self._iter_tiles(train_dataloader, test_dataloader, full_width=True):
            yield row, block

    def attribute(
        self, train_dataloader: Iterable, test_dataloader: Iterable, *, out: ScoreFile = None
    ) -> Tensor:
        """Score every (train, test) pair.

        Test gradients are computed once; training gradients come from the cache when
        ``train_dataloader`` is the loader given to :meth:`cache`, and are otherwise
        computed once per checkpoint. Scores are produced in ``(train block, test
        block)`` tiles (sizes from ``max_memory``); with torch.distributed each rank
        scores its share of the cached rows and every rank returns the full matrix.

        Args:
            train_dataloader: training samples (rows), not shuffled.
            test_dataloader: test samples (columns), not shuffled.
            out: path of a ``.npy`` score file: tiles are written there and a
                memory-mapped float32 CPU tensor on it is returned.

        Returns:
            ``(n_train, n_test)`` scores on CPU (as upstream).
        """
        store = self._store
        cached = store is not None and store.is_for(train_dataloader)
        if out is not None or (self.scale_options.active and cached):
            check_loader(train_dataloader, "train_dataloader")
            check_loader(test_dataloader, "test_dataloader")
            n_train = store.num_samples if cached else sum(batch_plan(train_dataloader))
            dtype = torch.promote_types(self.task.get_param(0)[0].dtype, torch.float32)
            sink = make_sink(out, n_train, sum(batch_plan(test_dataloader)), dtype, "cpu")
            for row, col, tile in self._iter_tiles(train_dataloader, test_dataloader, True):
                sink.add(row, col, tile)
            return sink.finalize()
        if cached or self.num_checkpoints == 1:
            blocks = [b for _, b in self._iter_score_blocks(train_dataloader, test_dataloader)]
            return torch.cat(blocks).cpu()
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        # Several checkpoints, uncached: checkpoint-outer so each is loaded once.
        test_feats = self._test_features(test_dataloader)
        out_scores: Tensor | None = None
        for ckpt_idx, (w, t) in enumerate(zip(self._weights(), test_feats)):
            parts = []
            for b, batch in enumerate(
                iterate(train_dataloader, f"attribute (ckpt {ckpt_idx})", self.verbose)
            ):
                batch = move_to_device(batch, self.device)
                f = self._features(ckpt_idx, batch, target=False, where=f" {b} of train")
                parts.append(f @ t.T)
            part = w * torch.cat(parts)
            out_scores = part if out_scores is None else out_scores + part
        return out_scores.cpu()

    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """Score each training sample against itself, for any number of batches.

        ``sum_k w_k <P_k g_k(z_i), P_k g'_k(z_i)>`` (cosine if normalised), i.e. the
        diagonal of ``attribute(train, train)``; with the target equal to the loss this
        is ``sum_k w_k ||P_k g_k(z_i)||^2`` (``sum_k w_k`` if normalised).

        Args:
            train_dataloader: training samples.

        Returns:
            ``(n_train,)`` scores on CPU.
        """
        check_loader(train_dataloader, "train_dataloader")
        weights = self._weights()
        store = self._store
        if store is not None and store.is_for(train_dataloader):
            if self._target_is_loss():
                tgt = store.features
            else:
                tgt = self._collect(train_dataloader, target=True, desc="target gradients").features
            parts = []
            for rows in store.row_blocks(1):
                parts.append(
                    sum(
                        w * (f[rows] * t[rows]).sum(dim=1)
                        for w, f, t in zip(weights, store.features, tgt)
                    )
                )
            return torch.cat(parts).cpu()
        with self.featurizer.reuse_buffers():
            return self._self_attribute_uncached(train_dataloader, weights)

    def _self_attribute_uncached(self, train_dataloader: Iterable, weights: list[float]) -> Tensor:
        total: Tensor | None = None
        for ckpt_idx, w in enumerate(weights):
            vals = []
            label = f"self-attribution (ckpt {ckpt_idx})"
            for b, batch in enumerate(iterate(train_dataloader, label, self.verbose)):
                batch = move_to_device(batch, self.device)
                where = f" {b} of train"
                f = self._features(ckpt_idx, batch, target=False, where=where)
                t = f if self._target_is_loss() else self._features(ckpt_idx, batch, True, where)
                vals.append((f * t).sum(dim=1))
            part = w * torch.cat(vals)
            total = part if total is None else total + part
        return total.cpu()
