"""Hessian-vector products (HVP) and inverse-Hessian-vector products (IHVP).

Conventions shared by every function here:

- ``func(*x)`` returns a scalar tensor; ``x`` is a tuple of tensors (a bare tensor is
  treated as a 1-tuple). Derivatives are taken w.r.t. ``x[argnums]`` (any shape; ``p`` =
  its number of elements, usually a flat parameter vector of shape ``(p,)``).
- ``v`` is one vector, shaped like ``x[argnums]`` or flat ``(p,)``, or a batch of ``k``
  vectors stacked on a new leading dim: ``(k, *x[argnums].shape)`` or ``(k, p)``. Every
  function is vectorised over the rows of a batch (no Python loop over vectors) and
  returns a tensor of ``v``'s shape, dtype and device (work happens on ``x[argnums]``'s
  device and dtype).
- ``H`` is the Hessian of ``func`` w.r.t. ``x[argnums]``; ``regularization`` adds
  ``regularization * I``.
- Bad input raises :class:`IHVPUsageError` (a ``ValueError``).

The public names are re-exported by :mod:`dattri.func.ihvp`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "CGInfo",
    "IHVPUsageError",
    "arnoldi_eigs",
    "cg_solve",
    "hvp",
    "hvp_at_x",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
]

_MODES = ("rev-rev", "rev-fwd")


class IHVPUsageError(ValueError):
    """Raised when an HVP/IHVP function is called with invalid arguments."""


@dataclass
class CGInfo:
    """Convergence report of the last conjugate-gradient solve.

    Attributes:
        iterations: Number of CG iterations (batched HVPs) performed.
        residuals: Relative residuals ``||v - (H + reg I) x|| / ||v||`` per row, shape
            ``(k,)`` (0 for all-zero rows of ``v``).
        converged: Per-row flags ``residuals <= tol``, shape ``(k,)``.
    """

    iterations: int
    residuals: Tensor
    converged: Tensor


# --------------------------------------------------------------------------- checks
def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        msg = f"Unknown `mode`={mode!r}; use one of {_MODES}."
        raise IHVPUsageError(msg)


def _check_nonneg(value: float, name: str, err: type[Exception] = IHVPUsageError) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        msg = f"`{name}` must be a finite number >= 0, got {value!r}."
        raise err(msg)


def _check_pos_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"`{name}` must be a positive integer, got {value!r}."
        raise IHVPUsageError(msg)


def _as_tuple(x: Tensor | Sequence[Tensor]) -> tuple:
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    msg = f"`x` must be a tuple of tensors (the arguments of func), got {type(x)}."
    raise IHVPUsageError(msg)


def _norm_argnums(argnums: int, n_args: int) -> int:
    if isinstance(argnums, bool) or not isinstance(argnums, int):
        msg = f"`argnums` must be an int, got {argnums!r}."
        raise IHVPUsageError(msg)
    if not -n_args <= argnums < n_args:
        msg = f"`argnums`={argnums} is out of range for {n_args} argument(s) of func."
        raise IHVPUsageError(msg)
    return argnums % n_args


def _is_traced(t: Tensor) -> bool:
    """True when ``t`` is wrapped by a torch.func transform (e.g. under ``vmap``)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _all_finite(t: Tensor) -> bool:
    return _is_traced(t) or bool(torch.isfinite(t).all())


def _rows(v: Tensor, target: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Reshape ``v`` to ``(k, p)`` on ``target``'s device/dtype; return an inverse map."""
    if not isinstance(v, Tensor) or not v.is_floating_point():
        msg = f"`v` must be a floating-point tensor, got {type(v).__name__}."
        raise IHVPUsageError(msg)
    p, shape = target.numel(), tuple(target.shape)
    if tuple(v.shape) in (shape, (p,)):
        batched = False
    elif v.dim() >= 1 and tuple(v.shape[1:]) in (shape, (p,)):
        batched = True
    else:
        msg = (
            f"`v` has shape {tuple(v.shape)}; expected {shape} or ({p},) for one vector, "
            f"or (k, *{shape}) / (k, {p}) for k vectors."
        )
        raise IHVPUsageError(msg)
    if not _all_finite(v):
        msg = "`v` contains NaN or inf; pass finite vectors."
        raise IHVPUsageError(msg)
    v_shape, v_dtype, v_device = v.shape, v.dtype, v.device
    mat = v.reshape(-1, p) if batched else v.reshape(1, p)
    mat = mat.to(device=target.device, dtype=target.dtype)

    def restore(out: Tensor) -> Tensor:
        return out.reshape(v_shape).to(device=v_device, dtype=v_dtype)

    return mat, restore


def _check_product(out: Tensor) -> Tensor:
    if not _all_finite(out):
        msg = (
            "The Hessian-vector product contains NaN or inf: func(*x) or its derivatives "
            "are not finite at x (check the loss, the data and the parameters)."
        )
        raise IHVPUsageError(msg)
    return out


# --------------------------------------------------------------------------- HVP core
def _make_matvec(func: Callable, x: tuple, argnums: int, mode: str) -> Callable[[Tensor], Tensor]:
    """Batched HVP at ``x``: maps ``(k, p)`` to ``(k, p)`` (no regularization).

    ``rev-rev`` linearises the gradient once (one backward graph) and vmaps the VJP;
    ``rev-fwd`` vmaps a JVP of the gradient. Other arguments are closed over (constants),
    so no tangents are created for them.
    """
    xi = x[argnums]
    shape = xi.shape

    def partial_func(arg: Tensor) -> Tensor:
        return func(*x[:argnums], arg, *x[argnums + 1 :])

    grad_fn = torch.func.grad(partial_func)
    if mode == "rev-rev":
        _, vjp_fn = torch.func.vjp(grad_fn, xi)

        def one(u: Tensor) -> Tensor:
            return vjp_fn(u.reshape(shape))[0].reshape(-1)

    else:

        def one(u: Tensor) -> Tensor:
            return torch.func.jvp(grad_fn, (xi,), (u.reshape(shape),))[1].reshape(-1)

    batched = torch.func.vmap(one)

    def matvec(mat: Tensor) -> Tensor:
        if mat.shape[0] == 1:
            return one(mat[0]).unsqueeze(0)
        return batched(mat)

    return matvec


def hvp(
    func: Callable,
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[tuple, Tensor], Tensor]:
    """Build ``f(x, v) = (H(x) + regularization * I) v``.

    Args:
        func: Scalar function ``func(*x)``.
        argnums: Index of the argument of ``func`` to differentiate.
        mode: ``"rev-rev"`` (VJP of the gradient) or ``"rev-fwd"`` (JVP of the gradient).
        regularization: ``>= 0``, added as ``regularization * v``.

    Returns:
        ``f(x, v)``: ``x`` a tuple of arguments, ``v`` of shape ``(p,)``/``(k, p)`` (or the
        ``x[argnums]``-shaped equivalents); returns a tensor of ``v``'s shape.
    """
    _check_mode(mode)
    _check_nonneg(regularization, "regularization")

    def _hvp(x: tuple, v: Tensor) -> Tensor:
        return hvp_at_x(func, x, argnums, mode, regularization)(v)

    return _hvp


def hvp_at_x(
    func: Callable,
    x: tuple,
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """Build ``f(v) = (H(x) + regularization * I) v`` at a fixed ``x``.

    With ``mode="rev-rev"`` the gradient is linearised once here and every call only runs
    (vmapped) VJPs. The returned function also works under ``torch.func.vmap`` over ``v``
    (finiteness checks are skipped on traced tensors).

    Args:
        func: Scalar function ``func(*x)``.
        x: Tuple of arguments of ``func``.
        argnums: Index of the argument to differentiate.
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: ``>= 0``.

    Returns:
        ``f(v)`` with ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.
    """
    _check_mode(mode)
    _check_nonneg(regularization, "regularization")
    x = _as_tuple(x)
    argnums = _norm_argnums(argnums, len(x))
    matvec = _make_matvec(func, x, argnums, mode)

    def _hvp_at_x(v: Tensor) -> Tensor:
        mat, restore = _rows(v, x[argnums])
        out = matvec(mat)
        if regularization:
            out = out + regularization * mat
        return restore(_check_product(out))

    return _hvp_at_x


def _regularized_matvec(
    func: Callable, x: tuple, argnums: int, mode: str, regularization: float
) -> Callable[[Tensor], Tensor]:
    matvec = _make_matvec(func, x, argnums, mode)

    def op(mat: Tensor) -> Tensor:
        out = matvec(mat)
        if regularization:
            out = out + regularization * mat
        return _check_product(out)

    return op


def _cached_builder(builder: Callable[..., Callable]) -> Callable[[tuple], Callable]:
    """Return ``get(x)`` that rebuilds the at-``x`` solver only when ``x`` changes.

    ``x`` counts as unchanged when it holds the same tensor objects with the same
    in-place version counters (so an expensive factorisation or Krylov basis is reused
    across calls ``f(x, v1)``, ``f(x, v2)``, ...).
    """
    state: dict = {}

    def get(x: tuple) -> Callable:
        x = _as_tuple(x)
        key = tuple((id(t), getattr(t, "_version", None)) for t in x)
        if state.get("key") != key or any(
            a is not b for a, b in zip(state.get("x", ()), x, strict=False)
        ):
            state.update(key=key, x=x, solver=builder(*x))
        return state["solver"]

    return get


# --------------------------------------------------------------------------- explicit
class _SymmetricSolver:
    """Factorise a symmetric matrix once; solve many right-hand sides.

    Cholesky when positive definite, otherwise an eigendecomposition (indefinite but
    non-singular matrices are inverted exactly). A (numerically) singular matrix raises.
    """

    def __init__(self, mat: Tensor, err: type[Exception] = IHVPUsageError, what: str = "H") -> None:
        mat = 0.5 * (mat + mat.T)
        if not bool(torch.isfinite(mat).all()):
            msg = f"{what} contains NaN or inf; check func and x."
            raise err(msg)
        chol, info = torch.linalg.cholesky_ex(mat)
        self.chol: Tensor | None = None
        if int(info) == 0:
            self.chol = chol
            return
        evals, evecs = torch.linalg.eigh(mat)
        scale = evals.abs().max()
        cutoff = mat.shape[0] * torch.finfo(mat.dtype).eps * scale
        if scale == 0 or bool((evals.abs() <= cutoff).any()):
            msg = (
                f"{what} + regularization * I is singular (smallest |eigenvalue| "
                f"{float(evals.abs().min()):.3g}); increase `regularization`."
            )
            raise err(msg)
        self.evecs, self.inv_evals = evecs, 1.0 / evals

    def solve(self, rhs: Tensor) -> Tensor:
        """Solve for the rows of ``rhs`` ``(k, p)``; returns ``(k, p)``."""
        if self.chol is not None:
            return torch.cholesky_solve(rhs.T, self.chol).T
        return ((rhs @ self.evecs) * self.inv_evals) @ self.evecs.T


def _dense_hessian(op: Callable[[Tensor], Tensor], ref: Tensor, chunk: int) -> Tensor:
    """Hessian ``(p, p)`` from batched HVPs with identity rows, ``chunk`` rows at a time."""
    p = ref.numel()
    eye = torch.eye(p, dtype=ref.dtype, device=ref.device)
    return torch.cat([op(eye[i : i + chunk]) for i in range(0, p, chunk)])


def ihvp_explicit(
    func: Callable, argnums: int = 0, regularization: float = 0.0
) -> Callable[[tuple, Tensor], Tensor]:
    """Build ``f(x, v) = (H(x) + regularization * I)^{-1} v`` with a dense Hessian.

    The Hessian and its factorisation are cached for the last ``x`` seen (same tensor
    objects, unmodified), so repeated calls with new ``v`` only solve.

    Args:
        func: Scalar function ``func(*x)``.
        argnums: Index of the argument to differentiate.
        regularization: ``>= 0``.

    Returns:
        ``f(x, v)``; ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.
    """
    _check_nonneg(regularization, "regularization")
    get = _cached_builder(
        partial(ihvp_at_x_explicit, func, argnums=argnums, regularization=regularization)
    )
    return lambda x, v: get(x)(v)


def ihvp_at_x_explicit(
    func: Callable,
    *x: Tensor,
    argnums: int = 0,
    regularization: float = 0.0,
    chunk_size: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """Build ``f(v) = (H(x) + regularization * I)^{-1} v`` with a dense, factorised Hessian.

    The ``(p, p)`` Hessian is built here once (from batched HVPs of identity rows,
    ``chunk_size`` rows at a time; default keeps each chunk under ~4M entries), made
    exactly symmetric and factorised once (Cholesky, or ``eigh`` if indefinite); every
    call is then two triangular solves (or two matmuls).

    Args:
        func: Scalar function ``func(*x)``.
        *x: Arguments of ``func``.
        argnums: Index of the argument to differentiate.
        regularization: ``>= 0``.
        chunk_size: Identity rows per batched HVP when building the Hessian.

    Returns:
        ``f(v)``; ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.

    Raises:
        IHVPUsageError: On bad arguments, a non-finite Hessian, or a singular
            ``H + regularization * I``.
    """
    _check_nonneg(regularization, "regularization")
    x = _as_tuple(x)
    argnums = _norm_argnums(argnums, len(x))
    ref = x[argnums]
    p = ref.numel()
    if chunk_size is None:
        chunk_size = max(1, min(p, 2**22 // max(p, 1)))
    _check_pos_int(chunk_size, "chunk_size")
    op = _regularized_matvec(func, x, argnums, "rev-rev", regularization)
    solver = _SymmetricSolver(_dense_hessian(op, ref, chunk_size))

    def _ihvp(v: Tensor) -> Tensor:
        mat, restore = _rows(v, ref)
        return restore(solver.solve(mat))

    return _ihvp


# --------------------------------------------------------------------------- CG
def cg_solve(
    op: Callable[[Tensor], Tensor], rhs: Tensor, max_iter: int, tol: float
) -> tuple[Tensor, CGInfo]:
    """Conjugate gradient on every row of ``rhs`` ``(k, p)`` at once (x0 = 0).

    Each row has its own step sizes; converged rows are frozen and dropped from the
    batched HVP; a row with zero residual is never divided by.
    """
    sol = torch.zeros_like(rhs)
    res = rhs.clone()
    direction = res.clone()
    rs = (res * res).sum(1)
    thresh = tol * rs.sqrt()
    active = rs.sqrt() > thresh
    iters = 0
    warned = False
    while iters < max_iter and bool(active.any()):
        iters += 1
        idx = active.nonzero().squeeze(1)
        d = direction[idx]
        ad = op(d)
        curv = (d * ad).sum(1)
        bad = curv <= 0
        if bool(bad.any()) and not warned:
            warnings.warn(
                "CG met non-positive curvature: H + regularization * I is not positive "
                "definite; increase `regularization` (affected rows stop early).",
                UserWarning,
                stacklevel=3,
            )
            warned = True
        alpha = torch.where(bad, torch.zeros_like(curv), rs[idx] / curv.where(~bad, 1))
        sol[idx] += alpha[:, None] * d
        r_new = res[idx] - alpha[:, None] * ad
        rs_new = (r_new * r_new).sum(1)
        beta = rs_new / rs[idx]
        res[idx] = r_new
        direction[idx] = r_new + beta[:, None] * d
        rs[idx] = rs_new
        active[idx] = (rs_new.sqrt() > thresh[idx]) & ~bad
    norms = rhs.norm(dim=1)
    rel = torch.where(norms > 0, rs.sqrt() / norms.where(norms > 0, 1), 0.0)
    return sol, CGInfo(iters, rel, rel <= tol)


def ihvp_cg(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[tuple, Tensor], Tensor]:
    """Build ``f(x, v) ≈ (H(x) + regularization * I)^{-1} v`` by conjugate gradient.

    See :func:`ihvp_at_x_cg`; the returned ``f`` also exposes ``f.info`` (:class:`CGInfo`)
    of its last call.
    """
    _check_mode(mode)
    get = _cached_builder(
        partial(
            ihvp_at_x_cg,
            func,
            argnums=argnums,
            max_iter=max_iter,
            tol=tol,
            mode=mode,
            regularization=regularization,
        )
    )

    def _ihvp(x: tuple, v: Tensor) -> Tensor:
        solver = get(x)
        out = solver(v)
        _ihvp.info = solver.info
        return out

    _ihvp.info = None
    return _ihvp


def ihvp_at_x_cg(
    func: Callable,
    *x: Tensor,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """Build ``f(v) ≈ (H(x) + regularization * I)^{-1} v`` by batched conjugate gradient.

    All rows of ``v`` are solved together (one batched HVP per iteration) with per-row
    step sizes, starting from 0. A row stops when its relative residual
    ``||v - (H + reg I) u|| / ||v|| <= tol``; the solve stops when all rows stopped or
    after ``max_iter`` iterations. ``H + regularization * I`` must be positive definite
    (a ``UserWarning`` is raised otherwise). After each call, ``f.info`` holds a
    :class:`CGInfo` (iterations, per-row residuals, converged flags).

    Args:
        func: Scalar function ``func(*x)``.
        *x: Arguments of ``func``.
        argnums: Index of the argument to differentiate.
        max_iter: Maximum number of CG iterations (positive int).
        tol: Relative-residual tolerance (``>= 0``).
        mode: HVP mode, ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: ``>= 0``.

    Returns:
        ``f(v)``; ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.
    """
    _check_mode(mode)
    _check_pos_int(max_iter, "max_iter")
    _check_nonneg(tol, "tol")
    _check_nonneg(regularization, "regularization")
    x = _as_tuple(x)
    argnums = _norm_argnums(argnums, len(x))
    op = _regularized_matvec(func, x, argnums, mode, regularization)

    def _ihvp(v: Tensor) -> Tensor:
        mat, restore = _rows(v, x[argnums])
        sol, _ihvp.info = cg_solve(op, mat, max_iter, tol)
        return restore(sol)

    _ihvp.info = None
    return _ihvp


# --------------------------------------------------------------------------- LiSSA
def ihvp_lissa(
    func: Callable,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable | None = None,
    mode: str = "rev-rev",
    *,
    seed: int = 0,
    verbose: bool = True,
) -> Callable[..., Tensor]:
    """Build ``f(x, v, in_dims=None) ≈ (H + damping * scaling * I)^{-1} v`` by LiSSA.

    See :func:`ihvp_at_x_lissa` for the arguments and the algorithm.
    """
    _check_mode(mode)
    kwargs = dict(
        argnums=argnums,
        batch_size=batch_size,
        num_repeat=num_repeat,
        recursion_depth=recursion_depth,
        damping=damping,
        scaling=scaling,
        collate_fn=collate_fn,
        mode=mode,
        seed=seed,
        verbose=verbose,
    )

    def _ihvp(x: tuple, v: Tensor, in_dims: tuple | None = None) -> Tensor:
        return ihvp_at_x_lissa(func, *_as_tuple(x), in_dims=in_dims, **kwargs)(v)

    return _ihvp


def _lissa_sample_count(x: tuple, in_dims: tuple) -> int:
    sizes = {t.shape[d] for t, d in zip(x, in_dims, strict=True) if d is not None}
    if len(sizes) != 1:
        msg = (
            "LiSSA needs the data arguments to share one sample count along `in_dims`; "
            f"got sizes {sorted(sizes)} (empty: no argument has a non-None in_dim)."
        )
        raise IHVPUsageError(msg)
    return sizes.pop()


def ihvp_at_x_lissa(
    func: Callable,
    *x: Tensor,
    in_dims: tuple | None = None,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable | None = None,
    mode: str = "rev-rev",
    seed: int = 0,
    verbose: bool = True,
) -> Callable[[Tensor], Tensor]:
    """Build ``f(v) ≈ (H + damping * scaling * I)^{-1} v`` by the LiSSA recursion.

    ``x`` holds the parameters (``x[argnums]``) and data arguments; ``in_dims[j]`` is the
    sample dimension of ``x[j]`` (``None`` = not sampled; default: ``None`` for
    ``argnums``, 0 for every other argument). Each step draws ``batch_size`` distinct
    samples (a local ``torch.Generator`` seeded with ``seed``, so results are
    reproducible and the global RNG is untouched), builds the mini-batch arguments
    (passed through ``collate_fn(sampled_x) -> args`` if given; ``args[argnums]`` must
    stay the parameters) and updates every row of ``v`` at once with the same batch::

        u <- v + (1 - damping) * u - H_batch u / scaling,   u_0 = v

    The estimate ``u / scaling`` (averaged over ``num_repeat`` runs) converges to
    ``(H + damping * scaling * I)^{-1} v`` when ``||(1 - damping) I - H_batch / scaling||
    <= 1``. That condition implies ``||u_t|| <= (t + 1) ||v||``; if a row exceeds
    ``10 (t + 1) ||v||`` (or is not finite) the recursion is diverging: a ``UserWarning``
    naming ``scaling`` is raised and that run stops early (its result is unreliable).

    Args:
        func: Scalar function ``func(*args)`` (mean loss over the given samples).
        *x: Arguments of ``func`` (parameters and the full data).
        in_dims: Sample dimension per argument, or ``None`` for the default.
        argnums: Index of the parameters in ``x``.
        batch_size: Samples per recursion step.
        num_repeat: Independent runs averaged.
        recursion_depth: Steps per run.
        damping: In ``[0, 1)``.
        scaling: ``> 0``; must exceed the largest mini-batch Hessian eigenvalue.
        collate_fn: Optional ``collate_fn(sampled_x) -> args`` for ``func``.
        mode: HVP mode.
        seed: Seed of the mini-batch sampler.
        verbose: Show a tqdm progress bar.

    Returns:
        ``f(v)``; ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.
    """
    _check_mode(mode)
    x = _as_tuple(x)
    argnums = _norm_argnums(argnums, len(x))
    for name, val in (
        ("batch_size", batch_size),
        ("num_repeat", num_repeat),
        ("recursion_depth", recursion_depth),
    ):
        _check_pos_int(val, name)
    if not (isinstance(damping, (int, float)) and 0 <= damping < 1):
        msg = f"`damping` must be in [0, 1), got {damping!r}."
        raise IHVPUsageError(msg)
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        msg = f"`scaling` must be a finite number > 0, got {scaling!r}."
        raise IHVPUsageError(msg)
    if in_dims is None:
        in_dims = tuple(None if j == argnums else 0 for j in range(len(x)))
    in_dims = tuple(in_dims)
    if len(in_dims) != len(x) or in_dims[argnums] is not None:
        msg = (
            f"`in_dims` must have one entry per argument ({len(x)}) and None at "
            f"`argnums`={argnums}; got {in_dims}."
        )
        raise IHVPUsageError(msg)
    n = _lissa_sample_count(x, in_dims)
    if batch_size > n:
        msg = f"`batch_size`={batch_size} exceeds the number of samples ({n})."
        raise IHVPUsageError(msg)
    params = x[argnums]

    def batch_op(gen: torch.Generator) -> Callable[[Tensor], Tensor]:
        idx = torch.randperm(n, generator=gen)[:batch_size]
        sampled = tuple(
            t if d is None else t.index_select(d, idx.to(t.device))
            for t, d in zip(x, in_dims, strict=True)
        )
        args = _as_tuple(collate_fn(sampled)) if collate_fn is not None else sampled
        return _regularized_matvec(func, args, argnums, mode, 0.0)

    def _ihvp(v: Tensor) -> Tensor:
        mat, restore = _rows(v, params)
        gen = torch.Generator().manual_seed(seed)
        vnorm = mat.norm(dim=1)
        total = torch.zeros_like(mat)
        bar = tqdm(total=num_repeat * recursion_depth, disable=not verbose, desc="LiSSA")
        for _ in range(num_repeat):
            u = mat.clone()
            for t in range(recursion_depth):
                u = mat + (1 - damping) * u - batch_op(gen)(u) / scaling
                bar.update(1)
                unorm = u.norm(dim=1)
                if not bool((torch.isfinite(unorm) & (unorm <= 10 * (t + 2) * vnorm)).all()):
                    warnings.warn(
                        f"LiSSA recursion diverges at step {t + 1} (||u|| grew beyond "
                        "10 (t+1) ||v||): increase `scaling` (it must exceed the largest "
                        "mini-batch Hessian eigenvalue) or `damping`. Stopping this run.",
                        UserWarning,
                        stacklevel=2,
                    )
                    break
            total += u / scaling
        bar.close()
        return restore(total / num_repeat)

    return _ihvp


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
    gen = torch.Generator().manual_seed(seed)
    evals, evecs = arnoldi_eigs(
        lambda m: op(m) / norm_constant, gen, ref, min(max_iter, p), tol, verbose
    )
    evals = evals * norm_constant
    order = evals.abs().argsort(descending=True)[:top_k]
    evals, evecs = evals[order], evecs[order]
    keep = evals.abs() > p * torch.finfo(ref.dtype).eps * evals.abs().max()
    if not bool(keep.all()):
        warnings.warn(
            f"Arnoldi dropped {int((~keep).sum())} numerically zero Ritz value(s); "
            "increase `regularization` or lower `top_k`.",
            UserWarning,
            stacklevel=2,
        )
        evals, evecs = evals[keep], evecs[keep]
    if evals.numel() == 0:
        msg = "The Hessian is numerically zero at x; Arnoldi cannot invert it."
        raise IHVPUsageError(msg)

    def _ihvp(v: Tensor) -> Tensor:
        mat, restore = _rows(v, ref)
        return restore(((mat @ evecs.T) / evals) @ evecs)

    return _ihvp
