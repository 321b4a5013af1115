"""One damped symmetric inverse, factorised once and applied as an operator.

:class:`DampedSymmetricInverse` is ``(A + damping * I)^{-1}`` of a symmetric ``(n, n)``
matrix ``A``: the matrix is made exactly symmetric, damped, factorised once (Cholesky
when positive definite, otherwise an eigendecomposition) and then applied to many
right-hand sides, in the spirit of curvlinops' linear operators:

```python
inv = DampedSymmetricInverse(hessian, damping=1e-3)
x = inv @ v  # (n,) or (n, k) columns: (A + damping I)^{-1} v
rows = g @ inv  # (k, n) rows: g (A + damping I)^{-1}
dense = inv.matrix()  # (n, n)
```

A (numerically) singular damped matrix either raises (``singular="raise"``; an
indefinite but non-singular matrix is still inverted exactly) or is replaced by its
pseudo-inverse over the eigenvalues above ``rtol * max|eigenvalue|`` with a warning
(``singular="pinv"``; the ``damping -> 0`` limit for a positive semi-definite ``A``).

This module imports nothing from dattri.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["DampedSymmetricInverse"]

_SINGULAR = ("raise", "pinv")


class DampedSymmetricInverse:
    """``(A + damping * I)^{-1}`` of a symmetric ``(n, n)`` matrix, as an operator.

    Steps: optional finite check, ``A <- (A + A^T) / 2`` (in ``A``'s dtype), cast to
    ``dtype``, ``A <- A + damping * I``, Cholesky; if the Cholesky fails, has a squared
    pivot ratio ``min / max <= pivot_rtol`` or ``cholesky=False``, an eigendecomposition
    ``A = U diag(s) U^T`` is used instead. Eigenvalues with ``|s| <= rtol * max|s|``
    count as zero (default ``rtol = n * eps(dtype)``).

    Args:
        matrix: symmetric ``(n, n)`` matrix ``A`` (only approximately symmetric is
            fine: it is symmetrised).
        damping: ``>= 0`` added to the diagonal after symmetrisation.
        dtype: dtype of the factorisation and of every solve (right-hand sides are
            cast to it and results cast back). None = ``matrix.dtype``.
        singular: ``"raise"`` (``error`` on a singular matrix) or ``"pinv"`` (warn and
            use the pseudo-inverse over the eigenvalues ``> rtol * max|s|``).
        rtol: relative eigenvalue cutoff; None = ``n * eps(dtype)``.
        pivot_rtol: a Cholesky whose squared pivot ratio is ``<= pivot_rtol`` is
            treated as singular (eigendecomposition instead). None = no pivot check.
        cholesky: try Cholesky first (False: go straight to the eigendecomposition,
            e.g. when the matrix is known to be singular).
        check_finite: None (no check) or the advice appended to the error raised when
            ``matrix`` holds NaN or inf.
        warn_ill_conditioned: warn when the conditioning estimate :attr:`rcond` is
            below ``100 * eps(matrix.dtype)`` (the inverse is rounding-dominated in
            the dtype the matrix was computed in).
        what: name of the damped matrix in messages (e.g. ``"H + regularization * I"``).
        fix: advice appended to the singular / ill-conditioned messages.
        error: exception class raised on bad input or a singular matrix.
        stacklevel: ``stacklevel`` of the warnings as seen from the caller of the
            constructor (1 = the line constructing this object).

    Attributes:
        chol: ``(n, n)`` lower Cholesky factor, or None when the eigendecomposition
            was used.
        evecs: ``(n, r)`` kept eigenvectors (None with Cholesky).
        inv_evals: ``(r,)`` reciprocals of the kept eigenvalues (None with Cholesky).
        rank: ``r``, the number of directions inverted (``n`` with Cholesky).
        rcond: conditioning estimate: squared pivot ratio (Cholesky) or
            ``min|s| / max|s|`` (eigendecomposition; 0.0 for a zero matrix).
        damping: the damping added.
        shape: ``(n, n)``.
        dtype: dtype of the factorisation.

    Raises:
        error: a non-square matrix, negative or non-finite damping, an unknown
            ``singular`` mode, a non-finite matrix (with ``check_finite``) or, with
            ``singular="raise"``, a singular damped matrix.
    """

    def __init__(
        self,
        matrix: Tensor,
        damping: float = 0.0,
        *,
        dtype: torch.dtype | None = None,
        singular: str = "raise",
        rtol: float | None = None,
        pivot_rtol: float | None = None,
        cholesky: bool = True,
        check_finite: str | None = "check how the matrix was computed.",
        warn_ill_conditioned: bool = False,
        what: str = "The matrix",
        fix: str = "pass damping > 0",
        error: type[Exception] = ValueError,
        stacklevel: int = 1,
    ) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            msg = f"{what} must be a square (n, n) matrix; got shape {tuple(matrix.shape)}."
            raise error(msg)
        damping = float(damping)
        if not damping >= 0 or damping == float("inf"):
            msg = f"damping must be a finite number >= 0, got {damping!r}."
            raise error(msg)
        if singular not in _SINGULAR:
            msg = f"singular={singular!r} is unknown; use one of {_SINGULAR}."
            raise error(msg)
        if check_finite is not None and not bool(torch.isfinite(matrix).all()):
            msg = f"{what.split(' + ')[0]} contains NaN or inf; {check_finite}"
            raise error(msg)
        in_eps = torch.finfo(matrix.dtype).eps
        mat = 0.5 * (matrix + matrix.T)
        self.dtype = mat.dtype if dtype is None else dtype
        mat = mat.to(self.dtype)
        n = mat.shape[0]
        if damping != 0:
            mat.diagonal().add_(damping)
        self.damping = damping
        self.shape = (n, n)
        self.chol: Tensor | None = None
        self.evecs: Tensor | None = None
        self.inv_evals: Tensor | None = None
        self.rank = n
        self.rcond = 0.0
        if rtol is None:
            rtol = n * torch.finfo(self.dtype).eps
        if cholesky:
            chol, info = torch.linalg.cholesky_ex(mat)
            if int(info) == 0:
                piv = chol.diagonal() ** 2  # a tiny pivot means a numerically singular matrix
                self.rcond = float(piv.min() / piv.max()) if n else 1.0
                if pivot_rtol is None or self.rcond > pivot_rtol:
                    self.chol = chol
        if self.chol is None:
            self._eigen(mat, singular, rtol, what, fix, error, stacklevel + 1)
        if warn_ill_conditioned and self.rcond < 100 * in_eps:
            warnings.warn(
                f"{what} is ill-conditioned for its dtype (|eigenvalue| ratio "
                f"~{self.rcond:.1e}); the inverse is dominated by rounding errors. "
                f"{fix[:1].upper()}{fix[1:]} or use float64.",
                UserWarning,
                stacklevel=stacklevel + 1,
            )

    def _eigen(
        self,
        mat: Tensor,
        singular: str,
        rtol: float,
        what: str,
        fix: str,
        error: type[Exception],
        stacklevel: int,
    ) -> None:
        """Eigendecomposition fallback (sets ``evecs``, ``inv_evals``, ``rank``, ``rcond``)."""
        evals, evecs = torch.linalg.eigh(mat)
        scale = float(evals.abs().max()) if evals.numel() else 0.0
        small = float(evals.abs().min()) if evals.numel() else 0.0
        self.rcond = small / scale if scale > 0 else 0.0
        if singular == "raise":
            if scale == 0 or small <= rtol * scale:
                msg = f"{what} is singular (smallest |eigenvalue| {small:.3g}); {fix}."
                raise error(msg)
            self.evecs, self.inv_evals = evecs, 1.0 / evals
            return
        keep = evals > rtol * scale
        self.rank = int(keep.sum())
        self.evecs, self.inv_evals = evecs[:, keep], 1.0 / evals[keep]
        if self.rank > 0:
            n = mat.shape[0]
            warnings.warn(
                f"{what} ({n} x {n}) is singular or not positive definite (rank "
                f"{self.rank}); using its pseudo-inverse. {fix[:1].upper()}{fix[1:]}.",
                UserWarning,
                stacklevel=stacklevel + 1,
            )

    def solve(self, rhs: Tensor) -> Tensor:
        """Solve for the rows of ``rhs``: ``rhs (A + damping I)^{-1}``.

        Args:
            rhs: ``(k, n)`` rows.

        Returns:
            ``(k, n)`` in ``rhs``'s dtype (computed in :attr:`dtype`).
        """
        mat = rhs.to(self.dtype)
        if self.chol is not None:
            out = torch.cholesky_solve(mat.T, self.chol).T
        else:
            out = ((mat @ self.evecs) * self.inv_evals) @ self.evecs.T
        return out.to(rhs.dtype)

    def __matmul__(self, v: Tensor) -> Tensor:
        """``(A + damping I)^{-1} v`` for ``v`` of shape ``(n,)`` or ``(n, k)``."""
        if v.dim() == 1:
            return self.solve(v[None])[0]
        return self.solve(v.T).T

    def __rmatmul__(self, rows: Tensor) -> Tensor:
        """``rows (A + damping I)^{-1}`` for ``rows`` of shape ``(n,)`` or ``(k, n)``."""
        return self @ rows if rows.dim() == 1 else self.solve(rows)

    def matrix(self) -> Tensor:
        """The dense ``(n, n)`` inverse (pseudo-inverse when singular), in :attr:`dtype`."""
        if self.chol is not None:
            eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.chol.device)
            # cholesky_solve against I is several times faster than cholesky_inverse on CPU
            return torch.cholesky_solve(eye, self.chol)
        return (self.evecs * self.inv_evals) @ self.evecs.T
