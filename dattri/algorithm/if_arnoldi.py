"""Arnoldi influence functions (Schioppa et al., 2022; upstream ``IFAttributorArnoldi``).

``cache`` runs Arnoldi iteration (full re-orthogonalisation) on the HVP of the mean
training loss over the first ``ceil(len(loader) * precompute_data_ratio)`` cached batches
(evaluated batch by batch), keeps the ``proj_dim`` Ritz pairs ``(lambda_r, u_r)`` of
largest ``|lambda_r|`` and scores

    S_ij = sum_r (u_r^T g_i)(u_r^T g_j) / lambda_r,

by transforming both sides: train ``g -> sign(lambda) U g / sqrt|lambda|``, test
``g -> U g / sqrt|lambda|`` (exact also for an indefinite Hessian).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dattri.algorithm.features.representations import tensor_digest
from dattri.algorithm.solve.mean_hvp import IFBase
from dattri.func.hessian_arnoldi import top_ritz_pairs
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["IFAttributorArnoldi"]


class IFAttributorArnoldi(IFBase):
    """Influence functions restricted to the top eigenspace of the Hessian (Arnoldi).

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names.
        device: device for the computation.
        precompute_data_ratio: fraction of the cached loader's batches (the first ones)
            defining the Hessian, in ``(0, 1]``.
        proj_dim: number of Ritz pairs kept (the projection dimension).
        max_iter: Arnoldi steps (Krylov dimension, capped at ``p``); use
            ``max_iter >= 2 * proj_dim`` for accurate small Ritz values.
        norm_constant: ``> 0``; the HVP is divided by it during the iteration (for
            numerical range only; the result does not depend on it).
        tol: relative breakdown tolerance of the iteration.
        regularization: ``lambda >= 0``; Arnoldi runs on ``H + lambda I``.
        seed: seed of the start vector.
        verbose: show progress bars.
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory``: the shared store and
            budget of :class:`~dattri.algorithm.base.BaseInnerProductAttributor`.
    """

    cache_on_attribute = False

    #: torch.distributed: each rank holds its share of the batches; HVPs are all-reduced
    shard_cache = True

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        precompute_data_ratio: float = 1.0,
        proj_dim: int = 100,
        max_iter: int = 100,
        norm_constant: float = 1.0,
        tol: float = 1e-7,
        regularization: float = 0.0,
        seed: int = 0,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        if not (isinstance(precompute_data_ratio, (int, float)) and 0 < precompute_data_ratio <= 1):
            msg = f"precompute_data_ratio must be in (0, 1], got {precompute_data_ratio!r}."
            raise ValueError(msg)
        for name, val in (("proj_dim", proj_dim), ("max_iter", max_iter)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                msg = f"{name} must be a positive integer, got {val!r}."
                raise ValueError(msg)
        for name, val in (("tol", tol), ("regularization", regularization)):
            if not (isinstance(val, (int, float)) and val >= 0):
                msg = f"{name} must be a number >= 0, got {val!r}."
                raise ValueError(msg)
        if not (isinstance(norm_constant, (int, float)) and norm_constant > 0):
            msg = f"norm_constant must be > 0, got {norm_constant!r}."
            raise ValueError(msg)
        self.precompute_data_ratio = precompute_data_ratio
        self.proj_dim = proj_dim
        self.max_iter = max_iter
        self.norm_constant = float(norm_constant)
        self.tol = float(tol)
        self.regularization = float(regularization)
        self.seed = seed
        #: per checkpoint: Ritz values ``(k,)`` and orthonormal Ritz vectors ``(k, p)``.
        self.eigenvalues: dict[int, Tensor] = {}
        self.eigenvectors: dict[int, Tensor] = {}

    def _data_ratio(self) -> float:
        """The fraction of the batches defining the curvature (the constructor's)."""
        return self.precompute_data_ratio

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        func, params = self._loss_and_params(ckpt_idx)
        self._check_loss(func, params)
        p = params.numel()
        evals, evecs = top_ritz_pairs(
            self.mean_hvp_operator(
                ckpt_idx, "rev-rev", self.regularization, keep_linearizations=True
            ),
            params,
            n_steps=min(self.max_iter, p),
            top_k=self.proj_dim,
            norm_constant=self.norm_constant,
            tol=self.tol,
            seed=self.seed,
            verbose=self.verbose,
            who="IFAttributorArnoldi",
            fix="pass regularization > 0 or a smaller proj_dim",
            zero_msg="The training-loss Hessian is numerically zero; Arnoldi cannot invert it.",
            stacklevel=4,
        )
        self.eigenvalues[ckpt_idx] = evals
        self.eigenvectors[ckpt_idx] = evecs

    def _ensure_cached(self, train_dataloader: Iterable) -> None:
        if not self._cached:
            msg = (
                "The Arnoldi projector has not been cached. Call "
                "attributor.cache(full_train_dataloader) before attribute/self_attribute."
            )
            raise ValueError(msg)

    def _project(self, ckpt_idx: int, rep: Tensor) -> Tensor:
        evecs = self.eigenvectors[ckpt_idx]
        scale = self.eigenvalues[ckpt_idx].abs().rsqrt()
        # (k, p) @ (p, B), transposed back: ~20% faster than (B, p) @ (p, k) for k << B
        return (evecs @ rep.to(evecs.dtype).T).T * scale

    def train_transform_digest(self, ckpt_idx: int) -> str:
        """Digest of the Ritz pairs that project the stored training rows."""
        return tensor_digest(self.eigenvalues[ckpt_idx], self.eigenvectors[ckpt_idx])

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        """``sign(lambda) U g / sqrt|lambda|``, ``(B, p) -> (B, k)``."""
        return self._project(ckpt_idx, train_rep) * self.eigenvalues[ckpt_idx].sign()

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``U g / sqrt|lambda|``, ``(B, p) -> (B, k)``."""
        return self._project(ckpt_idx, test_rep)

    def relatif_denominator(self, ckpt_idx: int, data: Any, relatif_method: str) -> Tensor:
        """RelatIF normaliser ``(B,)`` within the Arnoldi subspace.

        ``"l"``: ``sqrt(|g^T H^-1 g|)``; ``"theta"``: ``||H^-1 g|| = ||Lambda^-1 U g||``.
        """
        g = self.generate_test_rep(ckpt_idx, data)
        t = self.transform_test_rep(ckpt_idx, g)
        if relatif_method == "l":
            val = (self.transform_train_rep(ckpt_idx, g) * t).sum(dim=1).abs().sqrt()
        else:
            val = (t * self.eigenvalues[ckpt_idx].abs().rsqrt()).norm(dim=1)
        return val.clamp_min(1e-12)
