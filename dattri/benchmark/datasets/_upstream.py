"""Shared plumbing of the upstream-named train/loss helpers (``train_mnist_lr`` ...).

Upstream's per-dataset modules each carry their own training loop and their own
evaluation loop. Here every ``train_<dataset>_<model>`` is one call of
:func:`~dattri.benchmark.models.train_classifier` with upstream's recipe, and
every ``loss_<dataset>_<model>`` is :func:`per_example_loss` over a fresh model,
so there is one trainer and one evaluation loop in the package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dattri.benchmark.models._rng import seeded_rng
from dattri.benchmark.models.train import train_classifier


def train_upstream_recipe(
    model_factory: Callable[[], nn.Module],
    dataloader: DataLoader,
    *,
    seed: int,
    device: str | torch.device,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Build a model under ``seed`` and train it with plain minibatch SGD.

    The model is initialised right after ``torch.manual_seed(seed)`` inside a
    forked RNG, and training runs in :func:`train_classifier` (which seeds its own
    forked RNG with ``seed`` for loader shuffling and dropout), so the same seed
    gives the same model and the caller's global RNG state is left untouched.

    Args:
        model_factory: Builds a fresh model.
        dataloader: Batches ``(inputs, labels)``.
        seed: Seed of the initialisation and of training randomness.
        device: Training device.
        epochs: Passes over ``dataloader``.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.

    Returns:
        The trained model in eval mode, on ``device``.
    """
    with seeded_rng(int(seed)):
        model = model_factory()
    return train_classifier(
        model,
        dataloader,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        seed=int(seed),
        device=device,
        verbose=False,
    )


def load_weights(
    path: str | os.PathLike,
    what: str,
    map_location: str | torch.device = "cpu",
    *,
    arg: str = "model_path",
) -> Any:
    """``torch.load(path, weights_only=True)`` of a checkpoint file that must exist.

    Args:
        path: The file.
        what: What the caller should pass instead (for the error message).
        map_location: Where the tensors are loaded.
        arg: The caller's name of the ``path`` argument (for the error message).

    Returns:
        The loaded object (a state dict or a checkpoint dict).

    Raises:
        FileNotFoundError: If ``path`` is not a file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        msg = f"`{arg}`: no checkpoint at {file}; pass {what}."
        raise FileNotFoundError(msg)
    return torch.load(file, map_location=map_location, weights_only=True)


def load_state_dict_file(model: nn.Module, model_path: str | os.PathLike) -> nn.Module:
    """Load a state_dict saved with ``torch.save`` into ``model`` (eval mode).

    Args:
        model: A fresh model of the right architecture.
        model_path: File written by ``torch.save(model.state_dict(), path)``.

    Returns:
        ``model`` with the weights loaded, in eval mode.

    Raises:
        FileNotFoundError: If ``model_path`` does not exist.
    """
    state = load_weights(model_path, "the path of a saved state_dict")
    if isinstance(state, nn.Module):  # pragma: no cover - weights_only refuses modules
        state = state.state_dict()
    model.load_state_dict(state)
    return model.eval()


def per_example_loss(
    model: nn.Module,
    dataloader: DataLoader,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cross-entropy of every sample of ``dataloader`` under ``model`` (no grad).

    Args:
        model: The model (put in eval mode here).
        dataloader: Batches ``(inputs, labels)``.
        device: Evaluation device.

    Returns:
        ``(n,)`` float tensor on CPU, in loader order.
    """
    model.eval().to(device)

    def losses(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs.to(device))
        return nn.functional.cross_entropy(logits, labels.to(device), reduction="none")

    return per_batch_values(dataloader, losses)


def per_batch_values(
    dataloader: Iterable[Any], batch_values: Callable[[Any], torch.Tensor]
) -> torch.Tensor:
    """``batch_values`` of every batch, without gradients, concatenated on the CPU.

    Args:
        dataloader: The batches.
        batch_values: Maps a batch to a ``(b,)`` tensor (one value per sample).

    Returns:
        ``(n,)`` tensor on the CPU in loader order (empty for an empty loader).
    """
    with torch.no_grad():
        values = [batch_values(batch).cpu() for batch in dataloader]
    return torch.cat(values) if values else torch.zeros(0)


@dataclass(frozen=True)
class UpstreamRecipe:
    """Upstream's SGD recipe of one ``<dataset>_<model>`` pair: its model and step sizes.

    Attributes:
        model_factory: Builds a fresh model; keyword arguments of :meth:`train`
            and :meth:`loss` (e.g. ``num_classes``) are passed to it.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
    """

    model_factory: Callable[..., nn.Module]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def train(
        self,
        dataloader: DataLoader,
        seed: int,
        device: str | torch.device,
        epochs: int,
        **model_kwargs: object,
    ) -> nn.Module:
        """:func:`train_upstream_recipe` with this recipe (eval-mode model on ``device``)."""
        return train_upstream_recipe(
            lambda: self.model_factory(**model_kwargs),
            dataloader,
            seed=seed,
            device=device,
            epochs=epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )

    def loss(
        self,
        model_path: str | os.PathLike,
        dataloader: DataLoader,
        device: str | torch.device,
        **model_kwargs: object,
    ) -> torch.Tensor:
        """:func:`per_example_loss` of the model saved at ``model_path``: ``(n,)`` on CPU."""
        model = load_state_dict_file(self.model_factory(**model_kwargs), model_path)
        return per_example_loss(model, dataloader, device)
