"""LiSSA influence functions (Agarwal et al., 2017; upstream ``IFAttributorLiSSA``).

The recursion ``u_0 = v``, ``u_t = v + (1 - d) u_{t-1} - H_{b_t} u_{t-1} / s`` with random
mini-batch Hessians ``H_{b_t}`` has the fixed point ``u = s (H + d s I)^{-1} v``, so the
estimate ``u / s`` approximates ``(H + d s I)^{-1} v`` (``d`` = damping, ``s`` =
scaling). It is stable only when ``s`` exceeds about half the largest mini-batch
Hessian eigenvalue and needs ``recursion_depth >> s / (lambda_min + d s)`` steps.
``scaling="auto"`` estimates the largest eigenvalue by power iteration (on the
mean-loss Hessian and on a few random mini-batches) so the user need not tune it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dattri.algorithm.solve.mean_hvp import IFBase, dict_or_tuple_fields
from dattri.func.hessian import hvp_at_x, ihvp_at_x_lissa
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["IFAttributorLiSSA", "top_eigenvalue"]

_POWER_ITERS = 30
_PROBE_ITERS = 10
_AUTO_MARGIN = 1.1
_N_PROBE_BATCHES = 8


def top_eigenvalue(
    op: Callable[[Tensor], Tensor],
    p: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    iters: int = _POWER_ITERS,
) -> float:
    """Largest ``|eigenvalue|`` of a symmetric operator by power iteration.

    Args:
        op: batched matvec ``(k, p) -> (k, p)``.
        p: dimension.
        dtype: dtype of the vectors.
        device: device of the vectors.
        generator: CPU generator for the start vector.
        iters: iterations.

    Returns:
        The estimate ``|v^T op(v)|`` (a lower bound that converges to ``|lambda_max|``).
    """
    v = torch.randn(p, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = op(v.unsqueeze(0))[0]
        lam = float((v * w).sum().abs())
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return lam


class IFAttributorLiSSA(IFBase):
    """Influence functions with the LiSSA stochastic inverse-HVP estimator.

    ``transform_test_rep`` estimates ``(H + damping * scaling * I)^{-1} g`` for all rows
    of a test batch at once (each step samples ``batch_size`` cached training samples
    with a generator seeded by ``seed``, so results are reproducible). Tuple, list and
    dict batches are supported; the cached training data are concatenated per field.

    The upstream defaults (``scaling=50``, ``damping=0``) are kept for compatibility;
    they are often unstable or slow. Prefer ``scaling="auto"`` (``1.1 x`` a
    power-iteration estimate of the largest eigenvalue of the mean-loss Hessian and of
    a few ``batch_size`` mini-batch Hessians) and ``regularization=lambda`` (sets
    ``damping = lambda / scaling``, so the estimate targets ``(H + lambda I)^{-1}``
    whatever the scaling). The scaling used per checkpoint is in :attr:`scaling_`.

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names.
        device: device for the computation.
        batch_size: training samples per recursion step.
        num_repeat: independent recursions averaged.
        recursion_depth: steps per recursion.
        damping: ``d`` in ``[0, 1)``.
        scaling: ``s > 0`` or ``"auto"``.
        mode: HVP mode, ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: if given, overrides ``damping`` with ``regularization / s``.
        seed: seed of the mini-batch sampler and of the power iteration.
        verbose: show progress bars.
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory``: the shared store and
            budget of :class:`~dattri.algorithm.base.BaseInnerProductAttributor`.
    """

    #: torch.distributed: each rank runs the recursion for its share of the test batches
    shard_test_transform = True

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        num_repeat: int = 1,
        recursion_depth: int = 5000,
        damping: float = 0.0,
        scaling: float | str = 50.0,
        mode: str = "rev-rev",
        *,
        regularization: float | None = None,
        seed: int = 0,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        for name, val in (
            ("batch_size", batch_size),
            ("num_repeat", num_repeat),
            ("recursion_depth", recursion_depth),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                msg = f"{name} must be a positive integer, got {val!r}."
                raise ValueError(msg)
        if not (isinstance(damping, (int, float)) and 0 <= damping < 1):
            msg = f"damping must be in [0, 1), got {damping!r}."
            raise ValueError(msg)
        if scaling != "auto" and not (
            isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0
        ):
            msg = f"scaling must be a number > 0 or 'auto', got {scaling!r}."
            raise ValueError(msg)
        if regularization is not None and not (
            isinstance(regularization, (int, float)) and regularization >= 0
        ):
            msg = f"regularization must be None or a number >= 0, got {regularization!r}."
            raise ValueError(msg)
        if mode not in ("rev-rev", "rev-fwd"):
            msg = f"mode={mode!r} is unknown; use 'rev-rev' or 'rev-fwd'."
            raise ValueError(msg)
        self.batch_size = batch_size
        self.num_repeat = num_repeat
        self.recursion_depth = recursion_depth
        self.damping = float(damping)
        self.scaling = scaling
        self.mode = mode
        self.regularization = regularization
        self.seed = seed
        #: scaling ``s`` used for each checkpoint (after ``cache``).
        self.scaling_: dict[int, float] = {}
        #: damping ``d`` used for each checkpoint (after ``cache``).
        self.damping_: dict[int, float] = {}
        self._fields: list[Tensor] = []
        self._rebuild: Callable[[Sequence[Tensor]], Any] | None = None

    @staticmethod
    def lissa_collate_fn(sampled_input: Sequence[Tensor]) -> tuple:
        """Upstream helper: regroup ``(params, x, y, ...)`` as ``(params, (x, y, ...))``.

        Unlike upstream, the data tensors are not cast to float (labels stay integers).
        """
        return sampled_input[0], tuple(sampled_input[1:])

    def _prepare_batches(self) -> None:
        """Concatenate the kept batches per field (LiSSA samples minibatches from them)."""
        per_batch = [dict_or_tuple_fields(b) for b in self._batches]
        n_fields = len(per_batch[0][0])
        if any(len(f) != n_fields for f, _ in per_batch):
            msg = "All training batches must have the same structure (fields/keys)."
            raise ValueError(msg)
        self._fields = [torch.cat([f[j] for f, _ in per_batch]) for j in range(n_fields)]
        self._rebuild = per_batch[0][1]
        n = self._fields[0].shape[0]
        if self.batch_size > n:
            msg = f"batch_size={self.batch_size} exceeds the number of training samples ({n})."
            raise ValueError(msg)

    def _minibatch_op(
        self, func: Callable, params: Tensor, idx: Tensor
    ) -> Callable[[Tensor], Tensor]:
        batch = self._rebuild([f.index_select(0, idx.to(f.device)) for f in self._fields])
        return hvp_at_x(func, (params, batch), 0, self.mode)

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        func, params = self._loss_and_params(ckpt_idx)
        self._check_loss(func, params)
        if self.scaling == "auto":
            gen = torch.Generator().manual_seed(self.seed)
            p, n = params.numel(), self._fields[0].shape[0]
            full = self.mean_hvp_operator(ckpt_idx, self.mode)
            lam = top_eigenvalue(full, p, params.dtype, params.device, gen)
            if self.batch_size < n:
                for _ in range(_N_PROBE_BATCHES):
                    idx = torch.randperm(n, generator=gen)[: self.batch_size]
                    op = self._minibatch_op(func, params, idx)
                    lam_b = top_eigenvalue(op, p, params.dtype, params.device, gen, _PROBE_ITERS)
                    lam = max(lam, lam_b)
            if lam == 0:
                msg = "The training-loss Hessian is numerically zero; LiSSA cannot invert it."
                raise ValueError(msg)
            scaling = _AUTO_MARGIN * lam
        else:
            scaling = float(self.scaling)
        damping = self.damping
        if self.regularization is not None:
            scaling = max(scaling, 2.0 * self.regularization)
            damping = self.regularization / scaling
        self.scaling_[ckpt_idx] = scaling
        self.damping_[ckpt_idx] = damping
        if damping == 0:
            warnings.warn(
                "IFAttributorLiSSA with zero damping converges only as fast as "
                "lambda_min(H) / scaling per step; pass regularization=... (or damping) "
                "and scaling='auto' for reliable results.",
                UserWarning,
                stacklevel=3,
            )

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """LiSSA estimate of ``(H + d s I)^{-1} g`` for every row, ``(B, p)``."""
        func, params = self._loss_and_params(ckpt_idx)
        rebuild = self._rebuild

        def collate(sampled: tuple) -> tuple:
            return sampled[0], rebuild(sampled[1:])

        solver = ihvp_at_x_lissa(
            func,
            params,
            *self._fields,
            in_dims=(None,) + (0,) * len(self._fields),
            batch_size=self.batch_size,
            num_repeat=self.num_repeat,
            recursion_depth=self.recursion_depth,
            damping=self.damping_[ckpt_idx],
            scaling=self.scaling_[ckpt_idx],
            collate_fn=collate,
            mode=self.mode,
            seed=self.seed,
            verbose=self.verbose,
        )
        return solver(test_rep)
