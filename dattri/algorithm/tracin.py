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
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.batching import check_loader, iterate, move_to_device
from dattri.algorithm.projected_store import (
    GradientFeaturizer,
    ProjectedGradientStore,
    collect_features,
    resolve_projection,
)
from dattri.task import AttributionTask

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

    Raises:
        ValueError: if ``len(weight_list)`` differs from the number of checkpoints, or
            the projection settings are invalid.
        TypeError: for arguments of the wrong type.
    """

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
    ) -> None:
        if not isinstance(task, AttributionTask):
            msg = f"task must be a dattri.task.AttributionTask, got {type(task).__name__}."
            raise TypeError(msg)
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

        task.selected_param_names(layer_name)  # validates the names
        self.task = task
        self.weight_list = weights
        self.normalized_grad = normalized_grad
        self.layer_name = layer_name
        self.device = torch.device(device)
        self.verbose = verbose
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
            return store.features
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
        check_loader(full_train_dataloader, "full_train_dataloader")
        self._store = self._collect(full_train_dataloader, target=False, desc="train gradients")

    def _iter_score_blocks(
        self, train_dataloader: Iterable, test_dataloader: Iterable
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(row_start, (B, n_test))`` blocks; checkpoints inside each block."""
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        test_feats = self._test_features(test_dataloader)
        weights = self._weights()
        store = self._store
        if store is not None and store.is_for(train_dataloader):
            for rows in store.row_blocks(test_feats[0].shape[0]):
                block = sum(
                    w * (f[rows] @ t.T) for w, f, t in zip(weights, store.features, test_feats)
                )
                yield rows.start, block
            return
        row = 0
        for b, batch in enumerate(iterate(train_dataloader, "attribute", self.verbose)):
            batch = move_to_device(batch, self.device)
            block = None
            for ckpt_idx, (w, t) in enumerate(zip(weights, test_feats)):
                f = self._features(ckpt_idx, batch, target=False, where=f" {b} of train")
                part = w * (f @ t.T)
                block = part if block is None else block + part
            yield row, block
            row += block.shape[0]

    def attribute(self, train_dataloader: Iterable, test_dataloader: Iterable) -> Tensor:
        """Score every (train, test) pair.

        Test gradients are computed once; training gradients come from the cache when
        ``train_dataloader`` is the loader given to :meth:`cache`, and are otherwise
        computed once per checkpoint.

        Args:
            train_dataloader: training samples (rows), not shuffled.
            test_dataloader: test samples (columns), not shuffled.

        Returns:
            ``(n_train, n_test)`` scores on CPU (as upstream).
        """
        store = self._store
        if (store is not None and store.is_for(train_dataloader)) or self.num_checkpoints == 1:
            blocks = [b for _, b in self._iter_score_blocks(train_dataloader, test_dataloader)]
            return torch.cat(blocks).cpu()
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        # Several checkpoints, uncached: checkpoint-outer so each is loaded once.
        test_feats = self._test_features(test_dataloader)
        out: Tensor | None = None
        for ckpt_idx, (w, t) in enumerate(zip(self._weights(), test_feats)):
            parts = []
            for b, batch in enumerate(
                iterate(train_dataloader, f"attribute (ckpt {ckpt_idx})", self.verbose)
            ):
                batch = move_to_device(batch, self.device)
                f = self._features(ckpt_idx, batch, target=False, where=f" {b} of train")
                parts.append(f @ t.T)
            part = w * torch.cat(parts)
            out = part if out is None else out + part
        return out.cpu()

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
            out = sum(w * (f * t).sum(dim=1) for w, f, t in zip(weights, store.features, tgt))
            return out.cpu()
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
