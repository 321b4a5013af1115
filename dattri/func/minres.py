"""Batched, preconditioned MINRES for symmetric (possibly indefinite) systems.

CG assumes ``A = H + regularization * I`` positive definite; on a trained network's
Hessian with small damping it may not be. MINRES (Paige & Saunders 1975) minimises the
residual over the Krylov space for any symmetric non-singular ``A`` and needs only an SPD
preconditioner (e.g. :class:`dattri.func.spectral_precond.SpectralPreconditioner`). This is
the algorithm of ``scipy.sparse.linalg.minres`` (same recurrences), run on every row of a
``(k, p)`` right-hand side at once with per-row scalars; converged rows are dropped from
the batched product. The true residual ``v - A x`` is carried by a recurrence (``A w`` is
updated with ``w``), so the stopping test is on ``||v - A x|| / ||v||`` like CG's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dattri.func.hvp_core import CGInfo, IHVPUsageError

__all__ = ["minres_solve"]


def minres_solve(
    op: Callable[[Tensor], Tensor],
    rhs: Tensor,
    max_iter: int,
    tol: float,
    *,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``op(x) = rhs`` row by row with (preconditioned) MINRES from ``x0 = 0``.

    Args:
        op: Symmetric batched product ``(m, p) -> (m, p)``.
        rhs: ``(k, p)`` right-hand sides.
        max_iter: Maximum iterations (positive int).
        tol: Relative residual ``||rhs - A x|| / ||rhs||`` at which a row stops.
        preconditioner: Optional symmetric positive-definite ``M^{-1}``, ``(m, p) -> (m, p)``.

    Returns:
        ``(x (k, p), info)`` with ``info`` a :class:`~dattri.func.hvp_core.CGInfo`
        (``negative_curvature`` flags rows whose Lanczos step met ``v^T A v < 0``).

    Raises:
        IHVPUsageError: on bad arguments or a preconditioner that is not positive definite.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        msg = f"`max_iter` must be a positive integer, got {max_iter!r}."
        raise IHVPUsageError(msg)
    if not tol >= 0:
        msg = f"`tol` must be >= 0, got {tol!r}."
        raise IHVPUsageError(msg)
    if rhs.ndim != 2:
        msg = f"`rhs` must be (k, p), got shape {tuple(rhs.shape)}."
        raise IHVPUsageError(msg)

    def prec(m: Tensor) -> Tensor:
        return m.clone() if preconditioner is None else preconditioner(m)

    eps = torch.finfo(rhs.dtype).eps
    k = rhs.shape[0]
    x = torch.zeros_like(rhs)
    res = rhs.clone()
    bnorm = rhs.norm(dim=1)
    r1 = rhs.clone()
    r2 = rhs.clone()
    y = prec(r1)
    beta2 = (r1 * y).sum(1)
    if bool((beta2 < 0).any()):
        msg = "minres_solve: the preconditioner is not positive definite (r^T P r < 0)."
        raise IHVPUsageError(msg)
    beta = beta2.clamp_min(0).sqrt()
    zeros = torch.zeros(k, dtype=rhs.dtype, device=rhs.device)
    oldb, dbar, epsln = zeros.clone(), zeros.clone(), zeros.clone()
    phibar = beta.clone()
    cs, sn = -torch.ones_like(zeros), zeros.clone()
    w, w2 = torch.zeros_like(rhs), torch.zeros_like(rhs)
    aw, aw2 = torch.zeros_like(rhs), torch.zeros_like(rhs)
    active = (bnorm > 0) & (beta > 0)
    negative = torch.zeros(k, dtype=torch.bool, device=rhs.device)
    breakdown = torch.zeros_like(negative)
    iters = hvps = 0
    while iters < max_iter and bool(active.any()):
        iters += 1
        idx = active.nonzero().squeeze(1)
        b_i = beta[idx]
        v = y[idx] / b_i[:, None]
        av = op(v)
        hvps += int(idx.numel())
        yy = av.clone()
        if iters >= 2:
            yy = yy - (b_i / oldb[idx])[:, None] * r1[idx]
        alfa = (v * yy).sum(1)
        negative[idx] |= alfa < 0
        yy = yy - (alfa / b_i)[:, None] * r2[idx]
        r1[idx] = r2[idx]
        r2[idx] = yy
        y_new = prec(yy)
        bb = (yy * y_new).sum(1)
        if bool((bb < 0).any()):
            msg = "minres_solve: the preconditioner is not positive definite (r^T P r < 0)."
            raise IHVPUsageError(msg)
        y[idx] = y_new
        oldb[idx] = b_i
        b_new = bb.clamp_min(0).sqrt()
        beta[idx] = b_new
        # previous rotation, then the new one
        oldeps = epsln[idx]
        c, s, db = cs[idx], sn[idx], dbar[idx]
        delta = c * db + s * alfa
        gbar = s * db - c * alfa
        epsln[idx] = s * b_new
        dbar[idx] = -c * b_new
        gamma = torch.hypot(gbar, b_new).clamp_min(eps)
        c_new, s_new = gbar / gamma, b_new / gamma
        cs[idx], sn[idx] = c_new, s_new
        phi = c_new * phibar[idx]
        phibar[idx] = s_new * phibar[idx]
        w_new = (v - oldeps[:, None] * w2[idx] - delta[:, None] * w[idx]) / gamma[:, None]
        aw_new = (av - oldeps[:, None] * aw2[idx] - delta[:, None] * aw[idx]) / gamma[:, None]
        w2[idx], w[idx] = w[idx], w_new
        aw2[idx], aw[idx] = aw[idx], aw_new
        x[idx] += phi[:, None] * w_new
        res[idx] -= phi[:, None] * aw_new
        rel = res[idx].norm(dim=1) / bnorm[idx]
        stop = b_new == 0  # exact Lanczos breakdown: the Krylov space is invariant
        breakdown[idx] |= stop & (rel > tol)
        active[idx] = (rel > tol) & ~stop
    rel = torch.where(bnorm > 0, res.norm(dim=1) / bnorm.where(bnorm > 0, 1), 0.0)
    converged = rel <= tol
    notes = []
    if bool(breakdown.any()):
        notes.append(f"{int(breakdown.sum())} row(s) hit an invariant Krylov space (singular A?)")
    if not bool(converged.all()):
        notes.append(f"{int((~converged).sum())} row(s) did not reach tol={tol:g}")
    info = CGInfo(iters, rel, converged, hvps, negative, breakdown, "; ".join(notes))
    return x, info
