"""Per-sample gradients of common layers from captured layer factors.

A layer's per-sample gradient can be written with two captured factors: the layer
input ``a`` and the gradient of the per-sample loss with respect to the layer output
``ds``. This module turns the raw captures into a canonical *linearised* form and
computes, from it,

- exact per-sample gradients of the layer parameters (:func:`factor_grads`),
- Kronecker-factored projections ``P_out G P_in^T`` of the per-sample weight
  gradient ``G`` without forming ``G`` (:func:`kron_project`),
- the linearised factors themselves (:func:`linear_factors`).

Supported layers (exact type match, subclasses are not assumed to share the forward):
``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` (without ``max_norm`` or
``scale_grad_by_freq``), ``nn.LayerNorm`` and the ``Conv1D`` of Hugging Face
``transformers`` (GPT-2's attention and MLP projections: ``y = x @ W + b`` with the
weight stored transposed, ``(d_in, d_out)``). ``transformers`` is not imported: the
class is recognised by its name and module.

For ``Conv1D`` the Kronecker/linearised forms use the ``nn.Linear`` orientation: the
gradient matrix is ``grad_W^T`` of shape ``(d_out, d_in)``, so K-FAC/LoGra code treats
both layer types alike; :func:`factor_grads` returns gradients in the parameter's own
``(d_in, d_out)`` layout.

Shapes: ``B`` is the number of samples; the captured per-sample tensors may carry any
number of leading dimensions (a sequence axis, a kept batch axis of size 1, ...),
which are flattened into one axis ``T`` and summed over, exactly as autograd does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_kron_shapes",
    "factor_grads",
    "kron_project",
    "layer_kind",
    "linear_factors",
    "matrix_shape",
]

_KINDS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv2d: "conv2d",
    nn.Embedding: "embedding",
    nn.LayerNorm: "layernorm",
}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``transformers.pytorch_utils.Conv1D``.

    Args:
        module: Any module.

    Returns:
        True for the Hugging Face ``Conv1D`` (GPT-2 projections) with a 2-D weight
        of shape ``(nx, nf)``.
    """
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__ == "transformers.pytorch_utils"
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
        and module.weight.shape[1] == getattr(module, "nf", None)
    )


def layer_kind(module: nn.Module) -> str | None:
    """Return the factor kind of a module, or ``None`` if hooks cannot handle it.

    Args:
        module: Any module.

    Returns:
        One of ``"linear"``, ``"conv1d"`` (Hugging Face GPT-2 ``Conv1D``),
        ``"conv2d"``, ``"embedding"``, ``"layernorm"``, or ``None`` when the module
        type is not supported (subclasses included) or its configuration changes
        the gradient (``Embedding`` with ``max_norm`` or ``scale_grad_by_freq``).
    """
    if is_hf_conv1d(module):
        return "conv1d"
    kind = _KINDS.get(type(module))
    if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq):
        return None
    return kind


def matrix_shape(module: nn.Module, with_bias: bool) -> tuple[int, int]:
    """Shape ``(d_out, d_in)`` of the gradient matrix a Kronecker projection acts on.

    ``Linear``: ``(out_features, in_features [+1])``; ``Conv1D`` (transformers):
    ``(nf, nx [+1])``, i.e. the transposed weight gradient; ``Conv2d``:
    ``(out_channels, in_channels / groups * kh * kw [+1])``; ``Embedding``:
    ``(num_embeddings, embedding_dim)``. The ``+1`` is the bias column (appended
    last) when ``with_bias`` is true and the layer has a bias.

    Args:
        module: A supported ``Linear``, ``Conv2d`` or ``Embedding`` module.
        with_bias: Whether the bias is appended as an extra input column.

    Returns:
        ``(d_out, d_in)``.

    Raises:
        ValueError: If the module kind has no matrix form (``LayerNorm``, others).
    """
    kind = layer_kind(module)
    extra = int(with_bias and getattr(module, "bias", None) is not None)
    if kind == "linear":
        return module.out_features, module.in_features + extra
    if kind == "conv1d":
        return module.weight.shape[1], module.weight.shape[0] + extra
    if kind == "conv2d":
        d_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        return module.out_channels, d_in + extra
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    msg = (
        f"{type(module).__name__} has no Kronecker (matrix) form; supported are "
        "nn.Linear, transformers' Conv1D, nn.Conv2d and nn.Embedding. Project its gradient with "
        "per_sample_grad_dict and a random projector instead."
    )
    raise ValueError(msg)


def _conv_pad(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """Explicit ``F.pad`` tuple ``(w_left, w_right, h_left, h_right)`` of a Conv2d.

    Args:
        module: The convolution.

    Returns:
        The padding that ``module`` applies to its input.
    """
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def _conv_input(module: nn.Conv2d, a: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Conv2d input as a 4-D batch, pre-padded where ``padding`` cannot express it.

    Args:
        module: The convolution.
        a: Captured input ``(B, *lead, C, H, W)``.

    Returns:
        ``(x, padding)``: ``x`` of shape ``(B * N, C, H', W')`` and the symmetric
        padding still to apply in the convolution/unfold.
    """
    c, h, w = a.shape[-3:]
    x = a.reshape(-1, c, h, w)
    pad = _conv_pad(module)
    if module.padding_mode != "zeros":
        return F.pad(x, pad, mode=module.padding_mode), (0, 0)
    if pad[0] == pad[1] and pad[2] == pad[3]:
        return x, (pad[2], pad[0])
    return F.pad(x, pad), (0, 0)


def _grouped(module: nn.Module, kind: str, a: Tensor, ds: Tensor) -> tuple[Tensor, ...]:
    """Canonical grouped form of Linear/Conv2d captures.

    Args:
        module: The ``Linear`` or ``Conv2d`` module.
        kind: ``"linear"`` or ``"conv2d"``.
        a: Captured input, ``(B, *lead, d_in)`` or ``(B, *lead, C, H, W)``.
        ds: Output gradient, ``(B, *lead, d_out)`` or ``(B, *lead, C_out, Ho, Wo)``.

    Returns:
        ``(A, S)`` with ``A`` of shape ``(B, T, G, d_in / G)`` and ``S`` of shape
        ``(B, T, G, d_out / G)`` (``G`` = groups, 1 for Linear). ``A`` holds
        unfolded patches for convolutions (channel-major, then kernel rows/cols,
        matching ``weight.view(C_out, -1)``).
    """
    n = a.shape[0]
    if kind in ("linear", "conv1d"):
        a2 = a.reshape(n, -1, 1, a.shape[-1])
        s2 = ds.reshape(n, -1, 1, ds.shape[-1])
        return a2, s2
    x, pad_arg = _conv_input(module, a)
    cols = F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=pad_arg,
        stride=module.stride,
    )  # (B * N, C * kh * kw, L)
    g = module.groups
    a2 = cols.reshape(n, -1, cols.shape[1], cols.shape[2]).transpose(2, 3)
    a2 = a2.reshape(n, -1, g, cols.shape[1] // g)
    c_out = ds.shape[-3]
    s2 = ds.reshape(n, -1, c_out, ds.shape[-2] * ds.shape[-1]).transpose(2, 3)
    s2 = s2.reshape(n, -1, g, c_out // g)
    return a2, s2


def _masked_embedding_grad(module: nn.Embedding, a: Tensor, ds: Tensor) -> tuple:
    """Flatten embedding captures and zero output gradients at ``padding_idx``.

    Args:
        module: The embedding.
        a: Indices ``(B, *lead)``.
        ds: Output gradient ``(B, *lead, D)``.

    Returns:
        ``(idx, S)`` of shapes ``(B, T)`` and ``(B, T, D)``.
    """
    n = a.shape[0]
    idx = a.reshape(n, -1)
    s = ds.reshape(n, idx.shape[1], ds.shape[-1])
    if module.padding_idx is not None:
        s = s.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)
    return idx, s


def _layernorm_xhat(module: nn.LayerNorm, a: Tensor, ds: Tensor) -> tuple:
    """Normalised LayerNorm input and output gradient, flattened.

    Args:
        module: The layer norm.
        a: Input ``(B, *lead, *normalized_shape)``.
        ds: Output gradient, same shape as ``a``.

    Returns:
        ``(xhat, S)`` each of shape ``(B, T, prod(normalized_shape))``.
    """
    n = a.shape[0]
    width = math.prod(module.normalized_shape)
    x = a.reshape(n, -1, width)
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    return xhat, ds.reshape(n, -1, width)


def _emit(val: Tensor, dst: Tensor | None, accumulate: bool) -> Tensor:
    """Return ``val`` or write/add it into ``dst``.

    Args:
        val: Computed values.
        dst: Optional destination of the same number of elements per sample.
        accumulate: Add into ``dst`` instead of overwriting it.

    Returns:
        ``dst`` if given, else ``val``.
    """
    if dst is None:
        return val
    val = val.reshape(dst.shape)
    if accumulate:
        return dst.add_(val)
    return dst.copy_(val)


def factor_grads(
    module: nn.Module,
    a: Tensor,
    ds: Tensor,
    attrs: list[str],
    out: dict[str, Tensor] | None = None,
    accumulate: bool = False,
) -> dict[str, Tensor]:
    """Exact per-sample gradients of a layer's parameters from its factors.

    Args:
        module: A supported module (see :func:`layer_kind`).
        a: Captured layer input ``(B, *per_sample_input_shape)`` (indices for
            embeddings).
        ds: Gradient of each sample's loss with respect to that sample's layer
            output, ``(B, *per_sample_output_shape)``.
        attrs: Parameter attributes wanted, a subset of ``["weight", "bias"]``.
        out: Optional ``{attr: (B, *param.shape)}`` destinations (may be strided
            views into a larger buffer); results are written into them directly.
        accumulate: Add into ``out`` instead of overwriting (repeated layer calls).

    Returns:
        ``{attr: (B, *param.shape)}`` (the ``out`` tensors when given), in the
        dtype of ``ds`` otherwise.

    Raises:
        ValueError: If the module is not supported.
    """
    kind = layer_kind(module)
    n = a.shape[0]
    dst = out or {}
    res: dict[str, Tensor] = {}
    if kind == "conv1d":
        a2 = a.reshape(n, -1, a.shape[-1]).to(ds.dtype)
        s2 = ds.reshape(n, -1, ds.shape[-1])
        if "weight" in attrs:  # weight (d_in, d_out): sum_t a_t s_t^T
            gw = torch.matmul(a2.transpose(1, 2), s2)
            res["weight"] = _emit(gw, dst.get("weight"), accumulate)
        if "bias" in attrs:
            res["bias"] = _emit(s2.sum(1), dst.get("bias"), accumulate)
    elif kind in ("linear", "conv2d"):
        a2, s2 = _grouped(module, kind, a.to(ds.dtype), ds)
        w_dst = dst.get("weight")
        if "weight" in attrs and a2.shape[1] == 1 and a2.shape[2] == 1:
            # one position, one group: a per-sample outer product
            s3, a3 = s2.reshape(n, -1, 1), a2.reshape(n, 1, -1)
            if w_dst is not None and not accumulate and w_dst.dtype == ds.dtype:
                res["weight"] = w_dst
                torch.mul(s3, a3, out=w_dst.view(n, s3.shape[1], a3.shape[2]))
            else:
                gw = (s3 * a3).reshape(n, *module.weight.shape)
                res["weight"] = _emit(gw, w_dst, accumulate)
        elif "weight" in attrs:
            # (B, G, O, T) @ (B, G, T, I): one batched GEMM contracting positions
            gw = torch.matmul(s2.permute(0, 2, 3, 1), a2.transpose(1, 2))
            res["weight"] = _emit(gw.reshape(n, *module.weight.shape), w_dst, accumulate)
        if "bias" in attrs:
            res["bias"] = _emit(s2.sum(1).reshape(n, -1), dst.get("bias"), accumulate)
    elif kind == "embedding":
        idx, s = _masked_embedding_grad(module, a, ds)
        if "weight" in attrs:
            v, d = module.num_embeddings, module.embedding_dim
            rows = (idx + v * torch.arange(n, device=idx.device).unsqueeze(1)).flatten()
            gw = torch.zeros(n * v, d, dtype=ds.dtype, device=ds.device)
            gw.index_add_(0, rows, s.reshape(-1, d))
            res["weight"] = _emit(gw.view(n, v, d), dst.get("weight"), accumulate)
    elif kind == "layernorm":
        xhat, s = _layernorm_xhat(module, a.to(ds.dtype), ds)
        shape = tuple(module.normalized_shape)
        if "weight" in attrs:
            gw = (s * xhat).sum(1).reshape(n, *shape)
            res["weight"] = _emit(gw, dst.get("weight"), accumulate)
        if "bias" in attrs:
            gb = s.sum(1).reshape(n, *shape)
            res["bias"] = _emit(gb, dst.get("bias"), accumulate)
    else:
        msg = f"No factor gradient rule for {type(module).__name__}."
        raise ValueError(msg)
    return res


def _append_ones(x: Tensor) -> Tensor:
    """Append a column of ones along the last axis.

    Args:
        x: Any tensor ``(..., d)``.

    Returns:
        ``(..., d + 1)``.
    """
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def linear_factors(
    module: nn.Module, a: Tensor, ds: Tensor, bias_column: bool = True
) -> tuple[Tensor, Tensor]:
    """Linearised per-sample factors ``(A, S)`` of a layer.

    The per-sample weight gradient is ``sum_t S[b, t] A[b, t]^T`` (Linear/Conv2d),
    ``sum_t S[b, t] * A[b, t]`` (LayerNorm weight) or a scatter of ``S`` into the
    rows ``A`` (Embedding).

    - ``Linear`` and transformers' ``Conv1D``: ``A`` ``(B, T, d_in [+1])``, ``S``
      ``(B, T, d_out)`` (for ``Conv1D`` the sum is ``grad_W^T``, the weight being
      stored as ``(d_in, d_out)``).
    - ``Conv2d`` (groups = 1): ``A`` ``(B, T, C_in * kh * kw [+1])`` unfolded patches,
      ``T`` = output positions; ``S`` ``(B, T, C_out)``.
    - ``Embedding``: ``A`` token indices ``(B, T)`` (long), ``S`` ``(B, T, D)`` with
      rows at ``padding_idx`` zeroed.
    - ``LayerNorm``: ``A`` the normalised input ``(B, T, n)``, ``S`` ``(B, T, n)``.

    ``[+1]``: a trailing column of ones when ``bias_column`` is true and the layer has
    a bias, so that ``[grad_W | grad_b] = sum_t S_t A_t^T``.

    Args:
        module: A supported module.
        a: Captured input ``(B, *per_sample_input_shape)``.
        ds: Captured output gradient ``(B, *per_sample_output_shape)``.
        bias_column: Append the ones column for layers with a bias.

    Returns:
        ``(A, S)`` as above.

    Raises:
        NotImplementedError: For grouped convolutions (block-diagonal factors).
        ValueError: For unsupported modules.
    """
    kind = layer_kind(module)
    if kind in ("linear", "conv1d", "conv2d"):
        if kind == "conv2d" and module.groups != 1:
            msg = (
                "Linearised factors of a grouped Conv2d are block-diagonal and are "
                "not returned; use per_sample_grad_dict or per_sample_kron_projected."
            )
            raise NotImplementedError(msg)
        a2, s2 = _grouped(module, kind, a.to(ds.dtype), ds)
        a2, s2 = a2.squeeze(2), s2.squeeze(2)
        if bias_column and module.bias is not None:
            a2 = _append_ones(a2)
        return a2, s2
    if kind == "embedding":
        return _masked_embedding_grad(module, a, ds)
    if kind == "layernorm":
        return _layernorm_xhat(module, a.to(ds.dtype), ds)
    msg = f"No factor rule for {type(module).__name__}."
    raise ValueError(msg)


def check_kron_shapes(module: nn.Module, proj_in: Tensor, proj_out: Tensor) -> None:
    """Validate Kronecker projector shapes for a layer.

    Args:
        module: ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d`` or
            ``nn.Embedding``.
        proj_in: Expected ``(k_in, d_in)`` or, for layers with a bias,
            ``(k_in, d_in + 1)``.
        proj_out: Expected ``(k_out, d_out)``.

    Raises:
        TypeError: If a projector is not a tensor.
        ValueError: If a shape does not match the layer.
    """
    d_out, d_in = matrix_shape(module, with_bias=False)
    with_bias = layer_kind(module) != "embedding" and module.bias is not None
    for mat, what in ((proj_in, "proj_in"), (proj_out, "proj_out")):
        if not isinstance(mat, Tensor):
            msg = f"{what} must be a Tensor, got {type(mat).__name__}."
            raise TypeError(msg)
    ok_in = (d_in, d_in + 1) if with_bias else (d_in,)
    if proj_in.ndim != 2 or proj_in.shape[1] not in ok_in:
        want = f"(k_in, {d_in})" + (f" or (k_in, {d_in + 1})" if with_bias else "")
        msg = (
            f"proj_in has shape {tuple(proj_in.shape)} for {type(module).__name__} "
            f"with gradient matrix ({d_out}, {d_in}); expected {want}."
        )
        raise ValueError(msg)
    if proj_out.ndim != 2 or proj_out.shape[1] != d_out:
        msg = (
            f"proj_out has shape {tuple(proj_out.shape)} for "
            f"{type(module).__name__}; expected (k_out, {d_out})."
        )
        raise ValueError(msg)


def kron_project(
    module: nn.Module, a: Tensor, ds: Tensor, proj_in: Tensor, proj_out: Tensor
) -> Tensor:
    """Per-sample ``P_out G P_in^T`` without forming the per-sample gradient ``G``.

    ``G`` is the per-sample gradient in matrix form (see :func:`matrix_shape`; for
    transformers' ``Conv1D`` the transposed weight gradient); when
    ``proj_in`` has ``d_in + 1`` columns and the layer has a bias, ``G`` is
    ``[grad_W | grad_b]`` (bias as last column), with ``d_in`` columns the bias is
    left out. Inputs and output gradients are projected first and their outer
    products summed over positions ``T``.

    Args:
        module: ``nn.Linear``, ``nn.Conv2d`` or ``nn.Embedding``.
        a: Captured input ``(B, *per_sample_input_shape)``.
        ds: Captured output gradient ``(B, *per_sample_output_shape)``.
        proj_in: ``(k_in, d_in)`` or ``(k_in, d_in + 1)``.
        proj_out: ``(k_out, d_out)``.

    Returns:
        ``(B, k_out * k_in)``, row-major flattening of ``(B, k_out, k_in)``, i.e.
        ``(P_out ⊗ P_in) vec(G)`` with ``vec`` the row-major flattening of ``G``.

    Raises:
        ValueError: If projector shapes do not match the layer.
    """
    kind = layer_kind(module)
    check_kron_shapes(module, proj_in, proj_out)
    d_in = matrix_shape(module, with_bias=False)[1]
    dt, dev = ds.dtype, ds.device
    p_in = proj_in.to(device=dev, dtype=dt)
    p_out = proj_out.to(device=dev, dtype=dt)
    n, k_out, k_in = a.shape[0], p_out.shape[0], p_in.shape[0]
    if kind == "embedding":
        idx, s = _masked_embedding_grad(module, a, ds)
        pu = p_out.t()[idx]  # (B, T, k_out); rows of the weight are tokens
        pv = s @ p_in.t()  # (B, T, k_in); zero at padding_idx tokens
        return torch.einsum("btk,btl->bkl", pu, pv).reshape(n, k_out * k_in)
    if kind == "conv2d":
        return _conv_kron(module, a.to(dt), ds, p_in, p_out, d_in)
    return _linear_kron(a.to(dt), ds, p_in, p_out, d_in)


def _linear_kron(a: Tensor, ds: Tensor, p_in: Tensor, p_out: Tensor, d_in: int) -> Tensor:
    """Kronecker projection for Linear layers (bias column folded into an addmm).

    Args:
        a: Input ``(B, *lead, d_in)``.
        ds: Output gradient ``(B, *lead, d_out)``.
        p_in: ``(k_in, d_in [+1])`` in the dtype/device of ``ds``.
        p_out: ``(k_out, d_out)``.
        d_in: Input features.

    Returns:
        ``(B, k_out * k_in)``.
    """
    n, k_in, k_out = a.shape[0], p_in.shape[0], p_out.shape[0]
    a2 = a.reshape(-1, d_in)
    if p_in.shape[1] == d_in + 1:  # [grad_W | grad_b]: ones column -> bias of the map
        pa = torch.addmm(p_in[:, d_in], a2, p_in[:, :d_in].t())
    else:
        pa = a2 @ p_in.t()
    ps = ds.reshape(-1, ds.shape[-1]) @ p_out.t()
    if pa.shape[0] == n:  # one position per sample: an outer product
        return (ps.unsqueeze(2) * pa.unsqueeze(1)).reshape(n, k_out * k_in)
    res = torch.bmm(ps.view(n, -1, k_out).transpose(1, 2), pa.view(n, -1, k_in))
    return res.reshape(n, k_out * k_in)


def _conv_kron(
    module: nn.Conv2d, a: Tensor, ds: Tensor, p_in: Tensor, p_out: Tensor, d_in: int
) -> Tensor:
    """Kronecker projection for Conv2d without unfolding the input.

    Projecting every input patch with ``P_in`` is itself a convolution of the input
    with ``P_in`` reshaped to a ``(k_in, C_in / G, kh, kw)`` kernel (bias column as
    the convolution bias), so ``P_in A`` costs one small convolution.

    Args:
        module: The convolution.
        a: Input ``(B, *lead, C, H, W)``.
        ds: Output gradient ``(B, *lead, C_out, Ho, Wo)``.
        p_in: ``(k_in, d_in [+1])`` in the dtype/device of ``ds``.
        p_out: ``(k_out, C_out)``.
        d_in: ``C_in / G * kh * kw``.

    Returns:
        ``(B, k_out * k_in)``.
    """
    n, g = a.shape[0], module.groups
    k_in, k_out = p_in.shape[0], p_out.shape[0]
    x, pad = _conv_input(module, a)
    kernel = p_in[:, :d_in].reshape(k_in, -1, *module.kernel_size).repeat(g, 1, 1, 1)
    bias = p_in[:, d_in].repeat(g) if p_in.shape[1] == d_in + 1 else None
    pa = F.conv2d(x, kernel, bias, module.stride, pad, module.dilation, g)
    pa = pa.reshape(n, -1, g, k_in, pa.shape[-2] * pa.shape[-1])  # (B, N, G, k, L)
    c_out = ds.shape[-3]
    s2 = ds.reshape(n, -1, g, c_out // g, ds.shape[-2] * ds.shape[-1])
    ps = torch.einsum("bngol,kgo->bngkl", s2, p_out.view(k_out, g, c_out // g))
    res = torch.einsum("bngkl,bngjl->bkj", ps, pa)
    return res.reshape(n, k_out * k_in)
