"""Preconditioners for the iterative inverse-HVP solvers (CG, Neumann/LiSSA).

A preconditioner is a callable ``P(m) -> m`` on ``(k, p)`` rows in the flat
parameter layout of the solve, symmetric positive definite, that approximates
``(H + regularization * I)^{-1}``. Preconditioned CG (:func:`dattri.func.hessian.
ihvp_at_x_cg` with ``preconditioner=``) then needs about ``sqrt(cond(P H))`` instead
of ``sqrt(cond(H))`` products per digit.

* :func:`diagonal_preconditioner`: ``v / (d + damping)`` for a diagonal estimate ``d``
  (e.g. :func:`hutchinson_diagonal` of the Hessian, or the empirical-Fisher diagonal
  ``mean_i g_i^2``).
* :func:`kronecker_preconditioner`: per ``nn.Linear`` block of the flat vector, the
  K-FAC or EK-FAC inverse ``V -> Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T``
  (:func:`dattri.func.fisher.ekfac_ifvp`), with ``Lambda = s a^T`` (outer product of the
  factor eigenvalues, K-FAC) or the corrected eigenvalues (EK-FAC); entries of the flat
  vector outside every block are divided by ``fallback + damping``.
* :func:`kfac_block` builds a block's ``(Q_A, Q_S, Lambda)`` from K-FAC covariances.

On the damped Hessian of a trained MLP these do not cut CG's products (``benchmarks/
bench_pcg.py --spectrum``): ``H + lambda I`` is a few dozen outliers over a tight cluster
at ``lambda`` (most of ``H``'s eigenvalues are ~0), which plain CG already handles; a
diagonal or Kronecker ``P`` spreads that cluster, and the empirical-Fisher curvature
underestimates the outliers. :mod:`dattri.func.spectral_precond` inverts the outliers and
keeps the cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dattri.func.fisher import ekfac_ifvp
from dattri.func.hvp_core import IHVPUsageError

__all__ = [
    "KroneckerBlock",
    "diagonal_preconditioner",
    "hutchinson_diagonal",
    "kfac_block",
    "kronecker_preconditioner",
]


def diagonal_preconditioner(diag: Tensor, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """``P(m) = m / (diag + damping)`` (row-wise), ``diag`` ``(p,)``.

    Raises:
        IHVPUsageError: if ``diag + damping`` has a non-positive or non-finite entry.
    """
    denom = diag.reshape(-1) + damping
    if not bool(torch.isfinite(denom).all()) or not bool((denom > 0).all()):
        msg = (
            "diagonal_preconditioner: diag + damping must be finite and positive "
            f"(smallest entry {float(denom.min()):.3g}); raise `damping` or pass |diag|."
        )
        raise IHVPUsageError(msg)
    inv = 1.0 / denom

    def apply(mat: Tensor) -> Tensor:
        return mat * inv.to(mat)

    return apply


def hutchinson_diagonal(
    op: Callable[[Tensor], Tensor],
    p: int,
    num_samples: int = 16,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Tensor:
    """Hutchinson estimate ``mean_s z_s * (H z_s)`` of ``diag(H)`` (Rademacher ``z``).

    Args:
        op: Batched product ``(k, p) -> (k, p)``.
        p: Dimension.
        num_samples: Probe vectors (one batched product).
        dtype: Probe dtype.
        device: Probe device.
        seed: Seed of the probes (local generator).

    Returns:
        ``(p,)`` diagonal estimate.
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (num_samples, p), generator=gen).to(dtype) * 2 - 1
    z = z.to(device)
    return (z * op(z)).mean(0)


@dataclass
class KroneckerBlock:
    """One ``nn.Linear`` block of the flat parameter vector.

    Attributes:
        weight_offset: Start of the row-major ``(d_out, d_in)`` weight in the flat vector.
        bias_offset: Start of the ``(d_out,)`` bias, or ``None`` (no trained bias).
        q_a: ``(d_in', d_in')`` eigenvectors of the input covariance (``d_in' = d_in + 1``
            with a bias).
        q_s: ``(d_out, d_out)`` eigenvectors of the output-gradient covariance.
        lam: ``(d_out, d_in')`` eigenvalues in the ``Q_S ⊗ Q_A`` basis.
    """

    weight_offset: int
    bias_offset: int | None
    q_a: Tensor
    q_s: Tensor
    lam: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight."""
        d_in = self.q_a.shape[0] - (1 if self.bias_offset is not None else 0)
        return int(self.q_s.shape[0]), int(d_in)


def kfac_block(
    cov_a: Tensor, cov_s: Tensor, weight_offset: int, bias_offset: int | None
) -> KroneckerBlock:
    """K-FAC block: eigendecompositions of ``A``, ``S`` and ``Lambda = s a^T``.

    Args:
        cov_a: ``(d_in', d_in')`` input covariance (see :func:`dattri.func.fisher.kfac_factors`).
        cov_s: ``(d_out, d_out)`` output-gradient covariance.
        weight_offset: See :class:`KroneckerBlock`.
        bias_offset: See :class:`KroneckerBlock`.
    """
    ea, q_a = torch.linalg.eigh(0.5 * (cov_a + cov_a.T))
    es, q_s = torch.linalg.eigh(0.5 * (cov_s + cov_s.T))
    lam = es.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :]
    return KroneckerBlock(weight_offset, bias_offset, q_a, q_s, lam)


def kronecker_preconditioner(
    blocks: Sequence[KroneckerBlock], p: int, damping: float, fallback: float = 1.0
) -> Callable[[Tensor], Tensor]:
    """Block-diagonal K-FAC/EK-FAC inverse on the flat ``(k, p)`` layout.

    Args:
        blocks: The ``nn.Linear`` blocks (non-overlapping).
        p: Length of the flat vector.
        damping: ``> 0`` added to every block's ``Lambda`` and to ``fallback``.
        fallback: Curvature assumed for entries outside every block.

    Returns:
        ``P(m)`` for ``m`` ``(k, p)``.

    Raises:
        IHVPUsageError: on overlapping or out-of-range blocks, or ``damping <= 0`` with
            a zero eigenvalue.
    """
    covered = torch.zeros(p, dtype=torch.bool)
    spans = []
    for blk in blocks:
        d_out, d_in = blk.shape
        w = torch.arange(blk.weight_offset, blk.weight_offset + d_out * d_in)
        b = (
            torch.arange(blk.bias_offset, blk.bias_offset + d_out)
            if blk.bias_offset is not None
            else None
        )
        idx = w if b is None else torch.cat([w, b])
        if int(idx.max()) >= p or bool(covered[idx].any()):
            msg = "kronecker_preconditioner: blocks overlap or exceed the flat length p."
            raise IHVPUsageError(msg)
        covered[idx] = True
        if not bool((blk.lam + damping > 0).all()):
            msg = "kronecker_preconditioner: Lambda + damping has zero entries; use damping > 0."
            raise IHVPUsageError(msg)
        spans.append((blk, d_out, d_in))
    rest = (~covered).nonzero().squeeze(1)

    def apply(mat: Tensor) -> Tensor:
        out = torch.empty_like(mat)
        k = mat.shape[0]
        for blk, d_out, d_in in spans:
            wo, bo = blk.weight_offset, blk.bias_offset
            w = mat[:, wo : wo + d_out * d_in].reshape(k, d_out, d_in)
            m = w if bo is None else torch.cat([w, mat[:, bo : bo + d_out, None]], dim=2)
            q_a, q_s, lam = (t.to(mat) for t in (blk.q_a, blk.q_s, blk.lam))
            res = ekfac_ifvp(m, q_a, q_s, lam, damping)
            out[:, wo : wo + d_out * d_in] = res[..., :d_in].reshape(k, -1)
            if bo is not None:
                out[:, bo : bo + d_out] = res[..., d_in]
        if rest.numel():
            r = rest.to(mat.device)
            out[:, r] = mat[:, r] / (fallback + damping)
        return out

    return apply
