"""nanoGPT's training recipe for :class:`~dattri.benchmark.models.gpt.GPT` (plain torch).

AdamW with weight decay on the matrices only, linear warm-up then cosine decay
of the learning rate, gradient clipping, and (with a validation loader) the
checkpoint of lowest validation loss kept, as nanoGPT's ``train.py`` does with
``always_save_checkpoint=False``. Batches come from a ``DataLoader`` of
``(x, y)`` token windows, cycled for ``max_iters`` steps.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.benchmark.models._config import check_config
from dattri.benchmark.models._rng import seeded_rng

__all__ = ["NanoGPTTrainConfig", "configure_optimizer", "nanogpt_lr", "train_gpt"]


@dataclass
class NanoGPTTrainConfig:
    """Optimisation settings; defaults are upstream's ``train_shakespeare_char.py``.

    Attributes:
        max_iters: Optimiser steps.
        batch_size: Windows per step (used by loaders built from this config).
        learning_rate: Peak learning rate.
        min_lr: Final learning rate of the cosine decay.
        warmup_iters: Linear warm-up steps.
        lr_decay_iters: Step at which the decay reaches ``min_lr``.
        decay_lr: Use the schedule (``False``: constant ``learning_rate``).
        weight_decay: AdamW weight decay of the 2-D parameters.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: Clip the gradient norm at this value (0 disables).
        eval_interval: Evaluate the validation loss every this many steps.
        eval_iters: Validation batches per evaluation.
    """

    max_iters: int = 5000
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 200

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises:
            ValueError: If a count or rate is out of range.
        """
        check_config(
            self,
            nonnegative=("max_iters", "warmup_iters", "eval_iters"),
            positive=("batch_size", "eval_interval", "lr_decay_iters"),
        )
        if self.learning_rate <= 0 or self.min_lr < 0 or self.grad_clip < 0:
            msg = (
                "NanoGPTTrainConfig needs learning_rate > 0, min_lr >= 0 and grad_clip >= 0; "
                f"got {self.learning_rate}, {self.min_lr}, {self.grad_clip}."
            )
            raise ValueError(msg)

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for checkpoints)."""
        return asdict(self)


def nanogpt_lr(it: int, config: NanoGPTTrainConfig) -> float:
    """Learning rate at step ``it``: linear warm-up, cosine decay, then ``min_lr``."""
    if not config.decay_lr:
        return config.learning_rate
    if it < config.warmup_iters:
        return config.learning_rate * it / config.warmup_iters
    if it > config.lr_decay_iters:
        return config.min_lr
    span = max(config.lr_decay_iters - config.warmup_iters, 1)
    ratio = (it - config.warmup_iters) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def configure_optimizer(model: nn.Module, config: NanoGPTTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dimensions only.

    Tied parameters appear once (``model.parameters()`` deduplicates them).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            msg = "The training loader yields no batches; give it at least one sample."
            raise ValueError(msg)


def _loss(model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        msg = "GPT training batches must be (x, y) pairs of (batch, T) token ids."
        raise TypeError(msg)
    x, y = batch[0].to(device), batch[1].to(device)
    _, loss = model(x, y)
    return loss


@torch.no_grad()
def _estimate(model: nn.Module, loader: DataLoader, iters: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= iters:
            break
        total += float(_loss(model, batch, device))
        count += 1
    model.train()
    return total / max(count, 1)


def train_gpt(
    model: nn.Module,
    train_loader: DataLoader,
    config: NanoGPTTrainConfig | None = None,
    val_loader: DataLoader | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a GPT in place with nanoGPT's recipe.

    Runs inside ``torch.random.fork_rng`` seeded with ``seed`` (dropout and
    unseeded shuffling are reproducible; the caller's RNG is untouched). With
    ``val_loader`` the validation loss is estimated every ``eval_interval``
    steps and after the last one, and the returned model holds the weights of
    the lowest one; without it the final weights are returned.

    Args:
        model: A model with ``model(x, y) -> (logits, mean_loss)``.
        train_loader: Loader of ``(x, y)`` batches, cycled for ``max_iters`` steps.
        config: Optimisation settings (upstream's Shakespeare recipe by default).
        val_loader: Optional validation loader.
        seed: Seed of dropout and shuffling.
        device: Training device.
        verbose: Show a progress bar with the running loss.

    Returns:
        ``(model, info)``; ``info`` has ``iter_num`` (steps done),
        ``best_val_loss`` (``None`` without a validation loader), ``best_iter``
        and ``train_loss`` (mean of the last ``eval_interval`` steps).
    """
    config = NanoGPTTrainConfig() if config is None else config
    device = torch.device(device)
    model.to(device)
    optimizer = configure_optimizer(model, config)
    best_val, best_iter, best_state = None, 0, None
    recent: deque[torch.Tensor] = deque(maxlen=config.eval_interval)  # no per-step sync
    with seeded_rng(seed, device):
        model.train()
        batches = _cycle(train_loader)
        bar = tqdm(range(config.max_iters), desc="train gpt", disable=not verbose)
        for it in bar:
            for group in optimizer.param_groups:
                group["lr"] = nanogpt_lr(it, config)
            loss = _loss(model, next(batches), device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            recent.append(loss.detach())
            last = it + 1 == config.max_iters
            if val_loader is not None and ((it + 1) % config.eval_interval == 0 or last):
                val = _estimate(model, val_loader, config.eval_iters, device)
                if best_val is None or val < best_val:
                    best_val, best_iter = val, it + 1
                    best_state = copy.deepcopy(model.state_dict())
            if verbose:
                bar.set_postfix(loss=float(recent[-1]))
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {
        "iter_num": config.max_iters,
        "best_val_loss": best_val,
        "best_iter": best_iter if best_val is not None else config.max_iters,
        "train_loss": float(torch.stack(list(recent)).mean()) if recent else None,
    }
    return model, info
