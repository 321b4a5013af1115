"""Parameter flattening helpers shared by the functional API.

A model's trainable parameters are handled in two forms:

* a ``dict`` ``{name: tensor}`` as used by :func:`torch.func.functional_call`;
* a flat 1-D tensor of length ``p`` (the concatenation of the dict's values in the
  model's ``named_parameters`` order), or a tuple of per-parameter flat tensors
  ("layer split" form).

:func:`flatten_func` turns a function of the dict form into a function of the flat form;
:func:`partial_param` restricts a flat-form function to a subset of parameters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dattri.func.batch_utils import check_names

__all__ = [
    "flatten_func",
    "flatten_params",
    "get_parameter_chunk_sizes",
    "normalize_layer_name",
    "partial_param",
]


def flatten_params(tensors: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a dict of tensors into one flat 1-D tensor (in dict order).

    Args:
        tensors: ``{name: tensor}``; tensors may live on any one device.

    Returns:
        A tensor of shape ``(sum of numel,)`` on the first tensor's device.

    Raises:
        ValueError: if ``tensors`` is empty.
    """
    if len(tensors) == 0:
        msg = "flatten_params: `tensors` is empty; pass at least one tensor."
        raise ValueError(msg)
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def normalize_layer_name(
    layer_name: str | Sequence[str] | None,
    valid_names: Sequence[str],
) -> list[str] | None:
    """Validate a parameter selection and return it as a list.

    Args:
        layer_name: ``None`` (all parameters), a single parameter name such as
            ``"fc3.weight"``, or a list of names.
        valid_names: the names that may be selected (in model order).

    Returns:
        ``None`` when ``layer_name`` is ``None``, else the list of selected names.

    Raises:
        ValueError: if a name is not a parameter name (the message lists the valid
            names) or if the selection is empty or has duplicates.
        TypeError: if ``layer_name`` is neither a str nor a sequence of str.
    """
    if layer_name is None:
        return None
    if isinstance(layer_name, str):
        names = [layer_name]
    elif isinstance(layer_name, Sequence) and all(isinstance(n, str) for n in layer_name):
        names = list(layer_name)
    else:
        msg = (
            "layer_name must be None, a parameter name (str) or a list of parameter "
            f"names, got {type(layer_name).__name__}."
        )
        raise TypeError(msg)
    if not names:
        msg = "layer_name is an empty list; pass None to select every parameter."
        raise ValueError(msg)
    check_names(
        names,
        valid_names,
        unknown="layer_name {names} names no trainable parameter of the model. "
        "Valid names: {valid}.",
        repeated="layer_name {names} lists a parameter more than once.",
    )
    return names


def _param_specs(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]


def _unflatten_params(
    flat: Tensor | Sequence[Tensor],
    specs: Sequence[tuple[str, torch.Size]] | nn.Module,
) -> dict[str, Tensor]:
    """Split a flat tensor (or a tuple of per-parameter flats) into a param dict.

    Args:
        flat: a 1-D tensor of length ``p`` or a tuple of 1-D tensors, one per parameter.
        specs: ``[(name, shape), ...]`` in flattening order, or (upstream's call form
            ``_unflatten_params(tensors, model)``) a model whose trainable parameters
            give them.

    Returns:
        ``{name: view of shape}``.

    Raises:
        ValueError: if the sizes do not match ``specs``.
    """
    if isinstance(specs, nn.Module):
        specs = _param_specs(specs)
    if isinstance(flat, Tensor):
        total = sum(math.prod(s) for _, s in specs)
        if flat.dim() != 1 or flat.numel() != total:
            msg = (
                f"Expected a flat parameter vector of size {total}, got shape {tuple(flat.shape)}."
            )
            raise ValueError(msg)
        out = {}
        offset = 0
        for name, shape in specs:
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out
    flats = list(flat)
    if len(flats) != len(specs):
        msg = f"Expected {len(specs)} per-parameter tensors, got {len(flats)}."
        raise ValueError(msg)
    return {name: t.reshape(shape) for (name, shape), t in zip(specs, flats)}


def _unflatten_params_layerwise(tensors: Sequence[Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Upstream helper: a tuple of per-parameter flat tensors to a ``{name: tensor}`` dict.

    Args:
        tensors: one 1-D tensor per trainable parameter of ``model``, in order.
        model: the model giving names and shapes.

    Returns:
        ``{name: tensor reshaped to the parameter's shape}``.
    """
    return _unflatten_params(tuple(tensors), _param_specs(model))


def flatten_func(model: nn.Module, param_num: int = 0) -> Callable:
    """Decorator: make a function of a param dict accept a flat parameter vector.

    Argument ``param_num`` of the decorated function, originally a dict
    ``{name: tensor}`` for :func:`torch.func.functional_call`, may then be given as
    a flat 1-D tensor over the model's trainable parameters (``requires_grad``), or a
    tuple of per-parameter flat tensors. A dict is passed through unchanged.

    Args:
        model: the model whose trainable parameters define the flat layout.
        param_num: position of the parameter argument.

    Returns:
        The decorator.
    """
    specs = _param_specs(model)

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            params = args[param_num]
            if not isinstance(params, Mapping):
                args[param_num] = _unflatten_params(params, specs)
            return func(*args, **kwargs)

        return wrapper

    return decorator


def partial_param(
    full_param: Mapping[str, Tensor],
    layer_name: str | Sequence[str],
    param_num: int = 0,
) -> Callable:
    """Decorator: restrict a flat-parameter function to a subset of parameters.

    The decorated function takes, at position ``param_num``, only the concatenation
    of the selected parameters (in ``layer_name`` order); the others are held at
    their values in ``full_param``. ``full_param`` is never modified.

    Args:
        full_param: ``{name: tensor}`` of all trainable parameters in model order.
        layer_name: the selected parameter name(s).
        param_num: position of the parameter argument.

    Returns:
        The decorator.
    """
    names = normalize_layer_name(layer_name, list(full_param.keys()))
    sizes = [full_param[n].numel() for n in names]
    order = list(full_param.keys())
    frozen = {k: v.detach().reshape(-1) for k, v in full_param.items()}

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args = list(args)
            part = args[param_num]
            if part.dim() != 1 or part.numel() != sum(sizes):
                msg = (
                    f"Expected the selected parameters {names} as a flat vector of "
                    f"size {sum(sizes)}, got shape {tuple(part.shape)}."
                )
                raise ValueError(msg)
            pieces = dict(zip(names, torch.split(part, sizes)))
            args[param_num] = torch.cat([pieces.get(k, frozen[k]) for k in order])
            return func(*args, **kwargs)

        return wrapper

    return decorator


def get_parameter_chunk_sizes(
    param_shape_list: Sequence[Sequence[int] | int],
    batch_size: int,
) -> tuple[int, list[int]]:
    """Group consecutive parameters into chunks for chunked projection.

    A chunk holds at most ``(2**32 - 1) // (2 * batch_size)`` elements (so that a
    ``(batch_size, chunk)`` buffer is indexable with 32-bit offsets); a single parameter
    larger than that forms its own chunk.

    Args:
        param_shape_list: the shape (or numel) of each parameter, in order.
        batch_size: the feature batch size.

    Returns:
        ``(max_chunk_size, chunk_sizes)``: the largest chunk and each chunk's numel.
    """
    if batch_size <= 0:
        msg = f"batch_size must be positive, got {batch_size}."
        raise ValueError(msg)
    cap = (2**32 - 1) // (2 * batch_size)
    numels = [
        int(s) if isinstance(s, int) else math.prod(int(d) for d in s) for s in param_shape_list
    ]
    chunks: list[int] = []
    current = 0
    for n in numels:
        if current and current + n > cap:
            chunks.append(current)
            current = 0
        current += n
    if current:
        chunks.append(current)
    return (max(chunks) if chunks else 0), chunks


def _vectorize(
    g: Mapping[str, Tensor],
    batch_dim: bool = True,
    arr: Tensor | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Flatten a dict of per-sample tensors ``{name: (B, ...)}`` into ``(B, D)``.

    Args:
        g: the dict of tensors.
        batch_dim: whether the tensors have a leading batch dimension.
        arr: optional preallocated output of the right size.
        device: output device (default: the tensors' device).

    Returns:
        ``(B, D)`` if ``batch_dim`` else ``(D,)``.
    """
    values = list(g.values())
    if batch_dim:
        flat = [v.reshape(v.shape[0], -1) for v in values]
        out = torch.cat(flat, dim=1)
    else:
        out = torch.cat([v.reshape(-1) for v in values])
    if device is not None:
        out = out.to(device)
    if arr is not None:
        arr.copy_(out)
        return arr
    return out
