"""LoGra: influence functions on Kronecker-factored low-rank gradient projections.

Choe et al. (2024), "What is Your Data Worth to GPT?". Each layer gradient ``G``
(``(d_out, d_in)``, bias as an extra input column) is compressed to
``P_out G P_in^T`` with Gaussian factors of ``k = sqrt(proj_dim_per_layer)`` rows each
(so ``proj_dim_per_layer`` coordinates per layer), computed from layer activations and
output gradients without forming ``G``. Scores use the per-layer empirical Fisher of
the compressed gradients (see :class:`BlockProjectedIFAttributor`). This file only
chooses the compression; the pipeline is the base class's.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
from dattri.algorithm.features.block_compress import FACTOR_TYPES, method_params
from dattri.task import AttributionTask

__all__ = ["LoGraAttributor"]


def perfect_square_root(value: Any, what: str) -> int:
    """Integer square root of a positive perfect square.

    Args:
        value: the number.
        what: text naming the value in errors.

    Returns:
        ``sqrt(value)``.

    Raises:
        ValueError: If ``value`` is not a positive int or not a perfect square.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{what} must be a positive int, got {value!r}."
        raise ValueError(msg)
    root = math.isqrt(value)
    if root * root != value:
        msg = (
            f"{what} = {value} must be a perfect square (k_out = k_in = sqrt of it), "
            f"e.g. {root * root} or {(root + 1) ** 2}."
        )
        raise ValueError(msg)
    return root


class LoGraAttributor(BlockProjectedIFAttributor):
    """LoGra attributor: Gaussian Kronecker factors, no second stage.

    Every argument but ``proj_params`` is that of :class:`BlockProjectedIFAttributor`.

    Args:
        proj_params: ``LoGraProjectionParams`` (or a dict): ``proj_dim_per_layer``
            (perfect square, default 4096 -> 64 x 64 factors), ``proj_seed``,
            ``proj_type`` of the factors (``"normal"`` default, ``"rademacher"``,
            ``"random_mask"``, or ``"identity"`` = exact full layer gradients, for
            which ``proj_dim_per_layer`` is not used).

    Raises:
        ValueError: if ``proj_dim_per_layer`` is not a perfect square.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_names: str | Sequence[str] | None = None,
        hessian: str = "eFIM",
        damping: float | None = None,
        device: str | torch.device = "cpu",
        proj_params: Any = None,
        offload: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int = 16,
        verbose: bool = True,
        *,
        store_dtype: str | torch.dtype | None = None,
        max_memory: int | str | None = None,
    ) -> None:
        self.proj_params, p = method_params(proj_params, "LoGraProjectionParams", "normal")
        if p["proj_type"] not in FACTOR_TYPES:
            msg = (
                f"LoGra projects with Kronecker factors; proj_type must be one of "
                f"{FACTOR_TYPES}, got {p['proj_type']!r}."
            )
            raise ValueError(msg)
        dim = p["proj_dim_per_layer"]
        k = None if p["proj_type"] == "identity" else perfect_square_root(dim, "proj_dim_per_layer")
        sparsifier = {"proj_dim": k, "proj_type": p["proj_type"], "proj_seed": p["proj_seed"]}
        super().__init__(
            task,
            layer_names,
            hessian,
            damping,
            device,
            sparsifier,
            None,
            offload,
            cache_dir,
            chunk_size,
            verbose,
            store_dtype=store_dtype,
            max_memory=max_memory,
        )
        if k is None:
            return
        modules = dict(self.model.named_modules())
        sizes = {n: sum(q.numel() for q in modules[n].parameters()) for n in self.layer_names}
        small = {n: s for n, s in sizes.items() if s < dim}
        if small:
            warnings.warn(
                f"LoGra: proj_dim_per_layer={dim} exceeds the number "
                f"of parameters of layer(s) {small}: the projection is larger than the "
                "gradient it compresses (memory and time grow as proj_dim_per_layer^2 "
                "per layer for nothing). Pass a proj_dim_per_layer below the layer "
                "sizes, or proj_type='identity'.",
                UserWarning,
                stacklevel=2,
            )
