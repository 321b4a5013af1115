"""FactGraSS: factorised gradient sparsification followed by a sparse projection.

Hu et al. (2025), "GraSS: Scalable Data Attribution with Gradient Sparsification and
Sparse Projection". Each layer gradient ``G`` (``(d_out, d_in)``, bias as an extra
input column) is first sparsified on both sides by random coordinate masks of
``k' = sqrt(proj_dim_per_layer * blowup_factor)`` rows/columns (``M_out G M_in^T``,
without forming ``G``), then projected to ``proj_dim_per_layer`` coordinates by a
sparse Johnson–Lindenstrauss transform (SJLT, :mod:`dattri.func.projection`, any
device). Scores use the per-layer empirical Fisher of the compressed gradients (see
:class:`BlockProjectedIFAttributor`). A mask of ``k'`` exceeding a side's dimension
keeps that whole side. This file only chooses the compression; the pipeline is the
base class's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
from dattri.algorithm.features.block_compress import method_params
from dattri.task import AttributionTask

__all__ = ["FactGraSSAttributor"]


def _intermediate_side(k: Any, blowup_factor: Any) -> int:
    """``sqrt(k * blowup_factor)``, the mask size per side.

    Raises:
        ValueError: if a value is not a positive int or the product is not a square.
    """
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
    return side


class FactGraSSAttributor(BlockProjectedIFAttributor):
    """FactGraSS attributor: factorised random masks, then an SJLT per layer.

    The arguments other than ``proj_params`` and ``blowup_factor`` are those of
    :class:`BlockProjectedIFAttributor`.

    Args:
        proj_params: ``FactGrassProjectionParams`` (or a dict):
            ``proj_dim_per_layer`` (final dimension per layer, default 4096) and
            ``proj_seed`` (seeds both the masks and the SJLT). ``proj_type`` is not
            used: FactGraSS is always random mask + SJLT.
        blowup_factor: the intermediate (masked) dimension is
            ``proj_dim_per_layer * blowup_factor``, which must be a perfect square.

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
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int = 16,
        verbose: bool = True,
        *,
        store_dtype: str | torch.dtype | None = None,
        max_memory: int | str | None = None,
    ) -> None:
        self.proj_params, p = method_params(proj_params, "FactGrassProjectionParams", "sjlt")
        k, seed = p["proj_dim_per_layer"], p["proj_seed"]
        side = _intermediate_side(k, blowup_factor)
        self.blowup_factor = blowup_factor
        projector = {
            "proj_dim": k,
            "proj_type": "sjlt",
            "proj_seed": seed,
            "proj_max_batch_size": p["proj_max_batch_size"],
        }
        super().__init__(
            task,
            layer_names,
            hessian,
            damping,
            device,
            {"proj_dim": side, "proj_type": "random_mask", "proj_seed": seed},
            projector,
            offload,
            cache_dir,
            chunk_size,
            verbose,
            store_dtype=store_dtype,
            max_memory=max_memory,
        )
