"""Upstream's ImageNet ResNet-18 helpers (``train_imagenet_resnet18`` ...)."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from dattri.benchmark.datasets._upstream import UpstreamRecipe
from dattri.benchmark.models.resnet18 import ResNet18, create_resnet18_model

__all__ = ["create_resnet18_model", "loss_imagenet_resnet18", "train_imagenet_resnet18"]

_RECIPE = UpstreamRecipe(create_resnet18_model, lr=0.1, momentum=0.8, weight_decay=4e-5)


def train_imagenet_resnet18(
    dataloader: DataLoader,
    seed: int = 0,
    device: str = "cpu",
    num_epochs: int = 15,
) -> ResNet18:
    """Train a ResNet-18 with upstream's recipe (SGD lr 0.1, momentum 0.8, wd 4e-5).

    Args:
        dataloader: Batches ``(images (B, 3, 224, 224), labels (B,))``.
        seed: Seed of the initialisation and of the training randomness.
        device: Training device.
        num_epochs: Number of epochs.

    Returns:
        The trained model, in eval mode, on ``device``.
    """
    return _RECIPE.train(dataloader, seed, device, num_epochs)


def loss_imagenet_resnet18(
    model_path: str | os.PathLike,
    dataloader: DataLoader,
    device: str = "cpu",
) -> float:
    """Mean cross-entropy of a saved ResNet-18 over ``dataloader`` (eval mode).

    Args:
        model_path: A ``state_dict`` of the 1000-class ResNet-18.
        dataloader: Batches ``(images, labels)``.
        device: Evaluation device.

    Returns:
        The mean per-sample loss, a float.
    """
    return float(_RECIPE.loss(model_path, dataloader, device).mean())
