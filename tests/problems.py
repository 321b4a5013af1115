"""Tiny reference problems shared by the tests (importable as ``tests.problems``).

``digits_lr(...)``: L2-regularised multinomial logistic regression on scikit-learn's
bundled digits, trained to convergence (L-BFGS, float64 by default).
``random_mlp(...)``: a small 2-layer MLP on random data.

Each returns a :class:`Problem` with the model, tensors, loaders and loss functions in
both per-sample conventions:

* ``loss_if(params, (x, y))``: the IF convention, sample seen as ``(1, ...)``; also works
  on whole batches (mean loss + L2 term).
* ``loss_sample(params, (x, y))``: the TRAK/TracIn convention, un-batched sample.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class Problem:
    model: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    weight_decay: float
    loss_if: Callable
    loss_sample: Callable
    loss_if_nowd: Callable

    def train_loader(self, batch_size: int = 32) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=batch_size)

    def test_loader(self, batch_size: int = 16) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=batch_size)

    def flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])


def _make_losses(model: nn.Module, weight_decay: float) -> tuple[Callable, Callable, Callable]:
    def l2(params: dict) -> Tensor:
        return 0.5 * weight_decay * sum((p**2).sum() for p in params.values())

    def loss_if(params: dict, data: tuple) -> Tensor:
        x, y = data
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y) + l2(params)

    def loss_if_nowd(params: dict, data: tuple) -> Tensor:
        x, y = data
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y)

    def loss_sample(params: dict, data: tuple) -> Tensor:
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0)) + l2(params)

    return loss_if, loss_sample, loss_if_nowd


def train_lbfgs(
    model: nn.Module, x: Tensor, y: Tensor, weight_decay: float, max_iter: int = 500
) -> nn.Module:
    """Full-batch L-BFGS on mean cross-entropy + 0.5*wd*||theta||^2 to convergence."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def digits_lr(
    n_train: int = 100,
    n_test: int = 20,
    weight_decay: float = 1e-2,
    dtype: torch.dtype = torch.float64,
    n_classes: int = 10,
    seed: int = 0,
    train: bool = True,
) -> Problem:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x = torch.tensor(x, dtype=dtype)[perm] / 16.0
    y = torch.tensor(y, dtype=torch.long)[perm]
    if n_classes < 10:
        keep = y < n_classes
        x, y = x[keep], y[keep]
    torch.manual_seed(seed)
    model = nn.Linear(64, n_classes).to(dtype)
    xtr, ytr = x[:n_train], y[:n_train]
    xte, yte = x[n_train : n_train + n_test], y[n_train : n_train + n_test]
    if train:
        train_lbfgs(model, xtr, ytr, weight_decay)
    model.eval()
    losses = _make_losses(model, weight_decay)
    return Problem(model, xtr, ytr, xte, yte, weight_decay, *losses)


def random_mlp(
    n_train: int = 40,
    n_test: int = 10,
    d_in: int = 8,
    hidden: int = 16,
    n_classes: int = 3,
    weight_decay: float = 1e-2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    train: bool = True,
) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d_in, generator=g, dtype=dtype)
    w = torch.randn(d_in, n_classes, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n_train + n_test, n_classes, generator=g, dtype=dtype)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)).to(
        dtype
    )
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    if train:
        train_lbfgs(model, xtr, ytr, weight_decay, max_iter=100)
    model.eval()
    losses = _make_losses(model, weight_decay)
    return Problem(model, xtr, ytr, xte, yte, weight_decay, *losses)


@functools.lru_cache(maxsize=8)
def cached_digits_lr(**kwargs: object) -> Problem:
    """Memoised :func:`digits_lr` (tests must not modify the returned model)."""
    return digits_lr(**kwargs)


@functools.lru_cache(maxsize=8)
def cached_random_mlp(**kwargs: object) -> Problem:
    """Memoised :func:`random_mlp` (tests must not modify the returned model)."""
    return random_mlp(**kwargs)


def symmetric_with_eigenvalues(eigs: Tensor | list[float], seed: int = 0) -> Tensor:
    """``Q diag(eigs) Q^T`` (float64, exactly symmetric) with a seeded random orthogonal ``Q``."""
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    a = q @ torch.diag(eigs) @ q.T
    return 0.5 * (a + a.T)
