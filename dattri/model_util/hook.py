"""Capture the inputs and outputs of one (possibly nested) layer with a forward hook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["get_final_layer_io"]


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, list | tuple) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    msg = f"Hooked layer produced a {type(x).__name__}, expected a tensor."
    raise TypeError(msg)


def _move(x: Any, device: str | torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def get_final_layer_io(
    model: nn.Module,
    final_linear_layer_name: str,
    dataloader: DataLoader,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs of a layer over every sample of a loader.

    The model runs under ``torch.no_grad()`` in its current train/eval mode (call
    ``model.eval()`` first for deterministic features) and must already be on
    ``device``; batches are moved there. Tuple/list batches call
    ``model(batch[0])``; dict batches call ``model(**batch)``; tensor batches
    call ``model(batch)``.

    Args:
        model: The model.
        final_linear_layer_name: Qualified module name, nested names such as
            ``"head.fc"`` allowed.
        dataloader: Loader over the samples.
        device: Device for the batches.

    Returns:
        ``(inputs, outputs)`` of shapes ``(n_samples, *in_features)`` and
        ``(n_samples, *out_features)``, detached, on ``device``.

    Raises:
        ValueError: If the layer does not exist or was never called.
    """
    try:
        layer = model.get_submodule(final_linear_layer_name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n]
        msg = (
            f"`final_linear_layer_name` {final_linear_layer_name!r} is not a module of "
            f"the model; available: {names[:20]}."
        )
        raise ValueError(msg) from exc
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        inputs.append(_first_tensor(args).detach())
        outputs.append(_first_tensor(out).detach())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in dataloader:
                if isinstance(batch, Mapping):
                    model(**{k: _move(v, device) for k, v in batch.items()})
                elif isinstance(batch, list | tuple):
                    model(_move(batch[0], device))
                else:
                    model(_move(batch, device))
    finally:
        handle.remove()
    if not inputs:
        msg = f"Layer {final_linear_layer_name!r} was never called (empty loader?)."
        raise ValueError(msg)
    return torch.cat(inputs).to(device), torch.cat(outputs).to(device)
