"""Training helpers for the benchmark models (minibatch SGD and full-batch L-BFGS)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.benchmark.models._rng import seeded_rng

__all__ = ["full_batch_objective", "train_classifier", "train_full_batch"]

BatchLoss = Callable[[nn.Module, Any], torch.Tensor]


def _move(batch: Any, device: torch.device) -> Any:
    """Move a tensor / tuple / list / dict batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _default_batch_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        msg = (
            "The default loss needs (inputs, labels) batches; pass `loss_fn(model, "
            "batch) -> scalar` for other batch layouts."
        )
        raise TypeError(msg)
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_classifier(
    model: nn.Module,
    train_loader: DataLoader,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    device: str | torch.device = "cpu",
    loss_fn: BatchLoss | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Train with minibatch SGD (with momentum and L2 weight decay).

    Runs inside ``torch.random.fork_rng`` seeded with ``seed``, so shuffling by a
    loader without its own generator and dropout masks are reproducible while the
    caller's global RNG state is left untouched. (The initial weights are the
    caller's: seed before building the model.)

    Args:
        model: Model to train in place; moved to ``device``.
        train_loader: Loader of batches, by default ``(inputs, labels)``.
        epochs: Number of passes over the loader (>= 1).
        lr: Learning rate (> 0).
        weight_decay: SGD weight decay (gradient ``+ weight_decay * theta``).
        momentum: SGD momentum in ``[0, 1)``.
        seed: Seed of the RNG used during training.
        device: Training device.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; defaults to
            cross-entropy of ``model(x)`` against ``y``.
        verbose: Show a tqdm bar over epochs with the running loss.

    Returns:
        The trained model, on ``device`` and in eval mode.

    Raises:
        ValueError: If ``epochs``, ``lr``, ``weight_decay`` or ``momentum`` is out
            of range.
    """
    if int(epochs) < 1:
        msg = f"`epochs` must be >= 1, got {epochs}."
        raise ValueError(msg)
    if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        msg = (
            "Need lr > 0, weight_decay >= 0 and 0 <= momentum < 1; got "
            f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}."
        )
        raise ValueError(msg)
    device = torch.device(device)
    loss_fn = _default_batch_loss if loss_fn is None else loss_fn
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    with seeded_rng(seed, device):
        model.train()
        bar = tqdm(range(int(epochs)), desc="train", disable=not verbose)
        for _ in bar:
            total, count = torch.zeros((), device=device), 0
            for batch in train_loader:
                batch = _move(batch, device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                count += 1
            if verbose and count:
                bar.set_postfix(loss=float(total) / count)
    model.eval()
    return model


def full_batch_objective(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    weight_decay: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Regularised empirical risk ``mean_i loss(f(x_i), y_i) + wd/2 * ||theta||^2``.

    ``theta`` is every parameter with ``requires_grad`` (biases included). The
    ``wd/2`` factor makes the gradient of the penalty ``wd * theta``, the same
    convention as SGD's ``weight_decay``.

    Args:
        model: The model (used as it is; set eval/train mode beforehand).
        x: Inputs accepted by ``model``, e.g. ``(n, d)``.
        y: Targets, e.g. int64 labels ``(n,)``.
        weight_decay: L2 coefficient ``wd >= 0``.
        loss_fn: ``loss_fn(outputs, y) -> scalar`` mean loss; defaults to
            cross-entropy.

    Returns:
        Scalar objective tensor (differentiable).
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    objective = loss_fn(model(x), y)
    if weight_decay:
        penalty = sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)
        objective = objective + 0.5 * weight_decay * penalty
    return objective


def train_full_batch(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    weight_decay: float = 0.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    history_size: int = 50,
    verbose: bool = False,
) -> nn.Module:
    """Minimise :func:`full_batch_objective` with full-batch L-BFGS.

    Meant for small, (nearly) convex problems such as logistic regression, where
    the minimiser is unique with ``weight_decay > 0`` and attribution methods
    assume a stationary point. Uses strong-Wolfe line search; the run is
    deterministic on CPU. The objective is evaluated in eval mode (dropout off,
    BatchNorm on running statistics), and ``x``/``y`` are moved to the model's
    device. Use float64 models to reach tight tolerances.

    Args:
        model: Model to train in place.
        x: All training inputs.
        y: All training targets.
        weight_decay: L2 coefficient (see :func:`full_batch_objective`).
        max_iter: Maximum number of L-BFGS iterations.
        tol: Stop once the largest absolute gradient entry is ``<= tol``.
        loss_fn: ``loss_fn(outputs, y)`` mean loss; defaults to cross-entropy.
        history_size: L-BFGS memory.
        verbose: Show a tqdm bar over L-BFGS rounds.

    Returns:
        The trained model in eval mode. A ``RuntimeWarning`` is issued when the
        gradient tolerance was not reached within ``max_iter`` iterations.

    Raises:
        ValueError: If ``max_iter < 1``, ``tol <= 0`` or ``weight_decay < 0``.
    """
    if max_iter < 1 or tol <= 0 or weight_decay < 0:
        msg = (
            "Need max_iter >= 1, tol > 0 and weight_decay >= 0; got "
            f"max_iter={max_iter}, tol={tol}, weight_decay={weight_decay}."
        )
        raise ValueError(msg)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        msg = "`model` has no trainable parameters."
        raise ValueError(msg)
    device, dtype = params[0].device, params[0].dtype
    x = _move(x, device)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.to(dtype)
    y = y.to(device)
    model.eval()

    def zero_grads() -> None:
        for p in params:
            p.grad = None

    def closure() -> torch.Tensor:
        zero_grads()
        value = full_batch_objective(model, x, y, weight_decay, loss_fn)
        value.backward()
        return value

    def max_grad() -> float:
        closure()
        return max(float(p.grad.abs().max()) for p in params if p.grad is not None)

    # L-BFGS can stop early on a failed line search or tiny steps; restart it
    # (fresh curvature memory) until the gradient criterion holds, the budget is
    # spent, or a restart makes no progress.
    done = 0
    bar = tqdm(desc="L-BFGS", disable=not verbose, total=max_iter)
    grad = max_grad()
    while grad > tol and done < max_iter:
        optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=max_iter - done,
            tolerance_grad=tol,
            tolerance_change=0.0,
            history_size=history_size,
            line_search_fn="strong_wolfe",
        )
        optimizer.step(closure)
        n_iter = max(int(optimizer.state[params[0]].get("n_iter", 0)), 1)
        done += n_iter
        bar.update(n_iter)
        new_grad = max_grad()
        stalled = new_grad >= grad and n_iter <= 1
        grad = new_grad
        if stalled:
            break
    bar.close()
    zero_grads()
    if grad > tol:
        warnings.warn(
            f"train_full_batch stopped with max |grad| = {grad:.3g} > tol = {tol:g} "
            f"after {done} iterations; raise max_iter, use float64, or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
