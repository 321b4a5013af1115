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
  (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``) in one batched
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
from tqdm import tqdm

from dattri.func.grad_capture import as_scalar_loss, capture_batch, probe
from dattri.func.layer_grads import (
    check_kron_shapes,
    factor_grads,
    kron_project,
    layer_kind,
    linear_factors,
)

__all__ = [
    "grad_routes",
    "per_sample_grad",
    "per_sample_grad_dict",
    "per_sample_kron_projected",
    "per_sample_layer_factors",
]

_ROUTES = ("auto", "vmap", "hook")


# --------------------------------------------------------------------------- data


def _tree_map(fn: Callable[[Tensor], Any], data: Any) -> Any:
    """Apply ``fn`` to every tensor of a (nested) tuple/list/dict batch.

    Args:
        fn: Function on tensors.
        data: Tensor, or tuple/list/dict (possibly nested) of tensors.

    Returns:
        The same structure with ``fn`` applied to each tensor.

    Raises:
        TypeError: If a leaf is not a tensor.
    """
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: _tree_map(fn, v) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_tree_map(fn, v) for v in data))
    if isinstance(data, (tuple, list)):
        return type(data)(_tree_map(fn, v) for v in data)
    msg = (
        "data must be a Tensor or a tuple/list/dict of Tensors with a leading batch "
        f"dimension; found a leaf of type {type(data).__name__}."
    )
    raise TypeError(msg)


def _batch_size(data: Any) -> int:
    """Common leading dimension of all tensors of a batch.

    Args:
        data: Tensor or tuple/list/dict of tensors.

    Returns:
        The batch size ``B`` (> 0).

    Raises:
        ValueError: If tensors disagree on ``B``, are 0-d, or the batch is empty.
    """
    sizes: list[int] = []

    def record(t: Tensor) -> Tensor:
        if t.ndim == 0:
            msg = "data tensors need a leading batch dimension; got a 0-d tensor."
            raise ValueError(msg)
        sizes.append(t.shape[0])
        return t

    _tree_map(record, data)
    if not sizes:
        msg = "data contains no tensors."
        raise ValueError(msg)
    if len(set(sizes)) != 1:
        msg = f"All data tensors must share the batch dimension; got sizes {sizes}."
        raise ValueError(msg)
    if sizes[0] == 0:
        msg = "data is an empty batch (batch size 0); pass at least one sample."
        raise ValueError(msg)
    return sizes[0]


def _preparer(keep_batch_dim: bool) -> Callable[[Any], Any]:
    """Map a vmapped (un-batched) sample to the shape convention of the loss.

    Args:
        keep_batch_dim: Add a leading axis of size 1 to every tensor.

    Returns:
        The mapping function.
    """
    if keep_batch_dim:
        return lambda s: _tree_map(lambda t: t.unsqueeze(0), s)
    return lambda s: s


def _first_sample(data: Any, keep_batch_dim: bool) -> Any:
    """The first sample of a batch as the loss sees it.

    Args:
        data: The batch.
        keep_batch_dim: Keep a leading axis of size 1.

    Returns:
        The sample.
    """
    if keep_batch_dim:
        return _tree_map(lambda t: t[:1], data)
    return _tree_map(lambda t: t[0], data)


def _chunks(b: int, chunk_size: int | None, verbose: bool) -> Iterator[tuple]:
    """Yield ``(start, stop)`` chunk bounds.

    Args:
        b: Batch size.
        chunk_size: Max chunk length, ``None`` for one chunk.
        verbose: Show a progress bar.

    Yields:
        ``(start, stop)`` pairs.

    Raises:
        ValueError: If ``chunk_size`` is not a positive int.
    """
    if chunk_size is None:
        chunk_size = b
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        msg = f"chunk_size must be a positive int or None, got {chunk_size!r}."
        raise TypeError(msg)
    if chunk_size < 1:
        msg = f"chunk_size must be a positive int or None, got {chunk_size}."
        raise ValueError(msg)
    starts = range(0, b, chunk_size)
    for s in tqdm(starts, desc="per-sample grads", disable=not verbose):
        yield s, min(s + chunk_size, b)


# ---------------------------------------------------------------------- routing


def _valid_list(names: list[str], limit: int = 30) -> str:
    """Comma-separated list of names, truncated.

    Args:
        names: Names.
        limit: Max names shown.

    Returns:
        Text.
    """
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
    unknown = [n for n in names if n not in params]
    if unknown:
        msg = f"Unknown parameter name(s) {unknown}; valid names are: {_valid_list(list(params))}."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"param_names contains duplicates: {names}."
        raise ValueError(msg)
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

    ``"hook"``: weight/bias owned directly by an ``nn.Linear``, ``nn.Conv2d``,
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


def _vmap_chunks(
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    names: list[str],
    keep_batch_dim: bool,
    bounds: Iterator[tuple],
    dest: Dest,
) -> Iterator[tuple[int, int]]:
    """Per-sample gradients by ``vmap(grad(loss))``, chunk by chunk.

    Args:
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: All parameters.
        data: The batch.
        names: Selected parameter names.
        keep_batch_dim: Loss sample convention.
        bounds: Chunk bounds.
        dest: ``dest(start, stop)`` gives ``{name: (stop - start, *shape)}`` views
            to write the chunk's gradients into.

    Yields:
        ``(start, stop)`` once the chunk is written.
    """
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    selected = {k: params[k].detach() for k in names}
    prepare = _preparer(keep_batch_dim)

    def loss_one(sel: dict[str, Tensor], sample: Any) -> Tensor:
        return as_scalar_loss(loss_func({**fixed, **sel}, prepare(sample)))

    fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0), randomness="different")
    for s, e in bounds:
        chunk = _tree_map(lambda t, s=s, e=e: t[s:e], data)
        grads = fn(selected, chunk)
        for n, view in dest(s, e).items():
            view.copy_(grads[n])
        yield s, e


def _hook_chunks(
    model: nn.Module,
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    names: list[str],
    keep_batch_dim: bool,
    route: str,
    bounds: Iterator[tuple],
    dest: Dest,
) -> Iterator[tuple[int, int]]:
    """Per-sample gradients by layer hooks (plus per-sample copies for the rest).

    Args:
        model: The model whose modules the loss calls.
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: All parameters.
        data: The batch.
        names: Selected parameter names.
        keep_batch_dim: Loss sample convention.
        route: ``"auto"`` or ``"hook"``.
        bounds: Chunk bounds.
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
            "nn.Linear, nn.Conv2d, nn.Embedding and nn.LayerNorm that are not tied "
            "are supported. Use route='auto' or route='vmap'."
        )
        raise ValueError(msg)
    modules_all = dict(model.named_modules())
    checked: dict[str, dict[str, str]] = {}
    for pname, (mname, attr) in owned.items():
        checked.setdefault(mname, {})[attr] = pname
    if checked:
        cap = probe(
            loss_func,
            params,
            _first_sample(data, keep_batch_dim),
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
        yield from _vmap_chunks(loss_func, params, data, names, keep_batch_dim, bounds, dest)
        return
    hooked = {p for amap in checked.values() for p in amap.values()}
    rest = [n for n in names if n not in hooked]
    modules = {m: modules_all[m] for m in checked}
    plan = {m: cap.plan[m] for m in checked}
    prepare = _preparer(keep_batch_dim)
    for s, e in bounds:
        chunk = _tree_map(lambda t, s=s, e=e: t[s:e], data)
        factors, grads = capture_batch(
            loss_func, params, chunk, e - s, modules, plan, prepare, rest
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
    model: nn.Module,
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    names: list[str],
    keep_batch_dim: bool,
    route: str,
    chunk_size: int | None,
    verbose: bool,
    dest: Dest,
) -> Iterator[tuple[int, int]]:
    """Dispatch to the vmap or hook engine.

    Args:
        model: The model.
        loss_func: The functional loss.
        params: All parameters.
        data: The batch.
        names: Selected names.
        keep_batch_dim: Loss sample convention.
        route: ``"auto"``, ``"vmap"`` or ``"hook"``.
        chunk_size: Max samples per chunk.
        verbose: Progress bar.
        dest: Destination views per chunk (see :func:`_vmap_chunks`).

    Returns:
        Iterator of ``(start, stop)`` per written chunk.
    """
    _check_route(route)
    bounds = _chunks(_batch_size(data), chunk_size, verbose)
    args = (loss_func, params, data, names, keep_batch_dim)
    if route == "vmap" or (route == "auto" and "hook" not in grad_routes(model, names).values()):
        return _vmap_chunks(*args, bounds, dest)
    return _hook_chunks(model, *args, route, bounds, dest)


def _nonfinite_rows(x: Tensor) -> Tensor:
    """Rows of a ``(B, D)`` tensor that contain NaN or inf.

    A row sum is non-finite whenever the row is; only those candidate rows (or
    rows whose sum merely overflowed) are checked element-wise.

    Args:
        x: ``(B, D)`` floating tensor.

    Returns:
        Boolean mask ``(B,)``.
    """
    bad = ~torch.isfinite(x.sum(dim=1))
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        bad[rows] = ~torch.isfinite(x[rows]).all(dim=1)
    return bad


def _raise_nonfinite(bad: Tensor) -> None:
    """Raise if any sample has a non-finite gradient.

    Args:
        bad: Boolean mask ``(B,)`` of samples with NaN/inf gradients.

    Raises:
        ValueError: Naming the sample indices.
    """
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        shown = idx[:20] + (["..."] if len(idx) > 20 else [])
        msg = (
            f"Non-finite (NaN/inf) per-sample gradients for {len(idx)} sample(s) at "
            f"batch indices {shown}. Check the loss and inputs of these samples."
        )
        raise ValueError(msg)


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

    Returns:
        ``(B, p_selected)`` tensor, detached, in the promoted dtype of the
        selected parameters, on the device of the first selected parameter.

    Raises:
        ValueError: For unknown names, empty batches, non-scalar losses, or
            NaN/inf gradients (naming the samples).
    """
    names = _resolve_names(params, param_names)
    b = _batch_size(data)
    dtype = params[names[0]].dtype
    for n in names[1:]:
        dtype = torch.promote_types(dtype, params[n].dtype)
    sizes = [params[n].numel() for n in names]
    out = torch.empty(b, sum(sizes), dtype=dtype, device=params[names[0]].device)
    bad = torch.zeros(b, dtype=torch.bool, device=out.device)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)

    def dest(s: int, e: int) -> dict[str, Tensor]:
        return {
            n: out[s:e, offsets[i] : offsets[i + 1]].view(e - s, *params[n].shape)
            for i, n in enumerate(names)
        }

    for s, e in _grad_chunks(
        model, loss_func, params, data, names, keep_batch_dim, route, chunk_size, verbose, dest
    ):
        bad[s:e] = _nonfinite_rows(out[s:e])
    _raise_nonfinite(bad)
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
    b = _batch_size(data)
    out = {
        n: torch.empty(b, *params[n].shape, dtype=params[n].dtype, device=params[n].device)
        for n in names
    }
    bad = torch.zeros(b, dtype=torch.bool, device=params[names[0]].device)

    def dest(s: int, e: int) -> dict[str, Tensor]:
        return {n: out[n][s:e] for n in names}

    for s, e in _grad_chunks(
        model, loss_func, params, data, names, keep_batch_dim, route, chunk_size, verbose, dest
    ):
        for n in names:
            bad[s:e] |= _nonfinite_rows(out[n][s:e].reshape(e - s, -1)).to(bad.device)
    _raise_nonfinite(bad)
    return out


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
    bad = [n for n in module_names if n not in valid]
    if bad:
        msg = (
            f"Module(s) {bad} are not supported layers ({', '.join(kinds)}) of the "
            f"model; valid names are: {_valid_list(valid)}."
        )
        raise ValueError(msg)
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
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    modules: dict[str, nn.Module],
    checked: dict[str, dict[str, str]],
    keep_batch_dim: bool,
    chunk_size: int | None,
    verbose: bool,
    caller: str,
) -> Iterator[tuple[int, int, dict[str, list[tuple[Tensor, Tensor]]]]]:
    """Probe, check and capture layer factors chunk by chunk.

    Args:
        loss_func: The functional loss.
        params: All parameters.
        data: The batch.
        modules: Layers to hook.
        checked: Their parameters in ``params``.
        keep_batch_dim: Loss sample convention.
        chunk_size: Max samples per chunk.
        verbose: Progress bar.
        caller: Public function name for error messages.

    Yields:
        ``(start, stop, {module: [(a, ds), ...]})``, one pair per layer call.

    Raises:
        ValueError: If the factor gradients disagree with autograd.
    """
    bounds = _chunks(_batch_size(data), chunk_size, verbose)
    cap = probe(loss_func, params, _first_sample(data, keep_batch_dim), modules, checked)
    if cap.failures:
        msg = (
            f"{caller}: layer-hook gradients of {list(cap.failures)} disagree with "
            f"autograd on the first sample (relative error {cap.failures}); the "
            "layer parameters also reach the loss outside the layer's forward (tied "
            "weights, a penalty term, a parent module reading them) or the loss "
            "does not use the given params. Layer factors cannot represent that."
        )
        raise ValueError(msg)
    prepare = _preparer(keep_batch_dim)
    for s, e in bounds:
        chunk = _tree_map(lambda t, s=s, e=e: t[s:e], data)
        factors, _ = capture_batch(loss_func, params, chunk, e - s, modules, cap.plan, prepare)
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
        model, params, module_names, ("linear", "conv2d", "embedding")
    )
    for n, m in modules.items():
        if n not in proj_in or n not in proj_out:
            msg = f"proj_in and proj_out need an entry for every module; missing {n!r}."
            raise ValueError(msg)
        check_kron_shapes(m, proj_in[n], proj_out[n])
    b = _batch_size(data)
    out: dict[str, Tensor] = {}
    bad: Tensor | None = None
    for s, e, factors in _capture_layers(
        loss_func,
        params,
        data,
        modules,
        checked,
        keep_batch_dim,
        chunk_size,
        verbose,
        "per_sample_kron_projected",
    ):
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
            bad[s:e] |= _nonfinite_rows(res).to(bad.device)
    _raise_nonfinite(bad)
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
        model, params, module_names, ("linear", "conv2d", "embedding", "layernorm")
    )
    for n, m in modules.items():
        if layer_kind(m) == "conv2d" and m.groups != 1:
            msg = (
                f"Layer {n!r} is a grouped Conv2d; its factors are block-diagonal and "
                "not returned. Use per_sample_grad_dict or per_sample_kron_projected."
            )
            raise NotImplementedError(msg)
    b = _batch_size(data)
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in modules}
    bad = torch.zeros(b, dtype=torch.bool)
    for s, e, factors in _capture_layers(
        loss_func,
        params,
        data,
        modules,
        checked,
        keep_batch_dim,
        chunk_size,
        verbose,
        "per_sample_layer_factors",
    ):
        for n, m in modules.items():
            calls = [linear_factors(m, a, ds, bias_column) for a, ds in factors[n]]
            if not calls:
                msg = f"Layer {n!r} was not called by loss_func; it has no factors."
                raise ValueError(msg)
            a_cat = torch.cat([c[0] for c in calls], dim=1)
            s_cat = torch.cat([c[1] for c in calls], dim=1)
            nonfinite = _nonfinite_rows(s_cat.reshape(e - s, -1))
            if a_cat.is_floating_point():
                nonfinite |= _nonfinite_rows(a_cat.reshape(e - s, -1))
            bad[s:e] |= nonfinite.cpu()
            parts[n].append((a_cat, s_cat))
    _raise_nonfinite(bad)
    return {
        n: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for n, ps in parts.items()
    }
