"""The one training step shared by subset retraining and MAGIC's replay.

Both :func:`dattri.model_util.subset_train.train_subset_models` (the ground truth)
and :class:`dattri.algorithm.magic.MAGICAttributor` (the metagradient) train with
the functions here, so that they describe the same training run:

* :func:`weighted_mean_loss`: the loss of a batch is ``sum_i w_i l_i / sum_i w_i``
  over the batch samples (``w_i`` = per-sample loss weight; a 0/1 mask gives the
  masked mean; a batch whose weights sum to 0 has zero loss).
* :func:`lr_at`: the learning rate of step ``t`` of ``T`` (constant, linear or cosine
  decay, optional linear warm-up).
* :func:`optimizer_update`: one functional (out-of-place, differentiable) step of
  SGD with momentum and L2 weight decay (``torch.optim.SGD`` semantics, dampening 0,
  no Nesterov) or Adam with L2 weight decay (``torch.optim.Adam`` semantics).
* :func:`init_optimizer_state`: the zero optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dattri.model_util.subset_train import SubsetTrainConfig

__all__ = [
    "init_optimizer_state",
    "lr_at",
    "optimizer_update",
    "state_slots",
    "weighted_mean_loss",
]


def weighted_mean_loss(per_sample: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean of per-sample losses over the last dimension.

    Args:
        per_sample: ``(..., B)`` per-sample losses.
        weights: ``(..., B)`` per-sample loss weights (a 0/1 mask gives the masked mean).

    Returns:
        ``(...)``: ``sum_i w_i l_i / sum_i w_i`` (``0`` where the weights sum to 0).
    """
    total = weights.sum(-1)
    safe = torch.where(total != 0, total, torch.ones_like(total))
    return (per_sample * weights).sum(-1) / safe


def lr_at(config: SubsetTrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of step ``step`` (0-based) of ``total_steps``.

    ``config.warmup_steps`` steps ramp linearly up to ``config.lr`` (step ``t`` uses
    ``lr * (t + 1) / warmup``); the rest follow ``config.lr_schedule``: ``"constant"``,
    ``"linear"`` (``lr * (T - t) / (T - W)``, reaching ``lr / (T - W)`` at the last
    step) or ``"cosine"`` (``lr * (1 + cos(pi * (t - W) / (T - W))) / 2``).
    """
    warm = min(int(config.warmup_steps), total_steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    span = max(total_steps - warm, 1)
    t = step - warm
    if config.lr_schedule == "linear":
        return config.lr * (span - t) / span
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * t / span))
    return config.lr


def state_slots(config: SubsetTrainConfig) -> int:
    """Optimizer-state tensors per parameter: 1 (SGD momentum buffer) or 2 (Adam)."""
    return 2 if config.optimizer == "adam" else 1


def init_optimizer_state(params: Sequence[Tensor], config: SubsetTrainConfig) -> list[Tensor]:
    """Zero optimizer state: ``state_slots(config)`` tensors per parameter, slot-major.

    Returns:
        ``[buf_1, ..., buf_P]`` (SGD) or ``[m_1, ..., m_P, v_1, ..., v_P]`` (Adam).
    """
    return [torch.zeros_like(p) for _ in range(state_slots(config)) for p in params]


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative at ``v = 0`` is 0 (not inf).

    Adam's second moment is exactly 0 for a parameter that never had a gradient; its
    derivative there multiplies a zero gradient, so 0 is the right value.
    """
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def optimizer_update(
    params: Sequence[Tensor],
    state: Sequence[Tensor],
    grads: Sequence[Tensor],
    step: int,
    lr: float,
    config: SubsetTrainConfig,
) -> tuple[list[Tensor], list[Tensor]]:
    """One out-of-place optimizer step (differentiable in params, state and grads).

    SGD (``torch.optim.SGD``, dampening 0): ``d = g + wd * p``; ``buf = mu * buf + d``;
    ``p = p - lr * buf``. Adam (``torch.optim.Adam``, L2 weight decay):
    ``d = g + wd * p``; ``m = b1 m + (1 - b1) d``; ``v = b2 v + (1 - b2) d^2``;
    ``p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with ``t = step + 1``.

    Args:
        params: ``P`` parameter tensors.
        state: optimizer state (see :func:`init_optimizer_state`).
        grads: ``P`` loss gradients, shaped like ``params``.
        step: 0-based step index (Adam's bias correction).
        lr: learning rate of this step.
        config: the optimizer settings (``optimizer``, ``momentum``, ``weight_decay``,
            ``betas``, ``eps``).

    Returns:
        ``(new_params, new_state)``.
    """
    wd = config.weight_decay
    n = len(params)
    d = [g + wd * p if wd else g for p, g in zip(params, grads, strict=True)]
    if config.optimizer == "adam":
        b1, b2 = config.betas
        t = step + 1
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        m = [b1 * mi + (1.0 - b1) * di for mi, di in zip(state[:n], d, strict=True)]
        v = [b2 * vi + (1.0 - b2) * di * di for vi, di in zip(state[n:], d, strict=True)]
        new = [
            p - (lr / bc1) * mi / (_safe_sqrt(vi) / math.sqrt(bc2) + config.eps)
            for p, mi, vi in zip(params, m, v, strict=True)
        ]
        return new, m + v
    mu = config.momentum
    buf = [mu * b + di if mu else di for b, di in zip(state, d, strict=True)]
    new = [p - lr * b for p, b in zip(params, buf, strict=True)]
    return new, buf
