"""Layer-factor outputs: Kronecker-projected (LoGra) gradients and raw factors.

Both functions hook chosen ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``
(/ ``nn.LayerNorm``) layers, capture per-sample layer inputs and output gradients in
one batched pass (see :mod:`dattri.func.grad_capture`) and never form the full
per-sample gradient. Loss convention as in :func:`dattri.func.per_sample_grad.per_sample_grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dattri.func.batch_utils import (
    LossPass,
    batch_size,
    check_names,
    nonfinite_rows,
    raise_nonfinite,
)
from dattri.func.grad_capture import capture_batch, probe
from dattri.func.layer_grads import check_kron_shapes, kron_project, layer_kind, linear_factors

__all__ = ["per_sample_kron_projected", "per_sample_layer_factors"]


def _layer_modules(
    model: nn.Module,
    params: Mapping[str, Tensor],
    module_names: Sequence[str] | None,
    kinds: tuple[str, ...],
) -> tuple[dict[str, nn.Module], dict[str, dict[str, str]]]:
    """Validate layer names and find their parameters in ``params``.

    Args:
        model: The model.
        params: All parameters by name.
        module_names: Module names (``model.named_modules()`` keys); ``None``: all
            modules of the allowed kinds.
        kinds: Allowed layer kinds.

    Returns:
        ``({name: module}, {name: {attr: param_name}})``; the second maps the
        layer parameters present in ``params`` (checked against autograd).

    Raises:
        TypeError: If ``params`` is not a dict or ``module_names`` is a string.
        ValueError: For unknown or unsupported modules.
    """
    if not isinstance(params, Mapping):
        msg = "params must be a dict {name: Tensor} (e.g. dict(model.named_parameters()))."
        raise TypeError(msg)
    all_modules = dict(model.named_modules())
    valid = [n for n, m in all_modules.items() if layer_kind(m) in kinds]
    if module_names is None:
        module_names = valid
    elif isinstance(module_names, str):
        msg = f"module_names must be a list of names; wrap it: [{module_names!r}]."
        raise TypeError(msg)
    module_names = list(module_names)
    if not module_names:
        msg = f"No modules selected; supported layers in the model: {valid}."
        raise ValueError(msg)
    kind_list = ", ".join(kinds)
    check_names(
        module_names,
        valid,
        unknown=f"Module(s) {{names}} are not supported layers ({kind_list}) of the model; "
        "valid names are: {valid}.",
    )
    modules = {n: all_modules[n] for n in module_names}
    checked = {}
    for n, m in modules.items():
        amap = {}
        for attr, _ in m.named_parameters(recurse=False):
            pname = f"{n}.{attr}" if n else attr
            if pname in params:
                amap[attr] = pname
        checked[n] = amap
    return modules, checked


def _capture_layers(
    job: LossPass,
    modules: dict[str, nn.Module],
    checked: dict[str, dict[str, str]],
    caller: str,
) -> Iterator[tuple[int, int, dict[str, list[tuple[Tensor, Tensor]]]]]:
    """Probe, check and capture layer factors chunk by chunk.

    Args:
        job: The loss, parameters, batch and chunking.
        modules: Layers to hook.
        checked: Their parameters in ``params``.
        caller: Public function name for error messages.

    Yields:
        ``(start, stop, {module: [(a, ds), ...]})``, one pair per layer call.

    Raises:
        ValueError: If the factor gradients disagree with autograd.
    """
    cap = probe(job.loss_func, job.params, job.first_sample(), modules, checked)
    if cap.failures:
        msg = (
            f"{caller}: layer-hook gradients of {list(cap.failures)} disagree with "
            f"autograd on the first sample (relative error {cap.failures}); the "
            "layer parameters also reach the loss outside the layer's forward (tied "
            "weights, a penalty term, a parent module reading them) or the loss "
            "does not use the given params. Layer factors cannot represent that."
        )
        raise ValueError(msg)
    prepare = job.prepare()
    for s, e, chunk in job.chunks():
        factors, _ = capture_batch(
            job.loss_func, job.params, chunk, e - s, modules, cap.plan, prepare
        )
        yield s, e, factors


def per_sample_kron_projected(
    model: nn.Module,
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    module_names: Sequence[str] | None,
    proj_in: Mapping[str, Tensor],
    proj_out: Mapping[str, Tensor],
    keep_batch_dim: bool = False,
    chunk_size: int | None = None,
    *,
    verbose: bool = False,
) -> dict[str, Tensor]:
    """Kronecker-factored (LoGra) projection of per-sample layer gradients.

    For each layer and sample computes ``P_out G P_in^T`` where ``G`` is the
    per-sample gradient in matrix form, by projecting the captured inputs ``a`` and
    output gradients ``ds`` first and summing their outer products over positions
    (sequence steps, conv output pixels, repeated calls): the full per-sample
    gradient is never formed. Matrix forms ``(d_out, d_in)``: ``Linear``
    ``(out, in)``; ``Conv2d`` ``(C_out, C_in / groups * kh * kw)``; ``Embedding``
    ``(num_embeddings, embedding_dim)``. Bias: if the layer has a bias and
    ``proj_in[name]`` has ``d_in + 1`` columns, a column of ones is appended to
    ``a`` so that ``G = [grad_W | grad_b]`` (bias last); with ``d_in`` columns the
    bias is left out.

    Args:
        model: The model the loss calls.
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: ALL parameters by name.
        data: One batch with leading dimension ``B``.
        module_names: Layers (``model.named_modules()`` names); ``None``: every
            ``Linear``/``Conv2d``/``Embedding`` layer.
        proj_in: ``{name: (k_in, d_in [+1])}``.
        proj_out: ``{name: (k_out, d_out)}``.
        keep_batch_dim: Loss sample convention (see :func:`per_sample_grad`).
        chunk_size: Max samples processed at once.
        verbose: Show a progress bar over chunks.

    Returns:
        ``{name: (B, k_out * k_in)}``: row-major flattening of ``(k_out, k_in)``,
        equal to ``(P_out ⊗ P_in) vec(G)`` with ``vec`` row-major. Dtype of the
        layer output gradients (projectors are cast to it), detached.

    Raises:
        ValueError: For unknown/unsupported layers, missing or mis-shaped
            projectors, NaN/inf results (naming the samples), or layer parameters
            that reach the loss outside their layer.
    """
    modules, checked = _layer_modules(
        model, params, module_names, ("linear", "conv1d", "conv2d", "embedding")
    )
    for what, mats in (("proj_in", proj_in), ("proj_out", proj_out)):
        if not isinstance(mats, Mapping):
            msg = f"{what} must be a dict {{module_name: Tensor}}, got {type(mats).__name__}."
            raise TypeError(msg)
    for n, m in modules.items():
        if n not in proj_in or n not in proj_out:
            msg = f"proj_in and proj_out need an entry for every module; missing {n!r}."
            raise ValueError(msg)
        check_kron_shapes(m, proj_in[n], proj_out[n])
    b = batch_size(data)
    out: dict[str, Tensor] = {}
    bad: Tensor | None = None
    job = LossPass(loss_func, params, data, keep_batch_dim, chunk_size, verbose)
    for s, e, factors in _capture_layers(job, modules, checked, "per_sample_kron_projected"):
        for n, m in modules.items():
            res = None
            for a, ds in factors[n]:
                r = kron_project(m, a, ds, proj_in[n], proj_out[n])
                res = r if res is None else res + r
            if res is None:  # layer never called: zero gradient
                k = proj_out[n].shape[0] * proj_in[n].shape[0]
                p_any = next(iter(params.values()))
                res = p_any.new_zeros(e - s, k)
            if n not in out:
                out[n] = res.new_empty(b, res.shape[1])
            if bad is None:
                bad = torch.zeros(b, dtype=torch.bool, device=res.device)
            out[n][s:e] = res
            bad[s:e] |= nonfinite_rows(res).to(bad.device)
    raise_nonfinite(bad)
    return out


def per_sample_layer_factors(
    model: nn.Module,
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    module_names: Sequence[str] | None,
    keep_batch_dim: bool = False,
    chunk_size: int | None = None,
    *,
    bias_column: bool = True,
    verbose: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-sample linearised layer factors ``(A, S)`` (for EK-FAC, DataInf, ghost dots).

    ``S`` holds gradients of each sample's loss with respect to the layer output;
    ``A`` the matching input representation, such that the per-sample gradient is
    ``sum_t S[b, t] A[b, t]^T`` (Linear, Conv2d: ``[grad_W | grad_b]`` when the bias
    column is present), ``sum_t S[b, t] * A[b, t]`` (LayerNorm weight; bias
    ``sum_t S[b, t]``) or ``sum_t onehot(A[b, t]) S[b, t]^T`` (Embedding). Repeated
    calls of a layer are concatenated along ``T``.

    - ``Linear``: ``A (B, T, d_in [+1])``, ``S (B, T, d_out)``.
    - ``Conv2d`` (groups = 1): ``A (B, T, C_in * kh * kw [+1])`` unfolded patches
      (``T`` = output positions), ``S (B, T, C_out)``.
    - ``Embedding``: ``A (B, T)`` token indices, ``S (B, T, D)`` (zero at
      ``padding_idx``).
    - ``LayerNorm``: ``A (B, T, n)`` normalised input, ``S (B, T, n)``,
      ``n = prod(normalized_shape)``.

    Args:
        model: The model the loss calls.
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: ALL parameters by name.
        data: One batch with leading dimension ``B``.
        module_names: Layers (``model.named_modules()`` names); ``None``: every
            supported layer.
        keep_batch_dim: Loss sample convention (see :func:`per_sample_grad`).
        chunk_size: Max samples processed at once.
        bias_column: Append a column of ones to ``A`` of layers with a bias.
        verbose: Show a progress bar over chunks.

    Returns:
        ``{name: (A, S)}`` as above, detached.

    Raises:
        ValueError: For unknown/unsupported layers, NaN/inf factors (naming the
            samples) or layer parameters that reach the loss outside their layer.
        NotImplementedError: For grouped convolutions.
    """
    modules, checked = _layer_modules(
        model, params, module_names, ("linear", "conv1d", "conv2d", "embedding", "layernorm")
    )
    for n, m in modules.items():
        if layer_kind(m) == "conv2d" and m.groups != 1:
            msg = (
                f"Layer {n!r} is a grouped Conv2d; its factors are block-diagonal and "
                "not returned. Use per_sample_grad_dict or per_sample_kron_projected."
            )
            raise NotImplementedError(msg)
    b = batch_size(data)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in modules}
    bad = torch.zeros(b, dtype=torch.bool)
    job = LossPass(loss_func, params, data, keep_batch_dim, chunk_size, verbose)
    for s, e, factors in _capture_layers(job, modules, checked, "per_sample_layer_factors"):
        for n, m in modules.items():
            calls = [linear_factors(m, a, ds, bias_column) for a, ds in factors[n]]
            if not calls:
                msg = f"Layer {n!r} was not called by loss_func; it has no factors."
                raise ValueError(msg)
            a_cat = torch.cat([c[0] for c in calls], dim=1)
            s_cat = torch.cat([c[1] for c in calls], dim=1)
            nonfinite = nonfinite_rows(s_cat.reshape(e - s, -1))
            if a_cat.is_floating_point():
                nonfinite |= nonfinite_rows(a_cat.reshape(e - s, -1))
            bad[s:e] |= nonfinite.cpu()
            parts[n].append((a_cat, s_cat))
    raise_nonfinite(bad)
    return {
        n: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for n, ps in parts.items()
    }
