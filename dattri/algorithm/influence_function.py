r"""Influence-function attributors (Koh & Liang, 2017) and their approximations.

Formulas
--------
Every class scores a training sample ``z_i`` against a test sample ``z_j`` by

.. math::

    S_{ij} = \frac{1}{K} \sum_{k=1}^{K} \nabla_\theta L(z_i; \theta_k)^\top
             (H_k + \lambda I)^{-1} \nabla_\theta f(z_j; \theta_k)

(no minus sign, no ``1/n``: larger = removing ``z_i`` would increase the test loss),
where ``L`` is ``task.loss_func`` on the single sample (seen as a batch of one,
``(1, ...)``), ``f`` is ``task.target_func``, ``k`` runs over the checkpoints (plain mean)
and ``H_k`` is the Hessian of the **mean** training loss over the whole cached loader,

.. math::

    H = \sum_b \frac{B_b}{n} \nabla^2_\theta\, \mathrm{loss\_func}(\theta, \mathrm{batch}_b),

i.e. ``loss_func`` called on a whole batch must return the batch's mean loss. For a model
trained to the minimum of the mean loss, leaving ``z_i`` out changes the test loss by
about ``S_ij / (n - 1)``. The classes differ in how ``(H + lambda I)^{-1}`` is applied:

* :class:`IFAttributorExplicit`: dense ``(p, p)`` Hessian, factorised once in ``cache``.
* :class:`IFAttributorCG`: batched conjugate gradient on the mean-loss HVP (stops at the
  relative residual ``tol`` or after ``max_iter`` iterations).
* :class:`IFAttributorLiSSA`: the stochastic recursion
  ``u <- v + (1 - d) u - H_batch u / s`` whose fixed point gives
  ``u / s = (H + d s I)^{-1} v`` (``d`` = damping, ``s`` = scaling, optionally
  ``scaling="auto"`` from a power-iteration estimate of the largest eigenvalue).
* :class:`IFAttributorArnoldi`: top-``proj_dim`` Ritz pairs ``(lambda_r, u_r)`` of the
  mean-loss Hessian; both sides are projected, ``S = sum_r (u_r^T g_i)(u_r^T g_j) /
  lambda_r`` (Schioppa et al., 2022).
* :class:`IFAttributorDataInf`: layer-wise
  ``H_l^{-1} ~ (1/n) sum_i (g_il g_il^T + r_l I)^{-1}`` by Sherman–Morrison (Kwon et al.,
  2024), default ``r_l = 0.1 * mean_i ||g_il||^2 / p_l``.
* :class:`IFAttributorEKFAC`: per ``nn.Linear`` module, the eigenvalue-corrected
  Kronecker-factored Fisher ``(Q_S ⊗ Q_A) diag(Lambda) (Q_S ⊗ Q_A)^T`` with
  ``Lambda`` fitted to the squared rotated per-sample gradients (George et al., 2018;
  Grosse et al., 2023), inverted with a damping (default ``0.1 * mean(Lambda)``).

RelatIF (Barshan et al., 2020), ``relatif_method``: ``"l"`` divides row ``i`` by
``sqrt(|g_i^T H^{-1} g_i|)``, ``"theta"`` by ``||H^{-1} g_i||`` (``g_i`` = target
gradient of the training sample).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dattri.algorithm.if_arnoldi import IFAttributorArnoldi
from dattri.algorithm.if_datainf import IFAttributorDataInf
from dattri.algorithm.if_ekfac import IFAttributorEKFAC
from dattri.algorithm.if_lissa import IFAttributorLiSSA
from dattri.algorithm.runtime.batching import iterate
from dattri.algorithm.solve.inverses import CGInverse
from dattri.algorithm.solve.mean_hvp import IFBase
from dattri.algorithm.solve.preconditioners import (
    build_preconditioner,
    check_preconditioner,
    check_subsample,
)
from dattri.func.hessian import cg_solve
from dattri.func.linalg import DampedSymmetricInverse
from dattri.func.minres import minres_solve
from dattri.task import AttributionTask

__all__ = [
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorDataInf",
    "IFAttributorEKFAC",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
]

_MODES = ("rev-rev", "rev-fwd")
_LARGE_P = 20_000


def _check_reg(value: float, name: str = "regularization") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        msg = f"{name} must be a number >= 0, got {value!r}."
        raise ValueError(msg)
    return float(value)


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        msg = f"mode={mode!r} is unknown; use one of {_MODES}."
        raise ValueError(msg)
    return mode


def _Factorization(mat: Tensor) -> DampedSymmetricInverse:
    """Factorise a symmetric ``(p, p)`` Hessian once and ``.solve`` many right-hand sides.

    :class:`~dattri.func.linalg.DampedSymmetricInverse` in float64 (Cholesky when
    positive definite, otherwise an eigendecomposition, so an indefinite but
    non-singular matrix is still inverted exactly). A numerically singular matrix
    raises ``ValueError``; one too ill-conditioned for the dtype it was computed in
    warns.
    """
    cutoff = mat.shape[0] * torch.finfo(torch.float64).eps
    return DampedSymmetricInverse(
        mat,
        dtype=torch.float64,
        rtol=cutoff,
        pivot_rtol=cutoff,
        check_finite="check the loss, data and checkpoint.",
        warn_ill_conditioned=True,
        what="The Hessian + regularization * I",
        fix="pass regularization > 0 (e.g. 1e-3 times the mean Hessian diagonal)",
        stacklevel=4,
    )


class IFAttributorExplicit(IFBase):
    """Influence functions with the explicit, factorised Hessian of the mean loss.

    ``cache`` builds the ``(p, p)`` Hessian of the mean training loss over every cached
    batch (batched HVPs of identity rows, batch-size weighted), adds ``regularization *
    I`` and factorises it once per checkpoint; each test batch is then one solve. Only
    practical for ``p`` up to a few thousand (select parameters with ``layer_name``).

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names.
        device: device for the computation.
        regularization: ``lambda >= 0`` added to the Hessian diagonal.
        verbose: show progress bars.
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory``: the shared store and
            budget of :class:`~dattri.algorithm.base.BaseInnerProductAttributor`.
    """

    shard_cache = True  # torch.distributed: each rank holds its batches, HVPs summed

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        regularization: float = 0.0,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        self.regularization = _check_reg(regularization)
        self._factors: dict[int, DampedSymmetricInverse] = {}

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        self._factors[ckpt_idx] = _Factorization(self.hessian(ckpt_idx))

    def hessian(self, ckpt_idx: int = 0) -> Tensor:
        """Dense ``H + regularization * I`` of the mean cached training loss, ``(p, p)``.

        Args:
            ckpt_idx: checkpoint index.

        Returns:
            The ``(p, p)`` matrix.
        """
        if not self._batches:
            msg = "Call cache(full_train_dataloader) before hessian()."
            raise ValueError(msg)
        func, params = self._loss_and_params(ckpt_idx)
        self._check_loss(func, params)
        p = params.numel()
        if p > _LARGE_P:
            warnings.warn(
                f"IFAttributorExplicit builds a dense {p} x {p} Hessian; select parameters "
                "with layer_name or use IFAttributorCG / IFAttributorArnoldi.",
                UserWarning,
                stacklevel=3,
            )
        op = self.mean_hvp_operator(ckpt_idx, "rev-rev", self.regularization)
        chunk = max(1, min(p, 2**22 // p))
        eye = torch.eye(p, dtype=params.dtype, device=params.device)
        starts = range(0, p, chunk)
        rows = [op(eye[s : s + chunk]) for s in iterate(starts, "Hessian rows", self.verbose)]
        return torch.cat(rows)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(H + lambda I)^{-1} g`` for every row, ``(B, p) -> (B, p)``."""
        return self._factors[ckpt_idx].solve(test_rep)


class IFAttributorCG(IFBase):
    """Influence functions with batched conjugate gradient on the mean-loss HVP.

    For each test batch, all ``B`` systems ``(H + lambda I) x = g_j`` are solved together
    (one batched HVP over the cached loader per iteration, per-row step sizes), starting
    from 0; a row stops when ``||g_j - (H + lambda I) x|| <= tol * ||g_j||``, the solve
    after ``max_iter`` iterations. ``H + lambda I`` must be positive definite. Convergence
    of the last solve is in :attr:`last_cg_info`; a warning names rows that did not
    converge (raise ``max_iter``: CG needs about ``sqrt(cond(H))`` iterations per digit).
    With ``preconditioner`` (``"diagonal"``, ``"kfac"``, ``"ekfac"``, ``"spectral"`` or a
    callable ``(B, p) -> (B, p)``, see :mod:`dattri.algorithm.solve.preconditioners`),
    preconditioned CG reaches the same solve in about ``sqrt(cond(P H))`` iterations per
    digit. ``"spectral"`` (built in :meth:`cache` from ``preconditioner_rank`` batched
    HVPs, reused for every test batch) is the one that cuts the products on MLPs;
    ``"kfac-spectral"``, ``"ekfac-spectral"`` and ``"gkfac-spectral"`` deflate the
    K-FAC / EK-FAC / true-Fisher K-FAC preconditioned operator instead (measured in
    ``benchmarks/results/bench_pcg.md``: no better than ``"spectral"`` on our MLPs).

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names.
        device: device for the computation.
        max_iter: maximum CG iterations.
        tol: relative-residual tolerance.
        mode: HVP mode, ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: ``lambda >= 0``.
        verbose: show progress bars.
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory``: the shared store and
            budget of :class:`~dattri.algorithm.base.BaseInnerProductAttributor`.
        preconditioner: None (plain CG), ``"diagonal"``, ``"kfac"``, ``"ekfac"``,
            ``"spectral"``, ``"kfac-spectral"``, ``"ekfac-spectral"``,
            ``"gkfac-spectral"`` or a callable ``M^{-1}`` on ``(B, p)`` rows.
        preconditioner_damping: damping of the built preconditioner (default:
            ``regularization`` if positive, else ``1e-3`` times its mean curvature;
            unused by ``"spectral"``).
        preconditioner_rank: HVPs (Krylov basis size) of the ``"*spectral"`` kinds.
        preconditioner_keep: ``"spectral"`` only: keep this many of the
            ``preconditioner_rank`` Ritz pairs (largest ``|eig(H)|``, the best converged;
            a cheaper ``P``); None keeps all. A basis ~1.5x the number of
            eigenvalues of ``H`` above ``regularization``, keeping those, leaves CG about
            5 products per solve (``rank=1536, keep=1024`` on the benchmark MLP of ~100k
            parameters).
        preconditioner_subsample: ``"spectral"`` only: None (build from the full-data
            Hessian) or the fraction in ``(0, 1]`` of the cached training batches (drawn
            with a fixed seed) whose Hessian builds it; each product then costs that
            fraction of a full one (``preconditioner.hvp_equivalents``). The solve is
            still the full-data one. Not faster on the benchmark MLPs
            (``benchmarks/results/bench_pcg.md``).
        solver: ``"cg"`` or ``"minres"`` (:func:`dattri.func.minres.minres_solve`: the same
            solve by residual minimisation, robust when ``H + lambda I`` is indefinite;
            same stopping rule and :attr:`last_cg_info`).
    """

    shard_cache = True  # torch.distributed: each rank holds its batches, HVPs summed

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        max_iter: int = 10,
        tol: float = 1e-7,
        mode: str = "rev-rev",
        regularization: float = 0.0,
        verbose: bool = True,
        *,
        preconditioner: str | Callable[[Tensor], Tensor] | None = None,
        preconditioner_damping: float | None = None,
        preconditioner_rank: int = 192,
        preconditioner_keep: int | None = None,
        preconditioner_subsample: float | None = None,
        solver: str = "cg",
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            msg = f"max_iter must be a positive integer, got {max_iter!r}."
            raise ValueError(msg)
        self.max_iter = max_iter
        self.tol = _check_reg(tol, "tol")
        self.mode = _check_mode(mode)
        self.regularization = _check_reg(regularization)
        self._inverses: dict[int, CGInverse] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self.last_cg_info = None
        self.preconditioner = check_preconditioner(preconditioner)
        self.preconditioner_damping = preconditioner_damping
        if (
            isinstance(preconditioner_rank, bool)
            or not isinstance(preconditioner_rank, int)
            or preconditioner_rank < 1
        ):
            msg = f"preconditioner_rank must be a positive integer, got {preconditioner_rank!r}."
            raise ValueError(msg)
        self.preconditioner_rank = preconditioner_rank
        if preconditioner_keep is not None and (
            isinstance(preconditioner_keep, bool)
            or not isinstance(preconditioner_keep, int)
            or preconditioner_keep < 1
            or self.preconditioner != "spectral"
        ):
            msg = (
                "preconditioner_keep must be None or a positive integer, with "
                f"preconditioner='spectral'; got {preconditioner_keep!r} with "
                f"preconditioner={self.preconditioner!r}."
            )
            raise ValueError(msg)
        self.preconditioner_keep = preconditioner_keep
        self.preconditioner_subsample = check_subsample(
            preconditioner_subsample, self.preconditioner
        )
        if solver not in ("cg", "minres"):
            msg = f"solver must be 'cg' or 'minres', got {solver!r}."
            raise ValueError(msg)
        self.solver = solver

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        func, params = self._loss_and_params(ckpt_idx)
        self._check_loss(func, params)
        self._dtypes[ckpt_idx] = params.dtype
        op = self.mean_hvp_operator(ckpt_idx, self.mode, self.regularization)
        precond = None
        if self.preconditioner is not None:
            precond = build_preconditioner(
                self,
                self.preconditioner,
                ckpt_idx,
                self.preconditioner_damping,
                self.regularization,
                operator=op,
                rank=self.preconditioner_rank,
                keep=self.preconditioner_keep,
                subsample=self.preconditioner_subsample,
            )
        solve = minres_solve if self.solver == "minres" else cg_solve
        self._inverses[ckpt_idx] = CGInverse(
            op, self.max_iter, self.tol, preconditioner=precond, solver=solve
        )

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """Batched CG solve of ``(H + lambda I) x = g`` for every row, ``(B, p)``."""
        rhs = test_rep.to(self._dtypes[ckpt_idx])
        inverse = self._inverses[ckpt_idx]
        sol = inverse.solve(rhs)
        info = self.last_cg_info = inverse.last_info
        info.preconditioner_hvps = int(getattr(inverse.preconditioner, "hvps", 0))
        if not bool(info.converged.all()):
            warnings.warn(
                f"IFAttributorCG: {int((~info.converged).sum())} of {rhs.shape[0]} solves did "
                f"not reach tol={self.tol:g} in max_iter={self.max_iter} iterations (largest "
                f"relative residual {float(info.residuals.max()):.2e}); increase max_iter "
                "or regularization.",
                UserWarning,
                stacklevel=2,
            )
        return sol.to(test_rep.dtype)


# Upstream's module-level names (solver table and LiSSA collate function).
from dattri.algorithm.solve.ihvp_solvers import SUPPORTED_IHVP_SOLVER, _lissa_collate_fn  # noqa: E402, F401

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs
