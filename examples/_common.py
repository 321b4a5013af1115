"""Helpers shared by the example scripts (not part of the library).

Every example trains a small model on scikit-learn's bundled digits (8x8 images, no
download), so that each script runs on a laptop CPU in well under two minutes and in a
few seconds with ``--quick``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.datasets import load_digits_dataset
from dattri.benchmark.models import create_lr_model, train_full_batch

#: L2 weight decay of every logistic regression trained here; the influence-function
#: examples use it as the Hessian damping (the Hessian of ``wd/2 ||theta||^2`` is ``wd I``).
WEIGHT_DECAY = 1e-2


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every example has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a few seconds (CI mode)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def device_from(name: str) -> torch.device:
    """Parse ``--device``; exit with a clear message if CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    return device


def digits(n_train: int, n_test: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised digits split: ``x_train (n_train, 64)``, ``y_train``, ``x_test``, ``y_test``."""
    train, test = load_digits_dataset(n_train=n_train, n_test=n_test, seed=seed)
    return (*train.tensors, *test.tensors)


def train_lr(
    x: Tensor, y: Tensor, device: torch.device, weight_decay: float = WEIGHT_DECAY, seed: int = 0
) -> nn.Module:
    """L2-regularised multinomial logistic regression trained to convergence (L-BFGS).

    Influence functions assume the model sits at a minimum of the training objective;
    full-batch L-BFGS on this convex problem gets there in well under a second.
    """
    torch.manual_seed(seed)
    model = create_lr_model("digits").to(device)
    return train_full_batch(
        model, x.to(device), y.to(device), weight_decay=weight_decay, max_iter=500, tol=1e-4
    )


def loader(x: Tensor, y: Tensor, batch_size: int = 256) -> DataLoader:
    """A non-shuffled loader (attribution rows/columns follow the dataset order)."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def loss_if(model: nn.Module) -> Callable:
    """IF-family loss: each sample arrives with a batch axis of one, ``(1, 64)``."""

    def loss(params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def loss_sample(model: nn.Module) -> Callable:
    """TracIn/TRAK loss: each sample arrives un-batched, ``(64,)`` and ``()``."""

    def loss(params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return loss


def margin_sample(model: nn.Module) -> Callable:
    """TRAK's model output: the log-odds ``log p - log(1 - p)`` of the correct class."""

    def margin(params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        logp = -nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)
        )
        return logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))

    return margin


def prob_sample(model: nn.Module) -> Callable:
    """TRAK's ``correct_probability_func``: ``p(correct class)`` of one un-batched sample."""

    def prob(params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return torch.softmax(logits, dim=-1)[0, y]

    return prob


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean test cross-entropy and accuracy."""
    device = next(model.parameters()).device
    logits = model(x.to(device))
    y = y.to(device)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    return loss, acc
