"""Capture of per-sample layer inputs and output gradients through forward hooks.

The user's functional loss ``loss_func(params, sample)`` is written for ONE sample.
To get per-sample output gradients of chosen layers in one batched pass:

1. *Probe*: call the loss directly on the first sample with forward hooks that add a
   zero tensor ``z`` (requires grad) to each hooked layer output. This records how
   many times each layer is called and the per-sample output shapes, and, via one
   ``torch.autograd.grad``, both the layer factors and the true gradient of the
   layer parameters for that sample. The factor-based gradient must agree with the
   true one; it does not when a parameter also reaches the loss outside its
   layer's forward (tied weights, a penalty term in the loss, a parent module
   reading ``layer.weight`` directly), and such layers are reported.
2. *Main pass*: run the loss under ``torch.func.vmap`` over the samples with hooks
   that record each layer input (returned as an auxiliary output so it leaves vmap)
   and add ``z[b]``, a vmapped zero input of shape ``(B, *out_shape)``. One ordinary
   ``torch.autograd.grad(losses.sum(), zs)`` then gives every sample's output
   gradient (samples do not interact). Parameters that no hook covers can be given
   per-sample copies (``(B, *shape)`` expanded leaves passed through vmap), whose
   gradients are their exact per-sample gradients, in the same pass.

Hooks are always removed, also on error. The global RNG state is not advanced by
the probe.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dattri.func.layer_grads import factor_grads

__all__ = ["Capture", "as_scalar_loss", "capture_batch", "probe"]


def as_scalar_loss(loss: Any) -> Tensor:
    """Check that a per-sample loss is a single-element tensor and make it 0-d.

    Args:
        loss: Output of the user's loss for one sample.

    Returns:
        The loss as a 0-d tensor.

    Raises:
        TypeError: If the loss is not a tensor.
        ValueError: If the loss has more than one element.
    """
    if not isinstance(loss, Tensor):
        msg = f"loss_func must return a torch.Tensor, got {type(loss).__name__}."
        raise TypeError(msg)
    if loss.numel() != 1:
        msg = (
            "loss_func must return a scalar per sample, got a tensor of shape "
            f"{tuple(loss.shape)}. Reduce it (e.g. .sum()) or check keep_batch_dim "
            "(False: the loss sees one un-batched sample; True: shape (1, ...))."
        )
        raise ValueError(msg)
    return loss.reshape(())


@dataclass
class _HookState:
    """Mutable state shared by the capture hooks during one forward."""

    probe: bool
    zs: dict[str, list[Tensor]]
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)

    def reset(self, zs: dict[str, list[Tensor]]) -> None:
        """Start a new forward with the given output offsets.

        Args:
            zs: Per-module list of zero tensors, one per expected call.
        """
        self.zs = zs
        self.inputs = {name: [] for name in zs}


def _make_hook(state: _HookState, name: str) -> Callable:
    """Forward hook recording the layer input and adding ``z`` to the output.

    Args:
        state: Shared hook state.
        name: Module name the hook is registered on.

    Returns:
        A ``with_kwargs`` forward hook.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = args[0] if args else kwargs["input"]
        calls = state.inputs[name]
        i = len(calls)
        if state.probe:
            z = torch.zeros_like(output, requires_grad=True)
            state.zs[name].append(z)
        else:
            if i >= len(state.zs[name]):
                msg = (
                    f"Module '{name}' was called more often than on the probe sample; "
                    "sample-dependent control flow is not supported by layer hooks. "
                    "Use route='vmap'."
                )
                raise RuntimeError(msg)
            z = state.zs[name][i]
            if z.shape != output.shape:
                msg = (
                    f"Output shape {tuple(output.shape)} of module '{name}' differs "
                    f"from the probe sample's {tuple(z.shape)}. Use route='vmap'."
                )
                raise RuntimeError(msg)
        calls.append(x.detach())
        return output + z

    return hook


@contextmanager
def _hooks(modules: Mapping[str, nn.Module], state: _HookState) -> Iterator[None]:
    """Register capture hooks for the duration of the block.

    Args:
        modules: ``{name: module}`` to hook.
        state: Shared hook state.

    Yields:
        Nothing; hooks are removed on exit (also on error).
    """
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_make_hook(state, name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the probe consistency check.

    Args:
        dtype: Gradient dtype.

    Returns:
        Tolerance (loose enough for TF32 convolutions on CUDA in float32).
    """
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 5e-3
    return 5e-2


@dataclass
class Capture:
    """Result of the probe: call plan and consistency check.

    Attributes:
        plan: ``{module: [(out_shape, dtype, device), ...]}`` one entry per call.
        failures: ``{module: relative error}`` for modules whose factor-based
            gradient disagreed with autograd on the probe sample.
    """

    plan: dict[str, list[tuple[torch.Size, torch.dtype, torch.device]]]
    failures: dict[str, float]


def _signature(obj: Any) -> Any:
    """Hashable shape/dtype/device signature of a (nested) batch.

    Args:
        obj: Tensor or tuple/list/dict of tensors.

    Returns:
        A hashable description.
    """
    if isinstance(obj, Tensor):
        return (tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return ("d", tuple((k, _signature(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_signature(v) for v in obj))
    return ("o", type(obj).__name__)


_CACHE: OrderedDict[tuple, tuple[list[weakref.ref], Capture]] = OrderedDict()
_CACHE_SIZE = 16


def probe(
    loss_func: Callable,
    params: Mapping[str, Tensor],
    sample: Any,
    modules: Mapping[str, nn.Module],
    checked: Mapping[str, Mapping[str, str]],
) -> Capture:
    """Probe with a small cache (see :func:`_probe`).

    Repeated calls with the same loss function object, the same hooked module
    objects (and training flags) and the same parameter/sample shapes reuse the
    plan and check. Entries hold weak references and are used only while the very
    same objects are alive, so a new loss or model is always probed.

    Args:
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: All parameters by name (values used for the call).
        sample: One sample as the loss expects it.
        modules: ``{name: module}`` to hook.
        checked: ``{module_name: {attr: param_name}}`` checked parameters.

    Returns:
        The :class:`Capture` (shared; do not mutate).
    """
    objs: list[Any] = [loss_func, *modules.values()]
    try:
        refs = [weakref.ref(o) for o in objs]
    except TypeError:  # objects without weakref support: no caching
        return _probe(loss_func, params, sample, modules, checked)
    key = (
        tuple(id(o) for o in objs),
        tuple(modules),
        tuple(m.training for m in modules.values()),
        tuple((m, tuple(a.items())) for m, a in checked.items()),
        tuple((k, _signature(v)) for k, v in params.items()),
        _signature(sample),
    )
    hit = _CACHE.get(key)
    if hit is not None and all(r() is o for r, o in zip(hit[0], objs, strict=True)):
        _CACHE.move_to_end(key)
        return hit[1]
    cap = _probe(loss_func, params, sample, modules, checked)
    _CACHE[key] = (refs, cap)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return cap


def _probe(
    loss_func: Callable,
    params: Mapping[str, Tensor],
    sample: Any,
    modules: Mapping[str, nn.Module],
    checked: Mapping[str, Mapping[str, str]],
) -> Capture:
    """Run the loss on one sample to learn the hook call plan and check factors.

    Args:
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: All parameters by name (values used for the call).
        sample: One sample as the loss expects it.
        modules: ``{name: module}`` to hook.
        checked: ``{module_name: {attr: param_name}}`` parameters whose factor
            gradients are compared with autograd.

    Returns:
        The :class:`Capture` plan and failures.
    """
    cuda = sorted({t.device.index or 0 for t in params.values() if t.device.type == "cuda"})
    state = _HookState(probe=True, zs={})
    state.reset({name: [] for name in modules})
    p = {k: v.detach() for k, v in params.items()}
    leaves = {}
    for amap in checked.values():
        for pname in amap.values():
            leaves[pname] = p[pname] = p[pname].detach().clone().requires_grad_()
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        with _hooks(modules, state):
            loss = as_scalar_loss(loss_func(p, sample))
        zs = [z for name in modules for z in state.zs[name]]
        wrt = zs + list(leaves.values())
        grads: list[Tensor | None] = [None] * len(wrt)
        if loss.requires_grad and wrt:
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
    ds_all = iter(grads[: len(zs)])
    true = dict(zip(leaves, grads[len(zs) :], strict=True))
    plan: dict[str, list] = {}
    failures: dict[str, float] = {}
    for name, module in modules.items():
        plan[name] = [(z.shape, z.dtype, z.device) for z in state.zs[name]]
        calls = []
        for a, z in zip(state.inputs[name], state.zs[name], strict=True):
            ds = next(ds_all)
            calls.append((a, torch.zeros_like(z) if ds is None else ds))
        amap = checked.get(name, {})
        if not amap:
            continue
        err = 0.0
        for attr, pname in amap.items():
            ref = true[pname]
            ref = torch.zeros_like(p[pname]) if ref is None else ref
            est = torch.zeros_like(ref)
            for a, ds in calls:
                g = factor_grads(module, a.unsqueeze(0), ds.unsqueeze(0), [attr])
                est = est + g[attr][0].to(est.dtype)
            scale = torch.maximum(est.norm(), ref.norm()).item()
            if scale > 0:
                err = max(err, (est - ref).norm().item() / scale)
        if err > _rtol(p[next(iter(amap.values()))].dtype):
            failures[name] = err
    return Capture(plan, failures)


def capture_batch(
    loss_func: Callable,
    params: Mapping[str, Tensor],
    data: Any,
    batch_size: int,
    modules: Mapping[str, nn.Module],
    plan: Mapping[str, list],
    prepare: Callable[[Any], Any],
    per_sample_params: Sequence[str] = (),
) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], dict[str, Tensor]]:
    """Capture per-sample layer factors (and optionally parameter grads) of a batch.

    Args:
        loss_func: ``loss_func(params, sample) -> scalar``.
        params: All parameters by name.
        data: The batch (pytree of tensors with leading dim ``batch_size``).
        batch_size: ``B``.
        modules: ``{name: module}`` to hook.
        plan: Call plan from :func:`probe`.
        prepare: Maps the vmapped sample to what the loss expects (e.g. unsqueeze).
        per_sample_params: Names of parameters that get per-sample gradients
            through expanded copies (parameters no hook covers).

    Returns:
        ``(factors, grads)``: ``factors[module]`` is a list over calls of
        ``(a (B, *in_shape), ds (B, *out_shape))``; ``grads[name]`` is
        ``(B, *param.shape)`` for each name in ``per_sample_params``.
    """
    base = {k: v.detach() for k, v in params.items()}
    zs = {
        name: [
            torch.zeros(batch_size, *shape, dtype=dt, device=dev, requires_grad=True)
            for shape, dt, dev in calls
        ]
        for name, calls in plan.items()
    }
    expanded = {
        k: base[k].expand(batch_size, *base[k].shape).requires_grad_() for k in per_sample_params
    }
    state = _HookState(probe=False, zs={})

    def one(z_one: dict, p_one: dict, sample: Any) -> tuple[Tensor, dict]:
        state.reset(z_one)
        p = dict(base)
        p.update(p_one)
        loss = as_scalar_loss(loss_func(p, prepare(sample)))
        for name, calls in state.inputs.items():
            if len(calls) != len(z_one[name]):
                msg = (
                    f"Module '{name}' was called {len(calls)} times, but "
                    f"{len(z_one[name])} times on the probe sample; sample-dependent "
                    "control flow is not supported by layer hooks. Use route='vmap'."
                )
                raise RuntimeError(msg)
        return loss, state.inputs

    flat_z = [z for name in plan for z in zs[name]]
    wrt = flat_z + list(expanded.values())
    grads: list[Tensor | None] = [None] * len(wrt)
    with torch.enable_grad():
        with _hooks(modules, state):
            losses, inputs = torch.func.vmap(one, randomness="different")(zs, expanded, data)
        if wrt and losses.requires_grad:
            grads = list(torch.autograd.grad(losses.sum(), wrt, allow_unused=True))
    it = iter(grads[: len(flat_z)])
    factors = {}
    for name in plan:
        factors[name] = []
        for a, z in zip(inputs[name], zs[name], strict=True):
            ds = next(it)
            factors[name].append((a, torch.zeros_like(z) if ds is None else ds))
    pgrads = {}
    for (k, e), g in zip(expanded.items(), grads[len(flat_z) :], strict=True):
        pgrads[k] = torch.zeros_like(e) if g is None else g
    return factors, pgrads
