"""LiSSA inverse-HVP (see :mod:`dattri.func.hessian`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dattri.func.hvp_core import (
    IHVPUsageError,
    _as_tuple,
    _check_mode,
    _check_pos_int,
    _norm_argnums,
    _regularized_matvec,
    _rows,
)

__all__ = ["ihvp_at_x_lissa", "ihvp_lissa"]


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
    preconditioner: Callable[[Tensor], Tensor] | None = None,
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
        preconditioner=preconditioner,
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
    preconditioner: Callable[[Tensor], Tensor] | None = None,
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

    With ``preconditioner`` ``P`` (symmetric positive definite ``(k, p) -> (k, p)``,
    approximating ``(H + damping * scaling * I)^{-1}`` up to scale, see
    :mod:`dattri.func.preconditioners`), the preconditioned series
    ``u <- P v + u - P (H_batch u / scaling + damping * u)``, ``u_0 = P v``, has the
    same fixed point and converges when the eigenvalues of ``P H_batch / scaling +
    damping P`` lie in ``(0, 2)``: ``scaling`` must then exceed the largest eigenvalue
    of ``P H_batch`` (about 1 for a good, unit-scaled preconditioner).

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
        preconditioner: Optional ``P`` (see above).

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
        start = mat if preconditioner is None else preconditioner(mat)
        vnorm = start.norm(dim=1)
        total = torch.zeros_like(mat)
        bar = tqdm(total=num_repeat * recursion_depth, disable=not verbose, desc="LiSSA")
        for _ in range(num_repeat):
            u = start.clone()
            for t in range(recursion_depth):
                if preconditioner is None:
                    u = mat + (1 - damping) * u - batch_op(gen)(u) / scaling
                else:
                    step = batch_op(gen)(u) / scaling + damping * u
                    u = start + u - preconditioner(step)
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
