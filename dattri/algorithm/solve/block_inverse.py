"""The block-diagonal damped inverse of LoGra / FactGraSS / BlockProjectedIF.

One damped inverse per layer block of the compressed-gradient Fisher, each a
:class:`~dattri.func.linalg.DampedSymmetricInverse` (the library's one damped symmetric
inverse), with the relative damping ``damping * tr(F) / r`` of upstream's LoGra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dattri.func.linalg import DampedSymmetricInverse

__all__ = ["BlockInverse", "damped_fisher_inverse", "stable_inverse"]


def damped_fisher_inverse(
    fisher: Tensor, damping: float, rank: int | None = None, stacklevel: int = 3
) -> DampedSymmetricInverse:
    """``(F + damping * tr(F) / r * I)^-1`` (relative damping) as an operator.

    Args:
        fisher: symmetric PSD ``(d, d)`` matrix ``F``.
        damping: relative damping ``>= 0`` (absolute ``damping`` if the trace is 0).
        rank: ``r``, the number of eigenvalues the trace is averaged over; None = ``d``
            (upstream's convention). Pass the attainable rank of ``F`` to damp by a
            multiple of its mean non-zero eigenvalue.
        stacklevel: of the pseudo-inverse warning, as seen from the caller.

    Returns:
        A :class:`~dattri.func.linalg.DampedSymmetricInverse` (Cholesky; an
        eigen-decomposition pseudo-inverse, with a warning, when the damped matrix is
        not positive definite).

    Raises:
        ValueError: if ``rank`` is not None or a positive int.
    """
    d = fisher.shape[0]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        msg = f"rank must be None or a positive int, got {rank!r}."
        raise ValueError(msg)
    trace = float(torch.trace(fisher))
    shift = damping * trace / (d if rank is None else min(rank, d)) if trace > 0 else damping
    return DampedSymmetricInverse(
        fisher,
        shift,
        singular="pinv",
        check_finite=None,
        what=f"The damped Fisher (damping={damping})",
        fix="increase damping",
        stacklevel=stacklevel + 1,
    )


def stable_inverse(fisher: Tensor, damping: float, rank: int | None = None) -> Tensor:
    """Dense inverse of ``fisher + damping * tr(fisher) / r * I`` (upstream's helper).

    Args:
        fisher: symmetric PSD ``(d, d)`` matrix.
        damping: relative damping ``>= 0`` (absolute ``damping`` if the trace is 0).
        rank: see :func:`damped_fisher_inverse`.

    Returns:
        ``(d, d)`` symmetric inverse, same dtype as ``fisher`` (the pseudo-inverse,
        with a warning, when the damped matrix is not positive definite).
    """
    inv = damped_fisher_inverse(fisher, damping, rank, stacklevel=3).matrix()
    return (inv + inv.T) / 2


class BlockInverse:
    """Block-diagonal ``diag_l (F_l + lambda_l I)^-1`` applied to ``(m, D)`` rows.

    ``rows @ op`` multiplies each layer's columns by its (symmetrised, dense) inverse
    in ``dtype``; an identity block is None. Results keep the dtype of ``rows``.

    Args:
        offsets: ``(start, stop)`` columns of every layer.
        blocks: per layer, a :class:`~dattri.func.linalg.DampedSymmetricInverse` or None.
        dtype: dtype of the products (float32, or float64 for float64 models).
    """

    def __init__(
        self,
        offsets: Sequence[tuple[int, int]],
        blocks: Sequence[DampedSymmetricInverse | None],
        dtype: torch.dtype,
    ) -> None:
        self.offsets = list(offsets)
        self.inverses = list(blocks)
        self.matrices: list[Tensor | None] = []
        for block in blocks:
            mat = None if block is None else block.matrix()
            self.matrices.append(None if mat is None else ((mat + mat.T) / 2).to(dtype))

    def __rmatmul__(self, rows: Tensor) -> Tensor:
        if all(m is None for m in self.matrices):
            return rows
        parts = []
        for (s, e), mat in zip(self.offsets, self.matrices, strict=True):
            block = rows[:, s:e]
            parts.append(block if mat is None else (block.to(mat.dtype) @ mat).to(rows.dtype))
        return torch.cat(parts, dim=1)
