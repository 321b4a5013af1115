"""Inputs and outputs of a model's last linear layer (the featurizer of RPS).

:class:`LastLayerFeaturizer` runs the model (eval mode, no gradients) on a batch with a
forward hook on one ``nn.Linear`` and returns, per sample, the layer's input ``f``
(``d`` values) followed by its output ``phi = theta f + b`` (``C`` values): one
``(B, d + C)`` row block. It has the featurizer interface of
:func:`~dattri.algorithm.store.scaled.collect_features_scaled` (``out_dim``,
``settings()``, ``reuse_buffers()``, ``featurizer(ckpt_idx, batch)``), so the rows go
to memory, to the resumable memmap store or are sharded over ranks like gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dattri.algorithm.runtime.batching import move_to_device
from dattri.loss_checks import explained_errors, train_mode_ok
from dattri.task import AttributionTask

__all__ = ["LastLayerFeaturizer"]


class LastLayerFeaturizer:
    """Per-sample ``[input, output]`` rows of the last linear layer.

    Batches: ``(x, y)`` tuples/lists (``model(x)``; with more than two elements
    ``model(*batch[:-1])``; the label is the last element), dicts (``model(**inputs)``
    without ``label_key``; the label is ``batch[label_key]``) or a plain input.

    Args:
        task: the task (model and checkpoints).
        layer_name: module name of the ``nn.Linear`` (nested names allowed).
        device: device of the returned rows.
        label_key: label entry of dict batches.
    """

    def __init__(
        self, task: AttributionTask, layer_name: str, device: torch.device, label_key: str
    ) -> None:
        self.task = task
        self.layer_name = layer_name
        self.device = device
        self.label_key = label_key
        layer = self.layer()  # validates the name
        self.in_dim, self.num_classes = layer.in_features, layer.out_features

    @property
    def out_dim(self) -> int:
        """Row width ``d + C``."""
        return self.in_dim + self.num_classes

    def settings(self) -> dict[str, Any]:
        """JSON description of the rows (part of a store's settings)."""
        return {"layer": self.layer_name, "out_dim": self.out_dim}

    def reuse_buffers(self) -> contextlib.AbstractContextManager[None]:
        """No reusable buffers (interface of the gradient featurizers)."""
        return contextlib.nullcontext()

    def layer(self) -> nn.Linear:
        """The hooked layer of the currently loaded model."""
        model = self.task.get_model()
        name = self.layer_name
        if not isinstance(name, str):
            msg = f"final_linear_layer_name must be a module name (str), got {type(name).__name__}."
            raise TypeError(msg)
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            msg = (
                f"final_linear_layer_name {name!r} is not a module of the model; "
                f"Linear layers: {names}."
            )
            raise ValueError(msg) from exc
        if not isinstance(layer, nn.Linear):
            msg = f"final_linear_layer_name {name!r} is a {type(layer).__name__}, not nn.Linear."
            raise TypeError(msg)
        return layer

    def labels(self, batch: Any) -> Tensor:
        """The ``(B,)`` labels of a batch."""
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                msg = (
                    f"dict batch has no label entry {self.label_key!r} (keys {list(batch)}); "
                    "set label_key=..."
                )
                raise ValueError(msg)
            return batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[-1]
        msg = "RPS needs labels: use (x, y) batches or dict batches with label_key."
        raise ValueError(msg)

    def _forward(self, model: nn.Module, batch: Any) -> None:
        if isinstance(batch, Mapping):
            model(**{k: v for k, v in batch.items() if k != self.label_key})
        elif isinstance(batch, (tuple, list)) and len(batch) > 2:
            model(*batch[:-1])
        elif isinstance(batch, (tuple, list)):
            model(batch[0])
        else:
            model(batch)

    def rows(
        self, batches: Iterable, ckpt_idx: int, name: str, labels: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Layer inputs ``(n, d)``, outputs ``(n, C)`` and optionally labels ``(n,)``.

        Args:
            batches: the batches.
            ckpt_idx: checkpoint to load.
            name: what the batches are (for messages).
            labels: also read the labels.
        """
        with train_mode_ok():  # eval mode is set below
            self.task.load_checkpoint(ckpt_idx)
        model, layer = self.task.get_model(), self.layer()
        try:
            model_device = next(model.parameters()).device
        except StopIteration:
            model_device = self.device
        feats: list[Tensor] = []
        outs: list[Tensor] = []
        labs: list[Tensor] = []

        def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
            feats.append(args[0].detach().to(self.device))
            outs.append(out.detach().to(self.device))

        was_training = model.training
        handle = layer.register_forward_hook(hook)
        model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    count = len(feats)
                    with explained_errors(model, batch, f"a batch of {name}", "the model"):
                        self._forward(model, move_to_device(batch, model_device))
                    if len(feats) != count + 1:
                        msg = (
                            f"Layer {self.layer_name!r} was called {len(feats) - count} "
                            "times in one forward; RPS needs exactly one."
                        )
                        raise ValueError(msg)
                    if labels:
                        labs.append(self.labels(batch).to(self.device).reshape(-1))
        finally:
            handle.remove()
            model.train(was_training)
        if not feats:
            return self._empty(), self._empty(self.num_classes), None
        f, o = torch.cat(feats), torch.cat(outs)
        if f.ndim != 2:
            msg = (
                f"The input of {self.layer_name!r} has shape {tuple(f.shape[1:])} "
                "per sample; RPS needs flat (d,) features (no sequence dimension)."
            )
            raise ValueError(msg)
        return f, o, torch.cat(labs) if labels else None

    def _empty(self, width: int | None = None) -> Tensor:
        dtype = self.layer().weight.dtype
        return torch.zeros(
            0, self.in_dim if width is None else width, dtype=dtype, device=self.device
        )

    def __call__(self, ckpt_idx: int, batch: Any, target: bool = False, where: str = "") -> Tensor:
        """``(B, d + C)`` rows ``[input, output]`` of one batch at checkpoint ``ckpt_idx``."""
        f, o, _ = self.rows([batch], ckpt_idx, f"batch{where}", False)
        return torch.cat([f, o], dim=1)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(inputs (n, d), outputs (n, C))`` of ``[input, output]`` rows."""
        return rows[:, : self.in_dim], rows[:, self.in_dim :]
