"""Upstream's CIFAR ResNet-9 helpers (``train_cifar_resnet9``, ``loss_cifar_resnet9``)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from dattri.benchmark.datasets._upstream import UpstreamRecipe
from dattri.benchmark.models.resnet9 import ResNet9, create_resnet9_model

__all__ = ["create_resnet9_model", "loss_cifar_resnet9", "train_cifar_resnet9"]

_RECIPE = UpstreamRecipe(create_resnet9_model, lr=0.01, momentum=0.9)


def train_cifar_resnet9(
    dataloader: DataLoader,
    seed: int = 0,
    device: str = "cpu",
    num_classes: int = 2,
    num_epochs: int = 10,
) -> ResNet9:
    """Train a ResNet-9 with upstream's recipe (SGD, lr 0.01, momentum 0.9).

    Args:
        dataloader: Batches ``(images (B, 3, 32, 32), labels (B,))``.
        seed: Seed of the initialisation and of the training randomness.
        device: Training device.
        num_classes: Number of classes.
        num_epochs: Number of epochs.

    Returns:
        The trained model, in eval mode, on ``device``.
    """
    return _RECIPE.train(dataloader, seed, device, num_epochs, num_classes=num_classes)


def loss_cifar_resnet9(
    model_path: str | os.PathLike,
    dataloader: DataLoader,
    device: str = "cpu",
    num_classes: int = 2,
) -> torch.Tensor:
    """Per-example cross-entropy of a saved ResNet-9 (eval mode).

    Args:
        model_path: A ``state_dict`` of the ResNet-9.
        dataloader: Batches ``(images, labels)``.
        device: Evaluation device.
        num_classes: Number of classes of the saved model.

    Returns:
        ``(n,)`` losses on CPU, in loader order.
    """
    return _RECIPE.loss(model_path, dataloader, device, num_classes=num_classes)
