"""Upstream's MNIST logistic-regression helpers (``train_mnist_lr``, ``loss_mnist_lr``)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from dattri.benchmark.datasets._upstream import UpstreamRecipe
from dattri.benchmark.models.linear import LogisticRegressionMnist, create_lr_model

__all__ = ["LogisticRegressionMnist", "create_lr_model", "loss_mnist_lr", "train_mnist_lr"]

#: plain SGD, learning rate 0.01
_RECIPE = UpstreamRecipe(lambda: create_lr_model("mnist"), lr=0.01)


def train_mnist_lr(
    dataloader: DataLoader,
    seed: int = 0,
    device: str = "cpu",
    epoch_num: int = 20,
) -> LogisticRegressionMnist:
    """Train :class:`LogisticRegressionMnist` with upstream's recipe.

    Plain SGD (learning rate 0.01, no momentum, no weight decay) for
    ``epoch_num`` passes over ``dataloader``; initialisation and shuffling are
    seeded with ``seed`` (the caller's global RNG state is left untouched).

    Args:
        dataloader: Batches ``(images (B, 1, 28, 28) or (B, 784), labels (B,))``.
        seed: Seed of the initialisation and of the training randomness.
        device: Training device.
        epoch_num: Number of epochs.

    Returns:
        The trained model, in eval mode, on ``device``.
    """
    return _RECIPE.train(dataloader, seed, device, epoch_num)


def loss_mnist_lr(
    model_path: str | os.PathLike,
    dataloader: DataLoader,
    device: str = "cpu",
) -> torch.Tensor:
    """Per-example cross-entropy of a saved MNIST logistic regression.

    The ground-truth style target of the ``mnist_lr`` benchmark
    (``calculate_lds_ground_truth(loss_mnist_lr, ...)``).

    Args:
        model_path: A ``state_dict`` of :class:`LogisticRegressionMnist`.
        dataloader: Batches ``(images, labels)``.
        device: Evaluation device.

    Returns:
        ``(n,)`` losses on CPU, in loader order.
    """
    return _RECIPE.loss(model_path, dataloader, device)
