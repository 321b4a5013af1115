"""Arnoldi inverse-HVP and eigen-decomposition (see :mod:`dattri.func.hessian`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dattri.func.hvp_core import (
    IHVPUsageError,
    _as_tuple,
    _cached_builder,
    _check_mode,
    _check_nonneg,
    _check_pos_int,
    _norm_argnums,
    _regularized_matvec,
    _rows,
)

__all__ = ["arnoldi_eigs", "ihvp_arnoldi", "ihvp_at_x_arnoldi"]


# --------------------------------------------------------------------------- Arnoldi
def ihvp_arnoldi(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    *,
    top_k: int = 100,
    norm_constant: float = 1.0,
    seed: int = 0,
) -> Callable[[tuple, Tensor], Tensor]:
    """Build ``f(x, v) ≈ (H + regularization * I)^{-1} v`` by Arnoldi (top-k Ritz pairs).

    The Krylov basis is cached for the last ``x`` seen. See :func:`ihvp_at_x_arnoldi`.
    """
    _check_mode(mode)
    get = _cached_builder(
        partial(
            ihvp_at_x_arnoldi,
            func,
            argnums=argnums,
            max_iter=max_iter,
            top_k=top_k,
            norm_constant=norm_constant,
            tol=tol,
            mode=mode,
            regularization=regularization,
            seed=seed,
        )
    )
    return lambda x, v: get(x)(v)


def arnoldi_eigs(
    op: Callable[[Tensor], Tensor],
    gen: torch.Generator,
    ref: Tensor,
    n_steps: int,
    tol: float,
    verbose: bool,
) -> tuple[Tensor, Tensor]:
    """Symmetric Arnoldi (Lanczos with full re-orthogonalisation) for ``n_steps`` steps.

    Start vectors are standard normal draws from ``gen`` (on CPU, then moved to ``ref``'s
    device/dtype). When the new residual norm is ``<= tol`` times the largest Hessenberg
    entry the Krylov space is invariant; the iteration then restarts from a fresh random
    vector orthogonal to the basis (so ``n_steps = p`` always spans ``R^p``, even with
    repeated eigenvalues). Returns Ritz values ``(m,)`` and vectors ``(m, p)``.
    """
    p = ref.numel()

    def draw() -> Tensor:
        z = torch.randn(p, generator=gen, dtype=torch.float64)
        return z.to(device=ref.device, dtype=ref.dtype)

    basis = torch.zeros(n_steps, p, dtype=ref.dtype, device=ref.device)
    hess = torch.zeros(n_steps, n_steps, dtype=ref.dtype, device=ref.device)
    basis[0] = (z := draw()) / z.norm()
    for j in tqdm(range(n_steps), disable=not verbose, desc="Arnoldi"):
        w = op(basis[j : j + 1])[0]
        for _ in range(2):  # classical Gram-Schmidt, twice, for stability
            coef = basis[: j + 1] @ w
            w = w - coef @ basis[: j + 1]
            hess[: j + 1, j] += coef
        if j + 1 == n_steps:
            break
        beta = w.norm()
        if beta <= tol * hess[: j + 1, : j + 1].abs().max() or beta == 0:
            w = draw()  # invariant subspace found: restart orthogonally to the basis
            for _ in range(2):
                w = w - (basis[: j + 1] @ w) @ basis[: j + 1]
            beta = w.norm()
        else:
            hess[j + 1, j] = beta
        basis[j + 1] = w / beta
    evals, evecs = torch.linalg.eigh(0.5 * (hess + hess.T))
    return evals, evecs.T @ basis


def top_ritz_pairs(
    op: Callable[[Tensor], Tensor],
    ref: Tensor,
    *,
    n_steps: int,
    top_k: int,
    norm_constant: float,
    tol: float,
    seed: int,
    verbose: bool,
    who: str,
    fix: str,
    zero_msg: str,
    stacklevel: int = 3,
) -> tuple[Tensor, Tensor]:
    """The ``top_k`` Ritz pairs of largest ``|λ|`` of a symmetric operator, zeros dropped.

    Runs :func:`arnoldi_eigs` on ``op / norm_constant`` (start vector from a CPU
    ``torch.Generator`` seeded with ``seed``), scales the Ritz values back, keeps the
    ``top_k`` largest in magnitude and drops, with a ``UserWarning``, those that are
    numerically zero (``|λ| <= p * eps * max|λ|``). Shared by
    :func:`ihvp_at_x_arnoldi` and ``IFAttributorArnoldi``.

    Args:
        op: Operator on row batches, ``(m, p) -> (m, p)``.
        ref: Tensor of ``p`` elements giving the device and dtype.
        n_steps: Arnoldi steps (Krylov dimension).
        top_k: Number of Ritz pairs kept (at most).
        norm_constant: ``> 0``; the iteration runs on ``op / norm_constant``.
        tol: Relative breakdown tolerance of the iteration.
        seed: Seed of the start vector.
        verbose: Show a tqdm progress bar over the Arnoldi steps.
        who: Name of the caller at the start of the warning.
        fix: What the user can do, at the end of the warning.
        zero_msg: Message of the error raised when every Ritz value is zero.
        stacklevel: ``stacklevel`` of the warning (3: the caller of the caller).

    Returns:
        ``(evals (k,), evecs (k, p))`` with ``k <= top_k``, by decreasing ``|λ|``.

    Raises:
        IHVPUsageError: If every Ritz value is numerically zero.
    """
    p = ref.numel()
    gen = torch.Generator().manual_seed(seed)
    evals, evecs = arnoldi_eigs(lambda m: op(m) / norm_constant, gen, ref, n_steps, tol, verbose)
    evals = evals * norm_constant
    order = evals.abs().argsort(descending=True)[:top_k]
    evals, evecs = evals[order], evecs[order]
    keep = evals.abs() > p * torch.finfo(ref.dtype).eps * evals.abs().max()
    if not bool(keep.all()):
        warnings.warn(
            f"{who} dropped {int((~keep).sum())} numerically zero Ritz value(s); {fix}.",
            UserWarning,
            stacklevel=stacklevel,
        )
        evals, evecs = evals[keep], evecs[keep]
    if evals.numel() == 0:
        raise IHVPUsageError(zero_msg)
    return evals, evecs


def ihvp_at_x_arnoldi(
    func: Callable,
    *x: Tensor,
    argnums: int = 0,
    max_iter: int = 100,
    top_k: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    seed: int = 0,
    verbose: bool = False,
) -> Callable[[Tensor], Tensor]:
    """Build ``f(v) ≈ (H(x) + regularization * I)^{-1} v`` from top-``top_k`` Ritz pairs.

    Runs ``min(max_iter, p)`` Arnoldi steps on ``(H + regularization * I) /
    norm_constant`` (``norm_constant`` only rescales the iteration; Ritz values are scaled
    back, so the result does not depend on it) from a start vector drawn from a local
    ``torch.Generator`` seeded with ``seed`` (on CPU, then moved to ``x``'s device/dtype:
    same seed, same result on any device; the global RNG is untouched). If the Krylov space
    becomes invariant (residual ``<= tol`` relative to the largest Hessenberg entry) the
    iteration restarts from a new random vector orthogonal to the basis. The Hessenberg
    matrix is symmetrised and diagonalised; the ``top_k`` Ritz pairs ``(λ_i, u_i)`` with
    the largest ``|λ_i|`` give ``f(v) = Σ_i u_i (u_iᵀ v) / λ_i``. Exact when the basis
    spans ``R^p`` (``max_iter >= p`` and ``top_k >= p``). Ritz values that are
    numerically zero are dropped with a warning.

    Args:
        func: Scalar function ``func(*x)``.
        *x: Arguments of ``func``.
        argnums: Index of the argument to differentiate.
        max_iter: Maximum Krylov dimension.
        top_k: Number of Ritz pairs kept.
        norm_constant: ``> 0``; the operator is divided by it during the iteration.
        tol: Relative breakdown tolerance of the iteration.
        mode: HVP mode (default ``"rev-fwd"``).
        regularization: ``>= 0``.
        seed: Seed of the start vector.
        verbose: Show a tqdm progress bar over the Arnoldi steps.

    Returns:
        ``f(v)``; ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.
    """
    _check_mode(mode)
    _check_pos_int(max_iter, "max_iter")
    _check_pos_int(top_k, "top_k")
    _check_nonneg(tol, "tol")
    _check_nonneg(regularization, "regularization")
    if not (isinstance(norm_constant, (int, float)) and norm_constant > 0):
        msg = f"`norm_constant` must be > 0, got {norm_constant!r}."
        raise IHVPUsageError(msg)
    x = _as_tuple(x)
    argnums = _norm_argnums(argnums, len(x))
    ref = x[argnums]
    p = ref.numel()
    op = _regularized_matvec(func, x, argnums, mode, regularization)
    evals, evecs = top_ritz_pairs(
        op,
        ref,
        n_steps=min(max_iter, p),
        top_k=top_k,
        norm_constant=norm_constant,
        tol=tol,
        seed=seed,
        verbose=verbose,
        who="Arnoldi",
        fix="increase `regularization` or lower `top_k`",
        zero_msg="The Hessian is numerically zero at x; Arnoldi cannot invert it.",
    )

    def _ihvp(v: Tensor) -> Tensor:
        mat, restore = _rows(v, ref)
        return restore(((mat @ evecs.T) / evals) @ evecs)

    return _ihvp
