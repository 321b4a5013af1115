"""Per-sample gradients of a functional loss, by ``vmap`` or by layer hooks.

The user's loss ``loss_func(params, sample) -> scalar`` takes a dict of parameters
(it normally calls ``torch.func.functional_call(model, params, ...)``) and ONE sample.
``keep_batch_dim=False`` hands it an un-batched sample (TRAK/TracIn convention);
``keep_batch_dim=True`` hands it the sample with a leading axis of size 1 (the
influence-function family's ``in_dims=(None, 1)`` convention).

Two routes give the same numbers:

- ``"vmap"``: ``torch.func.vmap(torch.func.grad(loss))`` over samples; works for any
  differentiable loss.
- ``"hook"``: capture each selected layer's input ``a`` and output gradient ``ds``
  (``nn.Linear``, ``transformers``' GPT-2 ``Conv1D``, ``nn.Conv2d``,
  ``nn.Embedding``, ``nn.LayerNorm``; sequence inputs ``(T, d)`` are summed over
  positions) in one batched
  pass and form the gradients from the factors (see :mod:`dattri.func.grad_capture`
  and :mod:`dattri.func.layer_grads`). Much cheaper for convolutions and the basis of
  Kronecker-factored (LoGra) projection, which never forms the full gradient.

``route="auto"`` uses hooks for the parameters that support them and, in the same
pass, per-sample copies for the others (BatchNorm, custom layers, ...).
"""

from __future__ import annotations

import warnings
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
from dattri.func.grad_capture import as_scalar_loss, capture_batch, probe
from dattri.func.layer_grads import factor_grads, layer_kind
from dattri.func.layer_projection import per_sample_kron_projected, per_sample_layer_factors

__all__ = [
    "grad_routes",
    "per_sample_grad",
    "per_sample_grad_dict",
    "per_sample_kron_projected",
    "per_sample_layer_factors",
]

_ROUTES = ("auto", "vmap", "hook")


# ---------------------------------------------------------------------- routing


def _resolve_names(params: Mapping[str, Tensor], param_names: Sequence[str] | None) -> list[str]:
    """Validate ``param_names`` against ``params``.

    Args:
        params: All parameters by name.
        param_names: Selected names, or ``None`` for all.

    Returns:
        Selected names in output order.

    Raises:
        TypeError: If ``params``/``param_names`` have the wrong type.
        ValueError: If a name is unknown, duplicated, or nothing is selected.
    """
    if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
        msg = "params must be a dict {name: Tensor} (e.g. dict(model.named_parameters()))."
        raise TypeError(msg)
    if param_names is None:
        names = list(params)
    else:
        if isinstance(param_names, str):
            msg = f"param_names must be a list of names; wrap it: [{param_names!r}]."
            raise TypeError(msg)
        names = list(param_names)
    check_names(
        names,
        list(params),
        unknown="Unknown parameter name(s) {names}; valid names are: {valid}.",
        repeated="param_names contains duplicates: {names}.",
    )
    if not names:
        msg = "No parameters selected (params or param_names is empty)."
        raise ValueError(msg)
    return names


def _hookable(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Parameters whose per-sample gradient layer hooks can form.

    A parameter qualifies if it is the ``weight``/``bias`` of exactly one supported
    module object (exact type, see :func:`dattri.func.layer_grads.layer_kind`) and
    no other module holds it (tied weights are excluded).

    Args:
        model: The model.

    Returns:
        ``{param_name: (module_name, attr)}`` keyed by ``named_parameters()`` names.
    """
    owners: dict[int, set] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add((id(module), attr))
    modules = dict(model.named_modules())
    out = {}
    for pname, p in model.named_parameters():
        mname, _, attr = pname.rpartition(".")
        module = modules.get(mname)
        if (
            module is not None
            and layer_kind(module) is not None
            and attr in ("weight", "bias")
            and owners[id(p)] == {(id(module), attr)}
        ):
            out[pname] = (mname, attr)
    return out


def grad_routes(model: nn.Module, param_names: Sequence[str] | None = None) -> dict[str, str]:
    """Report which route ``route="auto"`` uses for each parameter.

    ``"hook"``: weight/bias owned directly by an ``nn.Linear``, ``transformers``'
    ``Conv1D``, ``nn.Conv2d``,
    ``nn.Embedding`` (no ``max_norm``/``scale_grad_by_freq``) or ``nn.LayerNorm``
    (exact types) and not tied to another module. ``"vmap"``: everything else
    (BatchNorm, custom layers, tied weights, names not in ``model``). At run time
    :func:`per_sample_grad` additionally moves a layer to ``"vmap"`` (with a
    warning) if its hook gradient disagrees with autograd on the first sample, e.g.
    when the loss also uses the parameter directly.

    Args:
        model: The model.
        param_names: Parameter names; default all ``requires_grad`` parameters.

    Returns:
        ``{name: "hook" | "vmap"}`` in the order of ``param_names``.

    Raises:
        TypeError: If ``param_names`` is a single string.
    """
    if isinstance(param_names, str):
        msg = f"param_names must be a list of names; wrap it: [{param_names!r}]."
        raise TypeError(msg)
    if param_names is None:
        param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    hookable = _hookable(model)
    return {n: "hook" if n in hookable else "vmap" for n in param_names}


def _check_route(route: str) -> None:
    """Validate the ``route`` argument.

    Args:
        route: Route name.

    Raises:
        ValueError: If unknown.
    """
    if route not in _ROUTES:
        msg = f"route must be one of {_ROUTES}, got {route!r}."
        raise ValueError(msg)


# ---------------------------------------------------------------------- engines


Dest = Callable[[int, int], dict[str, Tensor]]


def _vmap_chunks(job: LossPass, names: list[str], dest: Dest) -> Iterator[tuple[int, int]]:
    """Per-sample gradients by ``vmap(grad(loss))``, chunk by chunk.

    Args:
        job: The loss, parameters, batch and chunking.
        names: Selected parameter names.
        dest: ``dest(start, stop)`` gives ``{name: (stop - start, *shape)}`` views
            to write the chunk's gradients into.

    Yields:
        ``(start, stop)`` once the chunk is written.
    """
    fixed = {k: v.detach() for k, v in job.params.items() if k not in names}
    selected = {k: job.params[k].detach() for k in names}
    prepare = job.prepare()

    def loss_one(sel: dict[str, Tensor], sample: Any) -> Tensor:
        return as_scalar_loss(job.loss_func({**fixed, **sel}, prepare(sample)))

    fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0), randomness="different")
    for s, e, chunk in job.chunks():
        grads = fn(selected, chunk)
        for n, view in dest(s, e).items():
            view.copy_(grads[n])
        yield s, e


def _hook_chunks(
    model: nn.Module, job: LossPass, names: list[str], route: str, dest: Dest
) -> Iterator[tuple[int, int]]:
    """Per-sample gradients by layer hooks (plus per-sample copies for the rest).

    Args:
        model: The model whose modules the loss calls.
        job: The loss, parameters, batch and chunking.
        names: Selected parameter names.
        route: ``"auto"`` or ``"hook"``.
        dest: As in :func:`_vmap_chunks`.

    Yields:
        ``(start, stop)`` once the chunk is written.

    Raises:
        ValueError: If ``route="hook"`` and a parameter cannot be hooked.
    """
    hookable = _hookable(model)
    owned = {n: hookable[n] for n in names if n in hookable}
    if route == "hook" and len(owned) != len(names):
        bad = [n for n in names if n not in owned]
        msg = (
            f"route='hook' cannot handle parameter(s) {bad}: only weight/bias of "
            "nn.Linear, transformers' Conv1D, nn.Conv2d, nn.Embedding and nn.LayerNorm "
            "that are not tied "
            "are supported. Use route='auto' or route='vmap'."
        )
        raise ValueError(msg)
    modules_all = dict(model.named_modules())
    checked: dict[str, dict[str, str]] = {}
    for pname, (mname, attr) in owned.items():
        checked.setdefault(mname, {})[attr] = pname
    if checked:
        cap = probe(
            job.loss_func,
            job.params,
            job.first_sample(),
            {m: modules_all[m] for m in checked},
            checked,
        )
        if cap.failures:
            demoted = [p for m in cap.failures for p in checked[m].values()]
            msg = (
                f"Layer-hook gradients of {demoted} disagree with autograd on the "
                f"first sample (relative error {cap.failures}): the parameter also "
                "reaches the loss outside its layer's forward (tied weights, a "
                "penalty in the loss, a parent module reading it directly) or the "
                "loss does not use the given params."
            )
            if route == "hook":
                raise ValueError(msg + " Use route='auto' or route='vmap'.")
            warnings.warn(msg + " Using the vmap route for them.", stacklevel=4)
            for m in cap.failures:
                del checked[m]
    if not checked:
        yield from _vmap_chunks(job, names, dest)
        return
    hooked = {p for amap in checked.values() for p in amap.values()}
    rest = [n for n in names if n not in hooked]
    modules = {m: modules_all[m] for m in checked}
    plan = {m: cap.plan[m] for m in checked}
    prepare = job.prepare()
    for s, e, chunk in job.chunks():
        factors, grads = capture_batch(
            job.loss_func, job.params, chunk, e - s, modules, plan, prepare, rest
        )
        views = dest(s, e)
        for n in rest:
            views[n].copy_(grads[n])
        for mname, amap in checked.items():
            out = {attr: views[pname] for attr, pname in amap.items()}
            calls = factors[mname]
            for i, (a, ds) in enumerate(calls):
                factor_grads(modules[mname], a, ds, list(amap), out=out, accumulate=i > 0)
            if not calls:  # layer never called: zero gradient
                for view in out.values():
                    view.zero_()
        yield s, e


def _grad_chunks(
    model: nn.Module, job: LossPass, names: list[str], route: str, dest: Dest
) -> Iterator[tuple[int, int]]:
    """Dispatch to the vmap or hook engine.

    Args:
        model: The model.
        job: The loss, parameters, batch and chunking.
        names: Selected names.
        route: ``"auto"``, ``"vmap"`` or ``"hook"``.
        dest: Destination views per chunk (see :func:`_vmap_chunks`).

    Returns:
        Iterator of ``(start, stop)`` per written chunk.
    """
    _check_route(route)
    if route == "vmap" or (route == "auto" and "hook" not in grad_routes(model, names).values()):
        return _vmap_chunks(job, names, dest)
    return _hook_chunks(model, job, names, route, dest)


# ---------------------------------------------------------------------- public


def per_sample_grad(
    model: nn.Module,
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    param_names: Sequence[str] | None = None,
    keep_batch_dim: bool = False,
    route: str = "auto",
    chunk_size: int | None = None,
    *,
    verbose: bool = False,
    out: Tensor | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Per-sample gradients of a functional loss, flattened and concatenated.

    Args:
        model: The model the loss calls (``functional_call(model, params, ...)``);
            its modules are hooked by the ``"hook"`` route.
        loss_func: ``loss_func(params: dict[str, Tensor], sample) -> scalar``.
        params: ALL parameters the loss needs, by name; gradients are taken at
            these values.
        data: One batch: a Tensor, or a tuple/list/dict of Tensors, each with
            leading batch dimension ``B``.
        param_names: Parameters to differentiate (default: all keys of
            ``params``); the others are held fixed. Output columns follow this
            order, each parameter flattened row-major.
        keep_batch_dim: ``False``: the loss sees one un-batched sample;
            ``True``: the sample has a leading axis of size 1, shape ``(1, ...)``.
        route: ``"auto"`` (hooks where supported, per-sample copies elsewhere),
            ``"vmap"`` (``vmap(grad)`` for all) or ``"hook"`` (hooks only, error
            if a parameter is unsupported). See :func:`grad_routes`.
        chunk_size: Max samples processed at once (bounds memory); ``None``: all.
        verbose: Show a progress bar over chunks.
        out: Optional contiguous ``(B, p_selected)`` buffer of the result's dtype and
            device to write into (lets a caller reuse one buffer across batches
            instead of allocating, and page-faulting, a fresh one each time).
        check_finite: Raise on NaN/inf gradients (default). A caller that checks a
            cheaper derived quantity instead (e.g. the projected features, which are
            non-finite whenever a gradient is) may pass False.

    Returns:
        ``(B, p_selected)`` tensor (``out`` when given), detached, in the promoted
        dtype of the selected parameters, on the device of the first selected
        parameter.

    Raises:
        ValueError: For unknown names, empty batches, non-scalar losses, or an
            ``out`` of the wrong shape, dtype or device.
        NonFiniteGradientError: (a ``ValueError``) for NaN/inf gradients, naming
            the samples.
    """
    names = _resolve_names(params, param_names)
    b = batch_size(data)
    dtype = params[names[0]].dtype
    for n in names[1:]:
        dtype = torch.promote_types(dtype, params[n].dtype)
    sizes = [params[n].numel() for n in names]
    device = params[names[0]].device
    if out is None:
        out = torch.empty(b, sum(sizes), dtype=dtype, device=device)
    elif (
        tuple(out.shape) != (b, sum(sizes))
        or out.dtype != dtype
        or out.device != device
        or not out.is_contiguous()
    ):
        msg = (
            f"out must be a contiguous ({b}, {sum(sizes)}) {dtype} tensor on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            f"{'' if out.is_contiguous() else ' (not contiguous)'}."
        )
        raise ValueError(msg)
    bad = torch.zeros(b, dtype=torch.bool, device=out.device)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)

    def dest(s: int, e: int) -> dict[str, Tensor]:
        return {
            n: out[s:e, offsets[i] : offsets[i + 1]].view(e - s, *params[n].shape)
            for i, n in enumerate(names)
        }

    job = LossPass(loss_func, params, data, keep_batch_dim, chunk_size, verbose)
    for s, e in _grad_chunks(model, job, names, route, dest):
        if check_finite:
            bad[s:e] = nonfinite_rows(out[s:e])
    raise_nonfinite(bad)
    return out


def per_sample_grad_dict(
    model: nn.Module,
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    param_names: Sequence[str] | None = None,
    keep_batch_dim: bool = False,
    route: str = "auto",
    chunk_size: int | None = None,
    *,
    verbose: bool = False,
) -> dict[str, Tensor]:
    """Per-sample gradients as a dict, one ``(B, *param.shape)`` tensor per name.

    Same arguments and routes as :func:`per_sample_grad`; useful for projecting
    per-parameter blocks without concatenating them.

    Args:
        model: The model the loss calls.
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: ALL parameters by name.
        data: One batch with leading dimension ``B``.
        param_names: Parameters to differentiate (default: all).
        keep_batch_dim: Loss sample convention (see :func:`per_sample_grad`).
        route: ``"auto"``, ``"vmap"`` or ``"hook"``.
        chunk_size: Max samples processed at once.
        verbose: Show a progress bar over chunks.

    Returns:
        ``{name: (B, *params[name].shape)}`` in ``param_names`` order, detached,
        in each parameter's dtype.

    Raises:
        ValueError: As :func:`per_sample_grad`.
    """
    names = _resolve_names(params, param_names)
    b = batch_size(data)
    out = {
        n: torch.empty(b, *params[n].shape, dtype=params[n].dtype, device=params[n].device)
        for n in names
    }
    bad = torch.zeros(b, dtype=torch.bool, device=params[names[0]].device)

    def dest(s: int, e: int) -> dict[str, Tensor]:
        return {n: out[n][s:e] for n in names}

    job = LossPass(loss_func, params, data, keep_batch_dim, chunk_size, verbose)
    for s, e in _grad_chunks(model, job, names, route, dest):
        for n in names:
            bad[s:e] |= nonfinite_rows(out[n][s:e].reshape(e - s, -1)).to(bad.device)
    raise_nonfinite(bad)
    return out
