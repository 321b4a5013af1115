"""DataInf influence functions (Kwon et al., 2024; upstream ``IFAttributorDataInf``).

The parameters are split into layers (consecutive selected parameters of the same
module, e.g. ``fc1.weight`` and ``fc1.bias``; root parameters ``weight``/``bias`` form
one layer). Per layer ``l`` the inverse Hessian is
approximated by the average of Sherman–Morrison inverses of damped rank-one Fishers,

    H_l^{-1} v ~ (1/n) sum_i (g_il g_il^T + r_l I)^{-1} v
               = (1/n) sum_i (v - (g_il . v) / (r_l + ||g_il||^2) g_il) / r_l,

with the per-sample training-loss gradients ``g_il`` of the cached data. The default
``regularization=0.0`` (upstream divides by zero there) selects the paper's layer-wise
``r_l = 0.1 * mean_i ||g_il||^2 / p_l``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from dattri.algorithm.batching import iterate
from dattri.algorithm.if_base import IFBase
from dattri.func.fisher import datainf_regularization, ifvp_datainf
from dattri.task import AttributionTask

__all__ = ["IFAttributorDataInf"]


class IFAttributorDataInf(IFBase):
    """Influence functions with DataInf's closed-form layer-wise inverse.

    ``cache`` keeps the per-sample training-loss gradients ``(n', p)`` of the first
    ``ceil(len(loader) * fim_estimate_data_ratio)`` batches per checkpoint (memory
    ``n' * p``), split into layers, and each layer's damping ``r_l``.

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names; the
            layers are the selected parameters grouped by module prefix.
        device: device for the computation.
        regularization: ``r > 0`` used for every layer, or ``0.0``/``None`` for the
            automatic layer-wise ``r_l = 0.1 * mean_i ||g_il||^2 / p_l``.
        fim_estimate_data_ratio: fraction of the cached loader's batches (the first ones)
            used, in ``(0, 1]``.
        verbose: show progress bars.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        regularization: float | None = 0.0,
        fim_estimate_data_ratio: float = 1.0,
        verbose: bool = True,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose)
        if regularization is not None and not (
            isinstance(regularization, (int, float))
            and math.isfinite(regularization)
            and regularization >= 0
        ):
            msg = f"regularization must be None or a number >= 0, got {regularization!r}."
            raise ValueError(msg)
        if not (
            isinstance(fim_estimate_data_ratio, (int, float)) and 0 < fim_estimate_data_ratio <= 1
        ):
            msg = f"fim_estimate_data_ratio must be in (0, 1], got {fim_estimate_data_ratio!r}."
            raise ValueError(msg)
        self.regularization = regularization
        self.fim_estimate_data_ratio = fim_estimate_data_ratio
        #: number of parameters of each layer (consecutive blocks of the gradient).
        self.layer_sizes: list[int] = []
        prev = None
        for name in task.selected_param_names(layer_name):
            module = name.rsplit(".", 1)[0] if "." in name else ""
            size = task.named_parameters[name].numel()
            if module == prev:
                self.layer_sizes[-1] += size
            else:
                self.layer_sizes.append(size)
            prev = module
        self._train_grads: dict[int, list[Tensor]] = {}
        #: per checkpoint, the damping ``r_l`` of every layer.
        self.layer_regularization: dict[int, list[float]] = {}

    def cache(self, full_train_dataloader: Iterable) -> None:
        """Compute and keep the per-layer training gradients of every checkpoint.

        Args:
            full_train_dataloader: the training data defining the Fisher (not shuffled).
        """
        self._cache_batches(full_train_dataloader, self.fim_estimate_data_ratio)
        super().cache(full_train_dataloader)

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        grads = torch.cat(
            [
                self.generate_train_rep(ckpt_idx, b)
                for b in iterate(self._batches, "DataInf gradients", self.verbose)
            ]
        )
        layers = list(grads.split(self.layer_sizes, dim=1))
        self._train_grads[ckpt_idx] = layers
        if self.regularization:
            regs = [float(self.regularization)] * len(layers)
        else:
            regs = [datainf_regularization(g) for g in layers]
        self.layer_regularization[ckpt_idx] = regs

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """Layer-wise DataInf inverse of every row, ``(B, p) -> (B, p)``."""
        return ifvp_datainf(
            self._train_grads[ckpt_idx], test_rep, self.layer_regularization[ckpt_idx]
        )
