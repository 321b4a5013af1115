"""EK-FAC influence functions (George et al., 2018; Grosse et al., 2023).

For every selected ``nn.Linear`` module (weight ``(d_out, d_in)``, optional bias) or
``transformers`` GPT-2 ``Conv1D`` (weight stored as ``(d_in, d_out)``, handled in the
``nn.Linear`` orientation through its transpose), the
per-sample gradient is the matrix ``G_i = sum_t ds_it a_it^T`` ``(d_out, d_in')`` (``a``
with a trailing 1 when the bias is trained, so the bias is the last column; ``t`` runs
over sequence positions of 3-D inputs). From the cached training data:

* K-FAC factors ``A = E[sum_t a a^T]``, ``S = E[sum_t ds ds^T]`` and their eigenvectors
  ``Q_A``, ``Q_S`` (columns);
* eigenvalue correction ``Lambda = E_i[(Q_S^T G_i Q_A)^2]`` (elementwise);
* inverse ``V -> Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T``, i.e.
  ``(F_ekfac + damping I)^{-1}`` of the eigenvalue-corrected empirical Fisher of the
  per-sample losses, which approximates the Hessian of the mean training loss.

Default damping (``0.0`` or ``None``): ``0.1 * mean(Lambda)`` per module (Kronfluence's
heuristic). The statistics come from per-sample layer factors captured by hooks, so
``loss_func`` must reach the module parameters only through the modules' forward (an
L2 penalty inside the loss is not representable: pass it as ``damping`` instead).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dattri.algorithm.runtime.batching import iterate, move_to_device
from dattri.algorithm.runtime.distributed import all_reduce_sum, is_distributed, shard_range
from dattri.algorithm.runtime.validation import check_task, resolve_regularization
from dattri.algorithm.solve.mean_hvp import IFBase
from dattri.algorithm.store.memmap_store import iter_batches
from dattri.func.fisher import (
    ekfac_eigenvalues,
    ekfac_ifvp,
    kfac_factors,
    linear_grad_to_matrix,
    matrix_to_linear_grad,
)
from dattri.func.layer_grads import layer_kind, matrix_shape
from dattri.func.per_sample_grad import per_sample_layer_factors
from dattri.loss_checks import explained_errors
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["IFAttributorEKFAC"]


def _linear_modules(
    task: AttributionTask, module_name: str | Sequence[str] | None
) -> dict[str, nn.Linear]:
    """Validate ``module_name`` and return the selected ``nn.Linear`` modules."""
    modules = dict(task.get_model().named_modules())
    valid = [n for n, m in modules.items() if layer_kind(m) in ("linear", "conv1d")]
    if module_name is None:
        names = [n for n in valid if modules[n].weight.requires_grad]
        if not names:
            msg = (
                "The model has no trainable nn.Linear (or transformers Conv1D) module; "
                "EK-FAC supports those layers only."
            )
            raise ValueError(msg)
    elif isinstance(module_name, str):
        names = [module_name]
    elif isinstance(module_name, Sequence) and all(isinstance(n, str) for n in module_name):
        names = list(module_name)
    else:
        msg = f"module_name must be None, a module name or a list of names, got {module_name!r}."
        raise TypeError(msg)
    bad = [n for n in names if n not in valid]
    if bad or not names or len(set(names)) != len(names):
        msg = (
            f"module_name {names} must list distinct nn.Linear/Conv1D modules of the model; "
            f"valid names: {valid}."
        )
        raise ValueError(msg)
    for n in names:
        if not modules[n].weight.requires_grad:
            msg = f"The weight of module {n!r} is frozen (requires_grad=False)."
            raise ValueError(msg)
    return {n: modules[n] for n in names}


class IFAttributorEKFAC(IFBase):
    """Influence functions with an EK-FAC inverse over ``nn.Linear`` modules.

    Scores use the gradients of the selected modules' weights and (trainable) biases
    only. Several checkpoints are supported (statistics per checkpoint, scores averaged).

    Args:
        task: the attribution task.
        module_name: None (every ``nn.Linear`` with a trainable weight), a module name
            or a list of names (``model.named_modules()`` keys).
        device: device for the computation.
        damping: ``> 0`` added to the corrected eigenvalues, or ``0.0``/``None`` for
            ``0.1 * mean(Lambda)`` per module (upstream's name).
        verbose: show progress bars.
        regularization: the library-wide name of ``damping`` (pass one of the two).
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory``: the shared store and
            budget of :class:`~dattri.algorithm.base.BaseInnerProductAttributor`.
    """

    mean_batch_loss = False  # per-sample gradients only: the reduction cancels
    keeps_batches = False  # the factors stream the loader

    def __init__(
        self,
        task: AttributionTask,
        module_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        damping: float | None = 0.0,
        verbose: bool = True,
        *,
        regularization: float | None = None,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        check_task(task)
        modules = _linear_modules(task, module_name)
        trainable = set(task.param_names)

        def pname(module: str, attr: str) -> str:
            return f"{module}.{attr}" if module else attr

        self._bias = {n: pname(n, "bias") in trainable for n in modules}
        layer_name = []
        for n in modules:
            layer_name += [pname(n, "weight")] + ([pname(n, "bias")] if self._bias[n] else [])
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        damping = resolve_regularization(regularization, damping, "damping", 0.0)
        if damping is not None and not (
            isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0
        ):
            msg = f"damping must be None or a number >= 0, got {damping!r}."
            raise ValueError(msg)
        self.module_name = list(modules)
        self.damping = damping
        self._shapes = {n: matrix_shape(m, with_bias=False) for n, m in modules.items()}
        #: modules whose weight is stored transposed, ``(d_in, d_out)`` (Conv1D).
        self._transposed = {n: layer_kind(m) == "conv1d" for n, m in modules.items()}
        self._max_iter: int | None = None
        #: per checkpoint ``{module: (Q_A, Q_S, Lambda, damping)}``.
        self.factors: dict[int, dict[str, tuple[Tensor, Tensor, Tensor, float]]] = {}

    def cache(self, full_train_dataloader: Iterable, max_iter: int | None = None) -> None:
        """Estimate the EK-FAC factors of every checkpoint (two passes over the data).

        Args:
            full_train_dataloader: the training data (not shuffled).
            max_iter: use only the first ``max_iter`` batches (default: all).
        """
        if max_iter is not None and (
            isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
        ):
            msg = f"max_iter must be None or a positive integer, got {max_iter!r}."
            raise ValueError(msg)
        self._max_iter = max_iter
        super().cache(full_train_dataloader)

    def _factor_batches(self, ckpt_idx: int, loader: Iterable, desc: str) -> Iterable:
        """Yield ``(B, {module: (a, ds)})`` for the first ``max_iter`` batches."""
        self.task.load_checkpoint(ckpt_idx)
        model = self.task.get_model()
        params = self.task.get_param_dict(ckpt_idx)
        total = None
        if hasattr(loader, "__len__"):
            total = len(loader) if self._max_iter is None else min(len(loader), self._max_iter)
        if is_distributed():  # this rank's contiguous share; statistics summed later
            if total is None:
                msg = "EK-FAC over torch.distributed ranks needs len(full_train_dataloader)."
                raise ValueError(msg)
            mine = list(shard_range(total))
            if not mine:
                msg = (
                    f"full_train_dataloader has {total} batch(es), fewer than the "
                    "torch.distributed world size: use smaller batches or fewer processes."
                )
                raise ValueError(msg)
            pairs = iter_batches(loader, mine)
            total = len(mine)
        else:
            pairs = enumerate(loader)
        for step, batch in iterate(pairs, desc, self.verbose, total=total):
            if self._max_iter is not None and step >= self._max_iter:
                break
            with explained_errors(model, batch, f"batch {step} of full_train_dataloader"):
                factors = per_sample_layer_factors(
                    model,
                    self.task.original_loss_func,
                    params,
                    move_to_device(batch, self.device),
                    self.module_name,
                    keep_batch_dim=True,
                    bias_column=True,
                )
            out = {}
            for n, (a, ds) in factors.items():
                has_bias_col = a.shape[-1] == self._shapes[n][1] + 1
                if has_bias_col and not self._bias[n]:
                    a = a[..., :-1]
                out[n] = (a, ds)
            yield next(iter(out.values()))[0].shape[0], out

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        cov: dict[str, list] = {n: [0.0, 0.0] for n in self.module_name}
        count = 0
        for size, factors in self._factor_batches(ckpt_idx, full_train_dataloader, "EK-FAC cov"):
            for n, (a, ds) in factors.items():
                cov_a, cov_s = kfac_factors(a, ds)
                cov[n][0] = cov[n][0] + size * cov_a
                cov[n][1] = cov[n][1] + size * cov_s
            count += size
        cov, count = all_reduce_sum(cov), all_reduce_sum(count)
        eig = {}
        for n, (cov_a, cov_s) in cov.items():
            q_a = torch.linalg.eigh(0.5 * (cov_a + cov_a.T) / count)[1]
            q_s = torch.linalg.eigh(0.5 * (cov_s + cov_s.T) / count)[1]
            eig[n] = (q_a, q_s)
        lam: dict[str, Tensor | float] = dict.fromkeys(self.module_name, 0.0)
        for size, factors in self._factor_batches(
            ckpt_idx, full_train_dataloader, "EK-FAC eigenvalues"
        ):
            for n, (a, ds) in factors.items():
                lam[n] = lam[n] + size * ekfac_eigenvalues(a, ds, *eig[n])
        lam = all_reduce_sum(lam)
        result = {}
        for n in self.module_name:
            lam_n = lam[n] / count
            damp = float(self.damping) if self.damping else 0.1 * float(lam_n.mean())
            if not damp > 0:
                msg = (
                    f"EK-FAC eigenvalues of module {n!r} are all zero (zero gradients); "
                    "pass damping > 0."
                )
                raise ValueError(msg)
            result[n] = (eig[n][0], eig[n][1], lam_n, damp)
        self.factors[ckpt_idx] = result

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """EK-FAC inverse of every row, ``(B, p) -> (B, p)`` (modules in order)."""
        outs = []
        offset = 0
        for n in self.module_name:
            q_a, q_s, lam, damp = self.factors[ckpt_idx][n]
            d_out, d_in = self._shapes[n]
            w = test_rep[:, offset : offset + d_out * d_in]
            offset += d_out * d_in
            b = None
            if self._bias[n]:
                b = test_rep[:, offset : offset + d_out]
                offset += d_out
            w = w.to(lam.dtype)
            if self._transposed[n]:  # Conv1D weight (d_in, d_out) -> (d_out, d_in)
                w = w.reshape(-1, d_in, d_out).transpose(1, 2)
            mat = linear_grad_to_matrix(w, None if b is None else b.to(lam.dtype), d_out)
            res_w, res_b = matrix_to_linear_grad(
                ekfac_ifvp(mat, q_a, q_s, lam, damp), self._bias[n]
            )
            if self._transposed[n]:
                res_w = res_w.transpose(1, 2)
            outs.append(res_w.reshape(res_w.shape[0], -1))
            if res_b is not None:
                outs.append(res_b)
        return torch.cat(outs, dim=1).to(test_rep.dtype)
