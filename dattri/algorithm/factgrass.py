"""FactGraSS: factorised gradient sparsification followed by a sparse projection.

Hu et al. (2025), "GraSS: Scalable Data Attribution with Gradient Sparsification and
Sparse Projection". Each layer gradient ``G`` (``(d_out, d_in)``, bias as an extra
input column) is first sparsified on both sides by random coordinate masks of
``k' = sqrt(proj_dim_per_layer * blowup_factor)`` rows/columns (``M_out G M_in^T``,
without forming ``G``), then projected to ``proj_dim_per_layer`` coordinates by a
sparse Johnson–Lindenstrauss transform (SJLT, :mod:`dattri.func.projection`, any
device). Scores use the per-layer empirical Fisher of the compressed gradients (see
:class:`BlockProjectedIFAttributor`). A mask of ``k'`` exceeding a side's dimension
keeps that whole side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
from dattri.algorithm.features.block_compress import read_params
from dattri.task import AttributionTask

__all__ = ["FactGraSSAttributor"]

_DEFAULTS = {
    "proj_dim_per_layer": 4096,
    "proj_type": "sjlt",
    "proj_seed": 0,
    "proj_max_batch_size": 64,
}


def _default_params() -> Any:
    from dattri.params.projection import FactGrassProjectionParams

    return FactGrassProjectionParams()


class FactGraSSAttributor(BlockProjectedIFAttributor):
    """FactGraSS attributor.

    Args:
        task: the attribution task (eager ``loss(model, batch, device)`` or functional
            ``loss(params, data)``; see :class:`BlockProjectedIFAttributor`).
        layer_names: ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` module names; None =
            every ``nn.Linear``.
        hessian: ``"eFIM"`` or ``"Identity"``.
        damping: relative damping ``damping * tr(F)/d`` (upstream's meaning); None =
            automatic, the mean non-zero eigenvalue of each layer's Fisher (see
            :data:`~dattri.algorithm.block_projected_if.DEFAULT_DAMPING`).
        device: compute device.
        proj_params: ``FactGrassProjectionParams`` (or a dict):
            ``proj_dim_per_layer`` (final dimension per layer, default 4096) and
            ``proj_seed`` (seeds both the masks and the SJLT). ``proj_type`` is not
            used: FactGraSS is always random mask + SJLT.
        blowup_factor: the intermediate (masked) dimension is
            ``proj_dim_per_layer * blowup_factor``, which must be a perfect square.
        offload: ``"none"``, ``"cpu"`` or ``"disk"``.
        cache_dir: folder for ``offload="disk"``.
        chunk_size: training batches streamed together from the store.
        verbose: show progress bars.

    Raises:
        ValueError: if ``intermediate_dim = proj_dim_per_layer * blowup_factor`` is
            not a perfect square, or the dimensions are not positive ints.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_names: str | Sequence[str] | None = None,
        hessian: str = "eFIM",
        damping: float | None = None,
        device: str | torch.device = "cpu",
        proj_params: Any = None,
        blowup_factor: int = 4,
        offload: str = "cpu",
        cache_dir: str | Path | None = None,
        chunk_size: int = 16,
        verbose: bool = True,
    ) -> None:
        self.proj_params = proj_params if proj_params is not None else _default_params()
        p = read_params(self.proj_params, _DEFAULTS, "proj_params")
        k = p["proj_dim_per_layer"]
        for value, what in ((k, "proj_dim_per_layer"), (blowup_factor, "blowup_factor")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{what} must be a positive int, got {value!r}."
                raise ValueError(msg)
        intermediate = k * blowup_factor
        side = math.isqrt(intermediate)
        if side * side != intermediate:
            msg = (
                f"intermediate_dim (proj_dim_per_layer * blowup_factor = {k} * "
                f"{blowup_factor} = {intermediate}) must be a perfect square for the "
                "factorised mask; change proj_dim_per_layer or blowup_factor."
            )
            raise ValueError(msg)
        self.blowup_factor = blowup_factor
        seed = p["proj_seed"]
        super().__init__(
            task,
            layer_names=layer_names,
            hessian=hessian,
            damping=damping,
            device=device,
            sparsifier_params={"proj_dim": side, "proj_type": "random_mask", "proj_seed": seed},
            projector_params={
                "proj_dim": k,
                "proj_type": "sjlt",
                "proj_seed": seed,
                "proj_max_batch_size": p["proj_max_batch_size"],
            },
            offload=offload,
            cache_dir=cache_dir,
            chunk_size=chunk_size,
            verbose=verbose,
        )
