"""Upstream's module-level IHVP solver table of ``dattri.algorithm.influence_function``.

``SUPPORTED_IHVP_SOLVER`` maps a solver name to its IHVP factory from
:mod:`dattri.func.hessian` (``ihvp_<name>(func, ...) -> f(x_tuple, v)``), LiSSA with
:func:`_lissa_collate_fn` bound, exactly as upstream dattri 0.3 exposes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor

from dattri.algorithm.if_lissa import IFAttributorLiSSA
from dattri.func.hessian import ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_lissa

__all__ = ["SUPPORTED_IHVP_SOLVER"]


def _lissa_collate_fn(sampled_input: Sequence[Tensor]) -> tuple:
    """Regroup ``(params, x, y, ...)`` as ``(params, (x, y, ...))`` for LiSSA.

    Same as :meth:`IFAttributorLiSSA.lissa_collate_fn` (upstream duplicated it at module
    level). Unlike upstream, the data tensors are not cast to float, so integer labels
    stay integers.

    Args:
        sampled_input: ``(params, *data_fields)`` of one sampled mini-batch.

    Returns:
        ``(params, tuple(data_fields))``.
    """
    return IFAttributorLiSSA.lissa_collate_fn(sampled_input)


#: Solver name -> IHVP factory ``ihvp_<name>(func, ...) -> f(x_tuple, v)`` (upstream table).
SUPPORTED_IHVP_SOLVER = {
    "explicit": ihvp_explicit,
    "cg": ihvp_cg,
    "arnoldi": ihvp_arnoldi,
    "lissa": partial(ihvp_lissa, collate_fn=_lissa_collate_fn),
}
