"""Spectral (deflation) preconditioner of ``A = H + regularization * I`` from batched HVPs.

Why: the damped Hessian of a trained network is "low rank + damping": a few dozen
outlying eigenvalues far above the damping ``lambda`` and thousands of eigenvalues of
``H`` near 0, so that ``A`` has a tight cluster at ``lambda``. Plain CG already handles
the cluster in a few steps; its iterations go into the outliers. Diagonal, K-FAC and
EK-FAC preconditioners rescale the cluster (spreading it) and, built from the empirical
Fisher, underestimate the outliers, so they do not cut the count (``benchmarks/
bench_pcg.py``). A preconditioner that inverts ``A`` on its top eigenspace and is a
multiple of the identity elsewhere removes the outliers and keeps the cluster
(Frangella, Tropp & Udell 2021, "Randomized Nyström preconditioning", for the PSD case).

The top eigenspace comes from a randomized block Krylov space (Rayleigh-Ritz, by
``|theta - regularization|``, i.e. largest ``|eig(H)|``: indefinite ``H`` is allowed,
unlike a Nyström sketch). Each block is one batched product of ``block_size`` rows;
``rank`` products in all, built once and reused for every right-hand side. With Ritz pairs
``(theta_i, u_i)`` of ``A`` (``U`` ``(r, p)``):

``P m = U diag(1 / |theta_i|) U^T m + (m - U U^T m) / level``,
``level = min_i |theta_i - regularization| + regularization``

(the upper end of the rest of ``A``'s spectrum, Frangella et al.'s ``lambda_l + mu``).
``P`` is symmetric positive definite by construction (``|theta|``, ``level > 0``).
When the basis spans ``R^p`` (``rank >= p``), ``P = |A|^{-1}`` and CG converges in one step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dattri.func.hvp_core import IHVPUsageError

__all__ = [
    "SpectralPreconditioner",
    "SplitSpectralPreconditioner",
    "block_krylov_eigs",
    "spectral_preconditioner",
    "split_spectral_preconditioner",
]


def _orthonormal_block(
    w: Tensor, basis: Tensor | None, gen: torch.Generator, rel_tol: float
) -> Tensor:
    """Rows of ``w`` ``(b, p)`` made orthonormal to ``basis`` rows and to each other.

    Block Gram-Schmidt (twice) then a QR; columns that collapsed (rank-deficient block,
    invariant subspace) are replaced by fresh random directions orthogonal to everything.
    """
    scale = w.norm(dim=1).max().clamp_min(torch.finfo(w.dtype).tiny)
    for _ in range(2):
        if basis is not None and basis.shape[0]:
            w = w - (w @ basis.T) @ basis
    q, r = torch.linalg.qr(w.T)
    good = r.diagonal().abs() > rel_tol * scale
    if bool(good.all()):
        return q.T.contiguous()
    kept = q.T[good]
    full = kept if basis is None else torch.cat([basis, kept])
    fresh = []
    for _ in range(int((~good).sum())):
        z = torch.randn(w.shape[1], generator=gen, dtype=torch.float64).to(w)
        for _ in range(2):
            if full.shape[0]:
                z = z - (full @ z) @ full
        z = z / z.norm()
        fresh.append(z)
        full = torch.cat([full, z[None]])
    return torch.cat([kept, torch.stack(fresh)]).contiguous()


def block_krylov_eigs(
    op: Callable[[Tensor], Tensor],
    p: int,
    rank: int,
    *,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    verbose: bool = False,
    keep: int | None = None,
    center: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Ritz pairs of a symmetric operator from a randomized block Krylov space.

    ``Q_1`` = orthonormalised Gaussian ``(block_size, p)`` (local generator seeded with
    ``seed``, drawn on CPU in float64); ``Q_{j+1}`` = ``op(Q_j)`` orthonormalised against
    all earlier blocks (twice). The products ``op(Q_j)`` are kept, so the Rayleigh
    quotient ``T = Q op(Q)^T`` costs no extra product: ``min(rank, p)`` rows in all.

    Args:
        op: Symmetric batched product ``(m, p) -> (m, p)``.
        p: Dimension.
        rank: Size of the Krylov basis (= number of products), ``>= 1``.
        block_size: Rows per batched product.
        dtype: Dtype of the basis.
        device: Device of the basis.
        seed: Seed of the start block.
        verbose: Show a tqdm progress bar over the blocks.
        keep: Return only the ``keep`` pairs of largest ``|theta - center|`` (their
            vectors and residuals alone are formed); None: all.
        center: See ``keep``.

    Returns:
        ``(theta (n,), vectors (n, p), residual_norms (n,), products)`` with
        ``n = min(rank, p, keep)``, Ritz values in increasing order, ``residual_norms``
        the exact ``||op(u) - theta u||`` of each Ritz pair.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        msg = f"`rank` must be a positive integer, got {rank!r}."
        raise IHVPUsageError(msg)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        msg = f"`block_size` must be a positive integer, got {block_size!r}."
        raise IHVPUsageError(msg)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        msg = f"`keep` must be None or a positive integer, got {keep!r}."
        raise IHVPUsageError(msg)
    n = min(rank, p)
    gen = torch.Generator().manual_seed(seed)
    rel_tol = 100 * torch.finfo(dtype).eps
    start = torch.randn(min(block_size, n), p, generator=gen, dtype=torch.float64)
    q = _orthonormal_block(start.to(dtype=dtype, device=device), None, gen, rel_tol)
    blocks: list[Tensor] = []
    products: list[Tensor] = []
    done = 0
    bar = tqdm(total=n, disable=not verbose, desc="Spectral preconditioner (HVPs)")
    while True:
        aq = op(q)
        bar.update(q.shape[0])
        if aq.shape != q.shape or not bool(torch.isfinite(aq).all()):
            msg = "block_krylov_eigs: the operator returned a non-finite or misshaped product."
            raise IHVPUsageError(msg)
        blocks.append(q)
        products.append(aq)
        done += q.shape[0]
        if done >= n:
            break
        basis = torch.cat(blocks)
        q = _orthonormal_block(aq[: n - done], basis, gen, rel_tol)
    bar.close()
    basis = torch.cat(blocks)
    prod = torch.cat(products)
    t = basis @ prod.T
    theta, y = torch.linalg.eigh(0.5 * (t + t.T))
    if keep is not None and keep < theta.shape[0]:
        top = (theta - center).abs().argsort(descending=True)[:keep].sort().values
        theta, y = theta[top], y[:, top]
    vecs = y.T @ basis
    resid = (y.T @ prod - theta[:, None] * vecs).norm(dim=1)
    return theta, vecs, resid, done


class SpectralPreconditioner:
    """``P m = U diag(1/|theta|) U^T m + (m - U U^T m) / level`` (see module docstring).

    Attributes:
        eigenvalues: ``(r,)`` Ritz values ``theta`` of ``A = H + regularization * I``
            kept, by decreasing ``|theta - regularization|``.
        eigenvectors: ``(r, p)`` orthonormal Ritz vectors.
        residual_norms: ``(r,)`` ``||A u - theta u||`` of each pair.
        level: Scale of ``A`` on the complement of the kept space (``> 0``).
        regularization: The ``regularization`` of ``A``.
        hvps: Matrix-vector products spent building it.
        hvp_equivalents: Their cost in products with the solver's ``A`` (``hvps`` times
            the relative cost of one product, e.g. the sampled fraction of the training
            data for a sub-sampled Hessian).
    """

    def __init__(
        self,
        eigenvalues: Tensor,
        eigenvectors: Tensor,
        regularization: float,
        *,
        residual_norms: Tensor | None = None,
        hvps: int = 0,
        hvp_equivalents: float | None = None,
    ) -> None:
        """Preconditioner from Ritz pairs ``(theta_i, u_i)`` of ``A`` (rows of ``U``).

        Raises:
            IHVPUsageError: on mismatched shapes, non-finite values, or no pairs.
        """
        if eigenvalues.ndim != 1 or eigenvectors.ndim != 2:
            msg = "eigenvalues must be (r,) and eigenvectors (r, p)."
            raise IHVPUsageError(msg)
        if eigenvalues.shape[0] != eigenvectors.shape[0] or eigenvalues.numel() == 0:
            msg = (
                f"need r >= 1 pairs with matching counts; got {eigenvalues.shape[0]} "
                f"eigenvalues and {eigenvectors.shape[0]} eigenvectors."
            )
            raise IHVPUsageError(msg)
        if not bool(torch.isfinite(eigenvalues).all()) or not bool(
            torch.isfinite(eigenvectors).all()
        ):
            msg = "SpectralPreconditioner: non-finite eigenpairs; check the operator."
            raise IHVPUsageError(msg)
        order = (eigenvalues - regularization).abs().argsort(descending=True)
        self.eigenvalues = eigenvalues[order]
        self.eigenvectors = eigenvectors[order]
        self.residual_norms = None if residual_norms is None else residual_norms[order]
        self.regularization = float(regularization)
        self.hvps = int(hvps)
        self.hvp_equivalents = float(hvps if hvp_equivalents is None else hvp_equivalents)
        mag = self.eigenvalues.abs()
        floor = mag.max().clamp_min(1e-30) * eigenvectors.shape[1] * torch.finfo(mag.dtype).eps
        self._scale = 1.0 / mag.clamp_min(floor)
        level = float((self.eigenvalues[-1] - regularization).abs()) + self.regularization
        self.level = max(level, float(floor))

    def __call__(self, mat: Tensor) -> Tensor:
        """``P`` applied to the rows of ``mat`` ``(k, p)``."""
        u = self.eigenvectors.to(mat)
        coef = mat @ u.T
        return (mat - coef @ u) / self.level + (coef * self._scale.to(mat)) @ u

    def matrix(self) -> Tensor:
        """Dense ``(p, p)`` ``P`` (tests, small problems)."""
        p = self.eigenvectors.shape[1]
        return self(torch.eye(p, dtype=self.eigenvectors.dtype, device=self.eigenvectors.device))


def spectral_preconditioner(
    op: Callable[[Tensor], Tensor],
    p: int,
    regularization: float = 0.0,
    rank: int = 192,
    *,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    verbose: bool = False,
    keep: int | None = None,
    product_cost: float = 1.0,
) -> SpectralPreconditioner:
    """Build the spectral preconditioner of ``A = op`` from ``min(rank, p)`` products.

    ``op`` may be a cheaper stand-in for the solver's operator, e.g. ``H_S + lambda I``
    with ``H_S`` the Hessian of a random part of the training data (sub-sampled Newton,
    Frangella, Rathore, Zhao & Udell 2023, "PROMISE"): ``product_cost`` (the sampled
    fraction) then counts the build in products with the solver's ``A``
    (``.hvp_equivalents``). ``P`` stays symmetric positive definite whatever ``op`` is,
    so preconditioned CG still solves the exact system; only its speed depends on how well
    the pairs of ``op`` match those of ``A``.

    Args:
        op: Batched product with ``A = H + regularization * I`` (the solver's operator,
            or a sub-sampled one), ``(m, p) -> (m, p)``.
        p: Dimension.
        regularization: The ``regularization`` already inside ``op`` (used to rank the
            Ritz pairs by ``|eig(H)|`` and to set ``level``).
        rank: Krylov basis size = products spent (at most ``p``).
        block_size: Rows per batched product (``ceil(rank / block_size)`` products).
        dtype: Dtype of the basis (the solver's dtype).
        device: Device of the basis.
        seed: Seed of the random start block.
        verbose: Show a tqdm progress bar over the blocks.
        keep: Ritz pairs kept, those of largest ``|theta - regularization|`` (the best
            converged ones of a Krylov space); None: all ``min(rank, p)``. ``level`` is
            then the smallest kept ``|theta - regularization|`` plus ``regularization``.
        product_cost: Cost of one product with ``op`` in products with the solver's
            operator (``(0, 1]``; 1 when ``op`` is the solver's operator).

    Returns:
        A :class:`SpectralPreconditioner` (``.hvps`` = ``min(rank, p)``,
        ``.hvp_equivalents`` = ``.hvps * product_cost``).

    Raises:
        IHVPUsageError: if ``regularization`` is not finite, ``keep`` not a positive
            integer or ``product_cost`` not in ``(0, 1]``.
    """
    if not (isinstance(regularization, (int, float)) and math.isfinite(regularization)):
        msg = f"`regularization` must be a finite number, got {regularization!r}."
        raise IHVPUsageError(msg)
    if (
        isinstance(product_cost, bool)
        or not isinstance(product_cost, (int, float))
        or not 0 < product_cost <= 1
    ):
        msg = f"`product_cost` must be a number in (0, 1], got {product_cost!r}."
        raise IHVPUsageError(msg)
    theta, vecs, resid, hvps = block_krylov_eigs(
        op,
        p,
        rank,
        block_size=block_size,
        dtype=dtype,
        device=device,
        seed=seed,
        verbose=verbose,
        keep=keep,
        center=float(regularization),
    )
    return SpectralPreconditioner(
        theta,
        vecs,
        float(regularization),
        residual_norms=resid,
        hvps=hvps,
        hvp_equivalents=hvps * float(product_cost),
    )


class SplitSpectralPreconditioner:
    """``P = C P_B C``: spectral deflation of the split-preconditioned ``B = C A C``.

    ``C`` is a symmetric positive definite "bulk" preconditioner's square root (e.g.
    K-FAC's ``(F + damping I)^{-1/2}``, :func:`dattri.func.preconditioners.
    kronecker_preconditioner` with ``Lambda -> sqrt(Lambda + damping)``) and ``P_B`` the
    :class:`SpectralPreconditioner` of ``B`` (its Ritz pairs are kept by ``|theta|``, and
    the complement is scaled by ``1 / level`` with ``level`` = 1: where ``C^2`` is
    accurate ``B``'s eigenvalues cluster at 1). ``P`` is SPD because ``C`` and ``P_B``
    are; ``P A`` is similar to ``P_B B``, whose outliers on both ends (the directions the
    bulk preconditioner misjudges) the deflation maps to 1.

    Attributes:
        inner: The :class:`SpectralPreconditioner` of ``B``.
        hvps: Products with ``A`` spent building it.
    """

    def __init__(self, half: Callable[[Tensor], Tensor], inner: SpectralPreconditioner) -> None:
        """``P = half ∘ inner ∘ half``."""
        self.half = half
        self.inner = inner
        self.hvps = inner.hvps
        self.eigenvalues = inner.eigenvalues

    def __call__(self, mat: Tensor) -> Tensor:
        """``P`` applied to the rows of ``mat`` ``(k, p)``."""
        return self.half(self.inner(self.half(mat)))


def split_spectral_preconditioner(
    op: Callable[[Tensor], Tensor],
    half: Callable[[Tensor], Tensor],
    p: int,
    rank: int = 192,
    *,
    level: float = 1.0,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    verbose: bool = False,
) -> SplitSpectralPreconditioner:
    """Deflate the top/bottom Ritz pairs of ``B = half ∘ op ∘ half`` (``min(rank, p)`` products).

    Args:
        op: Batched product with ``A = H + regularization * I``, ``(m, p) -> (m, p)``.
        half: Batched symmetric positive definite ``C`` ``(m, p) -> (m, p)`` (square
            root of the bulk preconditioner).
        p: Dimension.
        rank: Krylov basis size = products with ``A`` spent = pairs kept (at most ``p``).
        level: Scale of ``B`` on the complement of the kept space (``> 0``).
        block_size: Rows per batched product.
        dtype: Dtype of the basis.
        device: Device of the basis.
        seed: Seed of the random start block.
        verbose: Show a tqdm progress bar over the blocks.

    Returns:
        A :class:`SplitSpectralPreconditioner` (``.hvps`` = ``min(rank, p)``).

    Raises:
        IHVPUsageError: if ``level`` is not a finite positive number.
    """
    if not (isinstance(level, (int, float)) and math.isfinite(level) and level > 0):
        msg = f"`level` must be a finite positive number, got {level!r}."
        raise IHVPUsageError(msg)
    theta, vecs, resid, hvps = block_krylov_eigs(
        lambda m: half(op(half(m))),
        p,
        rank,
        block_size=block_size,
        dtype=dtype,
        device=device,
        seed=seed,
        verbose=verbose,
    )
    inner = SpectralPreconditioner(theta, vecs, 0.0, residual_norms=resid, hvps=hvps)
    inner.level = float(level)
    return SplitSpectralPreconditioner(half, inner)
