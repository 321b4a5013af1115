"""Fisher-type curvature: empirical-Fisher IFVP, EK-FAC and DataInf inverses.

Empirical Fisher (:func:`ifvp_explicit`, :func:`ifvp_at_x_explicit`)
    ``func(*x)`` returns per-sample losses of shape ``(n,)`` (a scalar counts as one
    sample); sample ``i`` is entry ``i`` of that output. With per-sample gradients
    ``g_i = d func(*x)[i] / d x[argnums]`` (rows of the Jacobian, flattened to ``(p,)``),
    ``F = (1/n) Σ_i g_i g_iᵀ`` and the solvers return ``(F + regularization I)^{-1} v``.

EK-FAC for ``nn.Linear`` layers (George et al. 2018)
    Per layer, inputs ``a`` ``(B, d_in)`` or ``(B, T, d_in)`` and output gradients
    ``ds`` ``(B, d_out)`` / ``(B, T, d_out)`` (gradients of the *per-sample* loss w.r.t.
    the layer output). With a bias, ``a`` gets a trailing column of ones (``d_in' =
    d_in + 1``) and the bias is the last column of the gradient matrix. Per-sample
    gradient ``G_b = Σ_t ds_bt a_btᵀ`` ``(d_out, d_in')``. Covariance convention: sums
    over tokens, mean over samples: ``A = (1/N) Σ_b Σ_t a_bt a_btᵀ``, ``S = (1/N) Σ_b Σ_t
    ds_bt ds_btᵀ``. ``A = Q_A diag Q_Aᵀ``, ``S = Q_S diag Q_Sᵀ`` (eigenvectors in columns),
    eigenvalue correction ``Λ = (1/N) Σ_b (Q_Sᵀ G_b Q_A)²`` (elementwise), and the inverse
    ``V ↦ Q_S [(Q_Sᵀ V Q_A) / (Λ + damping)] Q_Aᵀ``. This equals ``(F̂ + damping I)^{-1}``
    with ``F̂ = K diag(vec Λ) Kᵀ``, ``K = Q_S ⊗ Q_A`` (row-major ``vec``), whose diagonal
    in the basis ``K`` matches that of the empirical Fisher ``(1/N) Σ_b vec G_b vec G_bᵀ``.

DataInf (Kwon et al. 2023): :func:`ifvp_datainf`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dattri.func.hvp_core import _as_tuple, _check_nonneg, _norm_argnums, _SymmetricSolver

__all__ = [
    "IFVPUsageError",
    "datainf_regularization",
    "ekfac_eigenvalues",
    "ekfac_ifvp",
    "estimate_covariance",
    "estimate_eigenvector",
    "estimate_lambda",
    "ifvp_at_x_explicit",
    "ifvp_datainf",
    "ifvp_explicit",
    "kfac_factors",
    "linear_grad_to_matrix",
    "linear_layer_cache",
    "matrix_to_linear_grad",
]


class IFVPUsageError(ValueError):
    """Raised when a Fisher/IFVP function is called with invalid arguments."""


# --------------------------------------------------------------------------- explicit
def _rows(v: Tensor, p: int, ref: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    if not isinstance(v, Tensor) or not v.is_floating_point():
        msg = f"`v` must be a floating-point tensor, got {type(v).__name__}."
        raise IFVPUsageError(msg)
    if v.dim() not in (1, 2) or v.shape[-1] != p:
        msg = f"`v` has shape {tuple(v.shape)}; expected ({p},) or (k, {p})."
        raise IFVPUsageError(msg)
    if not bool(torch.isfinite(v).all()):
        msg = "`v` contains NaN or inf; pass finite vectors."
        raise IFVPUsageError(msg)
    shape, dtype, device = v.shape, v.dtype, v.device
    mat = v.reshape(-1, p).to(device=ref.device, dtype=ref.dtype)
    return mat, lambda out: out.reshape(shape).to(device=device, dtype=dtype)


def ifvp_explicit(
    func: Callable, argnums: int = 0, regularization: float = 0.0
) -> Callable[[tuple, Tensor], Tensor]:
    """Build ``f(x, v) = (F(x) + regularization I)^{-1} v`` (empirical Fisher).

    See :func:`ifvp_at_x_explicit` for what ``func`` must return.
    """
    _check_nonneg(regularization, "regularization", IFVPUsageError)

    def _ifvp(x: tuple, v: Tensor) -> Tensor:
        return ifvp_at_x_explicit(
            func, *_as_tuple(x), argnums=argnums, regularization=regularization
        )(v)

    return _ifvp


def ifvp_at_x_explicit(
    func: Callable, *x: Tensor, argnums: int = 0, regularization: float = 0.0
) -> Callable[[Tensor], Tensor]:
    """Build ``f(v) = (F + regularization I)^{-1} v`` with ``F = (1/n) Σ_i g_i g_iᵀ``.

    ``func(*x)`` must return the per-sample losses ``(n,)`` (or a scalar: ``n = 1``); the
    per-sample gradients ``G`` ``(n, p)`` are the Jacobian rows w.r.t. ``x[argnums]``
    (flattened). The factorisation is done once: a ``p x p`` Cholesky when ``n >= p`` or
    ``regularization == 0``, else the Woodbury identity ``(rI + GᵀG/n)^{-1} = (I -
    Gᵀ (n r I + G Gᵀ)^{-1} G) / r`` with an ``n x n`` factorisation.

    Args:
        func: ``func(*x) -> (n,)`` per-sample losses.
        *x: Arguments of ``func``.
        argnums: Index of the differentiated argument.
        regularization: ``>= 0``; must be ``> 0`` when ``F`` is singular (e.g. ``n < p``).

    Returns:
        ``f(v)`` with ``v`` of shape ``(p,)`` or ``(k, p)``; output has ``v``'s shape.

    Raises:
        IFVPUsageError: Bad arguments, output of the wrong rank, non-finite gradients or
            a singular ``F + regularization I``.
    """
    _check_nonneg(regularization, "regularization", IFVPUsageError)
    x = _as_tuple(x)
    try:
        argnums = _norm_argnums(argnums, len(x))
    except ValueError as err:
        raise IFVPUsageError(str(err)) from None
    ref = x[argnums]
    p = ref.numel()
    jac = torch.func.jacrev(func, argnums=argnums)(*x)
    out_dim = jac.dim() - ref.dim()
    if out_dim not in (0, 1):
        msg = f"func(*x) must return per-sample losses of shape (n,) or a scalar; got {out_dim}-D."
        raise IFVPUsageError(msg)
    grads = jac.reshape(-1, p)
    n = grads.shape[0]
    if not bool(torch.isfinite(grads).all()):
        msg = "Per-sample gradients contain NaN or inf; check func and x."
        raise IFVPUsageError(msg)
    if n < p and regularization > 0:
        small = _SymmetricSolver(
            grads @ grads.T + n * regularization * torch.eye(n, dtype=ref.dtype, device=ref.device),
            IFVPUsageError,
            "G Gᵀ",
        )

        def solve(mat: Tensor) -> Tensor:
            return (mat - small.solve(mat @ grads.T) @ grads) / regularization

    else:
        fisher = grads.T @ grads / n
        fisher.diagonal().add_(regularization)
        solve = _SymmetricSolver(fisher, IFVPUsageError, "The empirical Fisher").solve

    def _ifvp(v: Tensor) -> Tensor:
        mat, restore = _rows(v, p, ref)
        return restore(solve(mat))

    return _ifvp


# --------------------------------------------------------------------------- EK-FAC core
def _check_factors(a: Tensor, ds: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if a.dim() not in (2, 3) or ds.dim() != a.dim() or a.shape[:-1] != ds.shape[:-1]:
        msg = (
            f"`a` {tuple(a.shape)} and `ds` {tuple(ds.shape)} must be (B, d_in)/(B, d_out) or "
            "(B, T, d_in)/(B, T, d_out) with matching leading dims."
        )
        raise IFVPUsageError(msg)
    if mask is not None:
        if a.dim() != 3 or tuple(mask.shape) != tuple(a.shape[:2]):
            msg = f"`mask` must have shape (B, T) = {tuple(a.shape[:2])} for 3-D inputs."
            raise IFVPUsageError(msg)
        m = mask.to(a.dtype).unsqueeze(-1)
        a, ds = a * m, ds * m
    return a, ds


def _with_bias(a: Tensor, bias: bool) -> Tensor:
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if bias else a


def kfac_factors(
    a: Tensor, ds: Tensor, *, bias: bool = False, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """K-FAC factors of one Linear layer from captured inputs and output gradients.

    Args:
        a: Layer inputs ``(B, d_in)`` or ``(B, T, d_in)``.
        ds: Gradients of the per-sample losses w.r.t. the layer outputs, ``(B, d_out)`` or
            ``(B, T, d_out)``.
        bias: Append a column of ones to ``a`` (layer with bias).
        mask: Optional ``(B, T)`` token mask (0 = ignore the token).

    Returns:
        ``(A, S)``: ``A = (1/B) Σ_b Σ_t a_bt a_btᵀ`` ``(d_in', d_in')`` and ``S`` likewise
        ``(d_out, d_out)``.
    """
    a, ds = _check_factors(_with_bias(a, bias), ds, mask)
    a2, ds2 = a.reshape(-1, a.shape[-1]), ds.reshape(-1, ds.shape[-1])
    n = a.shape[0]
    return a2.T @ a2 / n, ds2.T @ ds2 / n


def _rotated_sq_sum(a: Tensor, ds: Tensor, q_a: Tensor, q_s: Tensor) -> Tensor:
    """``Σ_b (Q_Sᵀ G_b Q_A)²`` ``(d_out, d_in')`` without storing all per-sample grads."""
    ra, rs = a @ q_a, ds @ q_s
    if a.dim() == 2:  # G_b is rank one: (Q_Sᵀ ds)(Q_Aᵀ a)ᵀ
        return (rs * rs).T @ (ra * ra)
    out = torch.zeros(q_s.shape[1], q_a.shape[1], dtype=a.dtype, device=a.device)
    chunk = max(1, 2**24 // max(1, out.numel()))
    for i in range(0, a.shape[0], chunk):
        g = torch.einsum("bto,bti->boi", rs[i : i + chunk], ra[i : i + chunk])
        out += (g * g).sum(0)
    return out


def ekfac_eigenvalues(
    a: Tensor,
    ds: Tensor,
    q_a: Tensor,
    q_s: Tensor,
    *,
    bias: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """EK-FAC eigenvalue correction ``Λ = (1/B) Σ_b (Q_Sᵀ G_b Q_A)²``.

    Args:
        a: Layer inputs ``(B, d_in)`` or ``(B, T, d_in)``.
        ds: Per-sample output gradients ``(B, d_out)`` or ``(B, T, d_out)``.
        q_a: Eigenvectors of ``A`` in columns ``(d_in', d_in')``.
        q_s: Eigenvectors of ``S`` in columns ``(d_out, d_out)``.
        bias: Append a column of ones to ``a``.
        mask: Optional ``(B, T)`` token mask.

    Returns:
        ``Λ`` of shape ``(d_out, d_in')``.
    """
    a, ds = _check_factors(_with_bias(a, bias), ds, mask)
    return _rotated_sq_sum(a, ds, q_a, q_s) / a.shape[0]


def ekfac_ifvp(v: Tensor, q_a: Tensor, q_s: Tensor, lam: Tensor, damping: float = 0.0) -> Tensor:
    """Apply the EK-FAC inverse ``V ↦ Q_S [(Q_Sᵀ V Q_A) / (Λ + damping)] Q_Aᵀ``.

    Args:
        v: Gradient matrices ``(..., d_out, d_in')`` (bias as last column, see
            :func:`linear_grad_to_matrix`).
        q_a: ``(d_in', d_in')`` eigenvectors of ``A`` (columns).
        q_s: ``(d_out, d_out)`` eigenvectors of ``S`` (columns).
        lam: ``(d_out, d_in')`` corrected eigenvalues.
        damping: ``>= 0``; ``Λ + damping`` must be positive.

    Returns:
        Tensor of ``v``'s shape.
    """
    _check_nonneg(damping, "damping", IFVPUsageError)
    if tuple(v.shape[-2:]) != tuple(lam.shape):
        msg = f"`v` trailing shape {tuple(v.shape[-2:])} must equal Λ's {tuple(lam.shape)}."
        raise IFVPUsageError(msg)
    denom = lam + damping
    if not bool((denom > 0).all()):
        msg = "Λ + damping has zero entries (e.g. dead units or few samples); use damping > 0."
        raise IFVPUsageError(msg)
    return q_s @ ((q_s.T @ v @ q_a) / denom) @ q_a.T


def linear_grad_to_matrix(
    weight_grad: Tensor, bias_grad: Tensor | None = None, d_out: int | None = None
) -> Tensor:
    """Pack Linear-layer gradients into ``(m, d_out, d_in[+1])`` (bias = last column).

    Args:
        weight_grad: ``(m, d_out, d_in)``, or flat ``(m, d_out * d_in)`` (row-major, as
            ``weight.flatten()``) together with ``d_out`` or ``bias_grad``.
        bias_grad: ``(m, d_out)`` or ``None``.
        d_out: Output size, needed only for a flat ``weight_grad`` without ``bias_grad``.

    Returns:
        ``(m, d_out, d_in + 1)`` with a bias, else ``(m, d_out, d_in)``.
    """
    if weight_grad.dim() == 2:
        rows = bias_grad.shape[-1] if bias_grad is not None else d_out
        if rows is None:
            msg = "A flat `weight_grad` (m, d_out*d_in) needs `d_out` or `bias_grad`."
            raise IFVPUsageError(msg)
        weight_grad = weight_grad.reshape(weight_grad.shape[0], rows, -1)
    if bias_grad is None:
        return weight_grad
    return torch.cat([weight_grad, bias_grad.unsqueeze(-1)], dim=-1)


def matrix_to_linear_grad(mat: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`linear_grad_to_matrix`: ``(m, d_out, d_in')`` to ``(W, b)``."""
    if bias:
        return mat[..., :-1], mat[..., -1]
    return mat, None


# --------------------------------------------------------------------------- EK-FAC loops
@contextlib.contextmanager
def linear_layer_cache(
    model: nn.Module, module_names: Sequence[str]
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Capture ``{name: (a, s)}`` for Linear layers during forward passes.

    ``a`` is the detached layer input with a column of ones appended when the layer has a
    bias; ``s`` is the layer output (made to require grad so output gradients exist even
    when parameters are frozen). Entries are overwritten on every forward pass.

    Args:
        model: The model.
        module_names: Names (``model.named_modules()``) of ``nn.Linear`` layers.

    Yields:
        The cache dict, filled on each forward pass; hooks are removed on exit.
    """
    modules = dict(model.named_modules())
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name in module_names:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            msg = f"`module_names` entry {name!r} is not an nn.Linear of the model."
            raise IFVPUsageError(msg)

        def hook(mod: nn.Module, inputs: tuple, out: Tensor, name: str = name) -> Tensor | None:
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            cache[name] = (_with_bias(inputs[0].detach(), mod.bias is not None), out)
            return out

        handles.append(mod.register_forward_hook(hook))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()


def _to_device(batch: object, device: str | torch.device) -> object:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(b, device) for k, b in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _captures(
    func: Callable,
    dataloader: Iterable,
    layer_cache: Mapping[str, tuple[Tensor, Tensor]],
    max_iter: int | None,
    device: str | torch.device,
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Yield ``{name: (a, ds)}`` per batch; ``ds`` = grads of ``B * func(batch)``."""
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        msg = f"`max_iter` must be None or a positive int, got {max_iter!r}."
        raise IFVPUsageError(msg)
    for step, batch in enumerate(dataloader):
        if max_iter is not None and step >= max_iter:
            break
        with torch.enable_grad():
            loss = func(_to_device(batch, device))
            if not layer_cache:
                msg = "`layer_cache` is empty after func(batch): no Linear layer was hooked."
                raise IFVPUsageError(msg)
            names = list(layer_cache)
            outs = [layer_cache[n][1] for n in names]
            if loss.dim() != 0 or any(not o.requires_grad for o in outs):
                msg = (
                    "func(batch) must return a scalar mean loss that depends on the cached outputs."
                )
                raise IFVPUsageError(msg)
            grads = torch.autograd.grad(loss * outs[0].shape[0], outs)
        yield {n: (layer_cache[n][0], g.detach()) for n, g in zip(names, grads)}


def estimate_covariance(
    func: Callable,
    dataloader: Iterable,
    layer_cache: Mapping[str, tuple[Tensor, Tensor]],
    max_iter: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, tuple[Tensor, Tensor]]:
    """Upstream-compatible K-FAC covariance estimation over a data loader.

    ``func(batch)`` runs the model on a batch (moved to ``device``) and returns the
    **mean** loss; during that forward pass ``layer_cache`` must be filled with
    ``{name: (a, s)}`` (input with the bias column already appended, and output; e.g. by
    :func:`linear_layer_cache`). Output gradients are taken of ``B * loss`` so that they
    are per-sample gradients. Covariances follow :func:`kfac_factors` (token sums, mean
    over all samples of the first ``max_iter`` batches).

    Returns:
        ``{name: (A (d_in', d_in'), S (d_out, d_out))}``.
    """
    sums: dict[str, list] = {}
    for cap in _captures(func, dataloader, layer_cache, max_iter, device):
        for name, (a, ds) in cap.items():
            a2, ds2 = a.reshape(-1, a.shape[-1]), ds.reshape(-1, ds.shape[-1])
            entry = sums.setdefault(name, [0.0, 0.0, 0])
            entry[0] = entry[0] + a2.T @ a2
            entry[1] = entry[1] + ds2.T @ ds2
            entry[2] += a.shape[0]
    return {name: (s_a / n, s_s / n) for name, (s_a, s_s, n) in sums.items()}


def estimate_eigenvector(
    covariances: Mapping[str, tuple[Tensor, Tensor]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """Eigenvectors (columns, ascending eigenvalues) of each ``(A, S)`` pair.

    Returns:
        ``{name: (Q_A, Q_S)}``.
    """
    out = {}
    for name, (cov_a, cov_s) in covariances.items():
        out[name] = (
            torch.linalg.eigh(0.5 * (cov_a + cov_a.T))[1],
            torch.linalg.eigh(0.5 * (cov_s + cov_s.T))[1],
        )
    return out


def estimate_lambda(
    func: Callable,
    dataloader: Iterable,
    eigenvectors: Mapping[str, tuple[Tensor, Tensor]],
    layer_cache: Mapping[str, tuple[Tensor, Tensor]],
    max_iter: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Upstream-compatible EK-FAC eigenvalue correction over a data loader.

    Same ``func``/``layer_cache`` contract as :func:`estimate_covariance`; computes
    ``Λ = (1/N) Σ_b (Q_Sᵀ G_b Q_A)²`` per layer.

    Returns:
        ``{name: Λ (d_out, d_in')}``.
    """
    sums: dict[str, list] = {}
    for cap in _captures(func, dataloader, layer_cache, max_iter, device):
        for name, (a, ds) in cap.items():
            q_a, q_s = eigenvectors[name]
            entry = sums.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + _rotated_sq_sum(a, ds, q_a, q_s)
            entry[1] += a.shape[0]
    return {name: s / n for name, (s, n) in sums.items()}


# --------------------------------------------------------------------------- DataInf
def datainf_regularization(grads: Tensor) -> float:
    """Default DataInf damping of one layer: ``0.1 * mean_i ||g_i||² / p_l``.

    Follows Kwon et al. (2023); falls back to 1.0 when every gradient is zero (the
    inverse is then ``v / r`` for any ``r``).
    """
    r = 0.1 * float((grads * grads).sum(1).mean()) / grads.shape[1]
    return r if r > 0 and math.isfinite(r) else 1.0


def ifvp_datainf(
    train_grads: Tensor | Sequence[Tensor],
    v: Tensor | Sequence[Tensor],
    regularization: float | Sequence[float] | None = None,
) -> Tensor | list[Tensor]:
    """DataInf inverse, per layer ``l``: ``q = (1/n) Σ_i (v - (v·g_i)/(r + ||g_i||²) g_i) / r``.

    This averages the Sherman-Morrison inverses of ``g_i g_iᵀ + r I``. Computed as two
    matrix products per layer, ``O(m n p_l)`` time and no ``(n, m, p)`` tensor.

    Args:
        train_grads: Per-layer training gradients, a list of ``(n, p_l)`` tensors (or one
            ``(n, p)`` tensor = one layer).
        v: ``(m, p)`` / ``(p,)`` with ``p = Σ_l p_l`` (layers concatenated in order), or a
            list of per-layer ``(m, p_l)`` tensors.
        regularization: ``r > 0`` for every layer, a list with one ``r_l`` per layer, or
            ``None`` for :func:`datainf_regularization` of each layer.

    Returns:
        Same type and shapes as ``v``.
    """
    layers = [train_grads] if isinstance(train_grads, Tensor) else list(train_grads)
    if not layers or any(g.dim() != 2 for g in layers):
        msg = "`train_grads` must be an (n, p) tensor or a non-empty list of (n, p_l) tensors."
        raise IFVPUsageError(msg)
    n, sizes = layers[0].shape[0], [g.shape[1] for g in layers]
    if any(g.shape[0] != n for g in layers) or n == 0:
        msg = "Every layer of `train_grads` needs the same, non-zero number of rows n."
        raise IFVPUsageError(msg)
    if isinstance(v, Tensor):
        if v.dim() not in (1, 2) or v.shape[-1] != sum(sizes):
            msg = f"`v` has shape {tuple(v.shape)}; expected (m, {sum(sizes)}) or ({sum(sizes)},)."
            raise IFVPUsageError(msg)
        v_layers = list(v.reshape(-1, sum(sizes)).split(sizes, dim=1))
    else:
        v_layers = [t.reshape(-1, t.shape[-1]) for t in v]
        if [t.shape[1] for t in v_layers] != sizes:
            msg = f"Per-layer `v` sizes {[t.shape[-1] for t in v]} must equal {sizes}."
            raise IFVPUsageError(msg)
    if regularization is None:
        regs = [datainf_regularization(g) for g in layers]
    elif isinstance(regularization, (int, float)):
        regs = [float(regularization)] * len(layers)
    else:
        regs = [float(r) for r in regularization]
    if len(regs) != len(layers) or any(not (math.isfinite(r) and r > 0) for r in regs):
        msg = f"`regularization` must be > 0 (one value or one per layer), got {regularization!r}."
        raise IFVPUsageError(msg)
    outs = []
    for g, vl, r in zip(layers, v_layers, regs):
        vl = vl.to(g.dtype)
        coef = (vl @ g.T) / (r + (g * g).sum(1))  # (m, n)
        outs.append((vl - coef @ g / n) / r)
    if isinstance(v, Tensor):
        return torch.cat(outs, dim=1).reshape(v.shape).to(v.dtype)
    return [o.reshape(t.shape).to(t.dtype) for o, t in zip(outs, v)]
