"""The shared training step: optimizer_update == torch.optim, schedules, weighted loss."""

import math

import pytest
import torch

from dattri.model_util import SubsetTrainConfig
from dattri.model_util.train_step import (
    init_optimizer_state,
    lr_at,
    optimizer_update,
    weighted_mean_loss,
)


@pytest.mark.parametrize(
    ("kw", "make"),
    [
        (
            {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01},
            lambda ps, c: torch.optim.SGD(
                ps, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
            ),
        ),
        (
            {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0},
            lambda ps, c: torch.optim.SGD(ps, lr=c.lr),
        ),
        (
            {"optimizer": "adam", "weight_decay": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
            lambda ps, c: torch.optim.Adam(
                ps, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay
            ),
        ),
    ],
)
def test_optimizer_update_matches_torch_optim(kw, make):
    cfg = SubsetTrainConfig(lr=0.05, dtype=torch.float64, **kw)
    g = torch.Generator().manual_seed(0)
    init = [
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
    ]
    grads = [
        [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in init] for _ in range(5)
    ]
    grads[2][1].zero_()  # a zero gradient (Adam's second moment stays 0 for it at first)
    ref = [p.clone().requires_grad_(True) for p in init]
    opt = make(ref, cfg)
    params, state = [p.clone() for p in init], init_optimizer_state(init, cfg)
    for t, gs in enumerate(grads):
        for p, gi in zip(ref, gs, strict=True):
            p.grad = gi.clone()
        opt.step()
        params, state = optimizer_update(params, state, gs, t, cfg.lr, cfg)
        for a, b in zip(params, ref, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-15)


def test_lr_schedules():
    c = SubsetTrainConfig(lr=1.0, lr_schedule="linear", warmup_steps=2)
    assert [lr_at(c, t, 6) for t in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    c = SubsetTrainConfig(lr=2.0, lr_schedule="cosine")
    assert lr_at(c, 0, 4) == 2.0 and math.isclose(lr_at(c, 2, 4), 1.0)
    assert lr_at(SubsetTrainConfig(lr=0.3), 7, 10) == 0.3
    with pytest.raises(ValueError, match="lr_schedule"):
        SubsetTrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="optimizer"):
        SubsetTrainConfig(optimizer="lbfgs")


def test_weighted_mean_loss():
    per = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert weighted_mean_loss(per, w).tolist() == [2.5, 0.0]
