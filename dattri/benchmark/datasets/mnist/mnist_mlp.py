"""Upstream's MNIST MLP helpers (``train_mnist_mlp``, ``loss_mnist_mlp``)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from dattri.benchmark.datasets._upstream import UpstreamRecipe
from dattri.benchmark.models.mlp import MLPMnist, create_mlp_model

__all__ = ["MLPMnist", "create_mlp_model", "loss_mnist_mlp", "train_mnist_mlp"]

_RECIPE = UpstreamRecipe(lambda: create_mlp_model("mnist"), lr=0.01, momentum=0.9)


def train_mnist_mlp(
    dataloader: DataLoader,
    seed: int = 0,
    device: str = "cpu",
    epoch_num: int = 50,
) -> MLPMnist:
    """Train :class:`MLPMnist` (784-128-64-10, dropout 0.1) with upstream's recipe.

    SGD with learning rate 0.01 and momentum 0.9 for ``epoch_num`` epochs;
    initialisation, shuffling and dropout masks are seeded with ``seed``.

    Args:
        dataloader: Batches ``(images, labels)``.
        seed: Seed of the initialisation and of the training randomness.
        device: Training device.
        epoch_num: Number of epochs.

    Returns:
        The trained model, in eval mode (dropout off), on ``device``.
    """
    return _RECIPE.train(dataloader, seed, device, epoch_num)


def loss_mnist_mlp(
    model_path: str | os.PathLike,
    dataloader: DataLoader,
    device: str = "cpu",
) -> torch.Tensor:
    """Per-example cross-entropy of a saved MNIST MLP (eval mode, dropout off).

    Args:
        model_path: A ``state_dict`` of :class:`MLPMnist`.
        dataloader: Batches ``(images, labels)``.
        device: Evaluation device.

    Returns:
        ``(n,)`` losses on CPU, in loader order.
    """
    return _RECIPE.loss(model_path, dataloader, device)
