"""Iterative inverses as operators.

:class:`CGInverse` wraps any symmetric operator ``A`` (e.g. the mean-loss
:class:`~dattri.algorithm.solve.mean_hvp.MeanLossHVP`) and applies ``A^{-1}`` by batched,
optionally preconditioned, conjugate gradient (:func:`~dattri.func.hessian.cg_solve`):
``inv.solve(rows)`` for ``(k, p)`` rows, ``inv @ v`` for ``(p,)``/``(p, k)``, the same
interface as the direct inverse
(:class:`~dattri.func.linalg.DampedSymmetricInverse`), so a method can swap one for
the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from dattri.func.hessian import cg_solve

__all__ = ["CGInverse"]


class CGInverse:
    """``A^{-1}`` by batched (preconditioned) conjugate gradient.

    Args:
        op: ``A`` on ``(k, p)`` rows (symmetric; positive definite for plain CG
            guarantees).
        max_iter: most CG iterations per solve.
        tol: relative-residual tolerance per row.
        preconditioner: ``M^{-1}`` on ``(k, p)`` rows (SPD), or None.
        solver: the batched Krylov solver (default :func:`~dattri.func.hessian.cg_solve`;
            :func:`~dattri.func.minres.minres_solve` has the same signature).

    Attributes:
        last_info: the :class:`~dattri.func.hvp_core.CGInfo` of the last solve.
    """

    def __init__(
        self,
        op: Callable[[Tensor], Tensor],
        max_iter: int,
        tol: float,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
        solver: Callable[..., tuple[Tensor, Any]] = cg_solve,
    ) -> None:
        self.op, self.max_iter, self.tol, self.preconditioner = op, max_iter, tol, preconditioner
        self.solver = solver
        self.last_info = None

    def solve(self, rows: Tensor) -> Tensor:
        """``A^{-1}`` applied to every row of ``rows`` ``(k, p)`` (``A`` is symmetric)."""
        sol, self.last_info = self.solver(
            self.op, rows, self.max_iter, self.tol, preconditioner=self.preconditioner
        )
        return sol

    def __matmul__(self, v: Tensor) -> Tensor:
        """``A^{-1} v`` for ``v`` of shape ``(p,)`` or ``(p, k)``."""
        return self.solve(v[None])[0] if v.dim() == 1 else self.solve(v.T).T
