"""Helpers of the attributors: loader check, representer-point (RPS) fitting, DVEmb.

The RPS helpers keep the upstream names and argument order. Notation: ``x`` are the
features entering the last linear layer, ``(n, d)`` (append a column of ones to
represent a bias, see :class:`~dattri.algorithm.rps.RPSAttributor`); ``theta`` is the
layer weight ``(C, d)``; the pre-activations are ``phi = x theta^T``, ``(n, C)``.

The fine-tuning objective (Yeh et al., 2018, Representer Point Selection) is

``J(theta) = (1/n) sum_i l(phi_i, t_i) + lambda_l2 * ||theta||_F^2``

with ``l`` the per-sample loss given by the user's ``loss_func(logits, targets)``
evaluated on one sample at a time (so the mean/sum reduction of ``loss_func`` does not
matter) and ``t_i`` the pre-trained model's predicted probabilities (softmax, or
sigmoid for a single output). At a stationary point the representer theorem gives
exactly ``theta^T = sum_i x_i alpha_i`` with

``alpha_i = -1 / (2 lambda_l2 n) * dl(phi_i, t_i) / dphi_i``  (shape ``(C,)``),

so ``phi(x_test) = sum_i alpha_i <x_i, x_test>``. (Upstream divided by ``n`` twice.)

The DVEmb helpers :func:`dvemb_embeddings`, :func:`full_projector`,
:func:`dense_projection_matrix` and :func:`capture_layer_calls` live in
:mod:`dattri.algorithm.features.dvemb_embeddings` / ``dvemb_grads`` and are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from dattri.algorithm.features.dvemb_embeddings import dvemb_embeddings
from dattri.algorithm.features.dvemb_grads import (
    capture_layer_calls,
    dense_projection_matrix,
    full_projector,
)
from dattri.algorithm.runtime.batching import check_loader
from dattri.algorithm.runtime.validation import required_positional_args

__all__ = [
    "backtracking_line_search",
    "capture_layer_calls",
    "check_rps_settings",
    "dense_projection_matrix",
    "dvemb_embeddings",
    "full_projector",
    "get_rps_weight",
    "required_positional_args",
    "rps_alpha",
    "rps_corr_check",
    "rps_finetune_model",
    "rps_finetune_theta",
    "rps_per_sample_loss",
    "rps_targets",
]

RPS_SOLVERS = ("lbfgs", "gd")


def check_rps_settings(lambda_l2: Any, num_epoch: Any, solver: str) -> None:
    """Validate the settings of the RPS fit.

    Args:
        lambda_l2: the L2 strength (``l2_strength``), ``> 0``.
        num_epoch: maximum iterations (``epoch``), a positive int.
        solver: one of :data:`RPS_SOLVERS`.

    Raises:
        ValueError: naming the bad setting.
    """
    if isinstance(lambda_l2, bool) or not isinstance(lambda_l2, (int, float)) or not lambda_l2 > 0:
        msg = (
            f"l2_strength (lambda_l2) must be a positive number for the representer theorem, "
            f"got {lambda_l2!r}."
        )
        raise ValueError(msg)
    if isinstance(num_epoch, bool) or not isinstance(num_epoch, int) or num_epoch < 1:
        msg = f"epoch (num_epoch) must be a positive int, got {num_epoch!r}."
        raise ValueError(msg)
    if solver not in RPS_SOLVERS:
        msg = f"solver must be one of {RPS_SOLVERS}, got {solver!r}."
        raise ValueError(msg)


def _check_shuffle(dataloader: Iterable) -> None:
    """Warn if a loader shuffles.

    Delegates to :func:`~dattri.algorithm.runtime.batching.check_loader`.

    Args:
        dataloader: the loader to check.
    """
    check_loader(dataloader, "dataloader")


def rps_targets(outputs: Tensor) -> Tensor:
    """Soft targets of the fine-tuning: probabilities predicted by the model.

    Args:
        outputs: ``(n, C)`` raw model outputs (logits).

    Returns:
        ``(n, C)``: ``sigmoid`` if ``C == 1`` else ``softmax`` over classes.
    """
    return torch.sigmoid(outputs) if outputs.shape[1] == 1 else torch.softmax(outputs, dim=1)


def rps_per_sample_loss(loss_func: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """Turn ``loss_func(logits, targets)`` into a per-sample loss vector function.

    Args:
        loss_func: ``L(logits (B, C), targets (B, C)) -> scalar`` (e.g. cross-entropy
            with probability targets, or BCE-with-logits); it must be usable under
            :func:`torch.func.vmap` (all ``torch.nn.functional`` losses are).

    Returns:
        ``f(phi (n, C), targets (n, C)) -> (n,)`` with ``f[i] = L(phi[i:i+1], t[i:i+1])``.
    """

    def one(p: Tensor, t: Tensor) -> Tensor:
        return loss_func(p.unsqueeze(0), t.unsqueeze(0)).reshape(())

    return torch.func.vmap(one)


def rps_finetune_model(x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Pre-activations and squared Frobenius norm of a last-layer weight.

    Args:
        x: ``(n, d)`` features.
        theta: ``(C, d)`` weight.

    Returns:
        ``(phi, l2)``: ``phi = x theta^T`` of shape ``(n, C)`` and ``||theta||_F^2``.
    """
    return x @ theta.T, (theta * theta).sum()


def _objective(
    theta: Tensor, x: Tensor, targets: Tensor, mean_loss: Callable, lam: float
) -> Tensor:
    phi, l2 = rps_finetune_model(x, theta)
    return mean_loss(phi, targets) + lam * l2


def backtracking_line_search(
    theta: Tensor,
    grad_theta: Tensor,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    val: float | Tensor,
    lambda_l2: float,
    *,
    step: float = 10.0,
    beta: float = 0.5,
    min_step: float = 1e-10,
) -> Tensor:
    """One gradient step with an Armijo backtracking line search.

    Finds the largest ``t = step * beta^j`` with
    ``J(theta - t g) <= J(theta) - t/2 ||g||^2`` where
    ``J(theta) = loss_func(x theta^T, y) + lambda_l2 ||theta||^2``.

    Args:
        theta: ``(C, d)`` current weight.
        grad_theta: ``(C, d)`` gradient of ``J`` at ``theta``.
        loss_func: the data term ``f(phi (n, C), y) -> scalar``.
        x: ``(n, d)`` features.
        y: targets passed to ``loss_func``.
        val: ``J(theta)``.
        lambda_l2: L2 strength.
        step: initial step size.
        beta: shrink factor in ``(0, 1)``.
        min_step: smallest step tried; it is returned if no step satisfies Armijo.

    Returns:
        The new weight ``theta - t g`` (detached).
    """
    theta, g = theta.detach(), grad_theta.detach()
    val = float(val.detach()) if isinstance(val, Tensor) else float(val)
    g2 = float((g * g).sum())
    t = step
    with torch.no_grad():
        while True:
            cand = theta - t * g
            if (
                t <= min_step
                or float(_objective(cand, x, y, loss_func, lambda_l2)) <= val - t * g2 / 2
            ):
                return cand
            t *= beta


def rps_finetune_theta(
    x: Tensor,
    y: Tensor,
    init_theta: Tensor,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    lambda_l2: float,
    num_epoch: int,
    device: str | torch.device = "cpu",
    *,
    solver: str = "lbfgs",
    tol: float | None = None,
) -> Tensor:
    """Fit the last layer with L2 regularisation (the RPS fine-tuning).

    Minimises ``J(theta) = (1/n) sum_i l(x_i theta^T, t_i) + lambda_l2 ||theta||^2``
    (strictly convex for the usual losses) with ``t = rps_targets(y)``.

    Args:
        x: ``(n, d)`` features (append a ones column for a bias).
        y: ``(n, C)`` raw outputs of the pre-trained model (logits).
        init_theta: ``(C, d)`` starting weight (the pre-trained layer).
        loss_func: ``L(logits, targets) -> scalar``, see :func:`rps_per_sample_loss`.
        lambda_l2: L2 strength ``> 0``.
        num_epoch: maximum number of iterations.
        device: device of the computation.
        solver: ``"lbfgs"`` (full-batch L-BFGS, ``scipy.optimize.minimize`` with
            ``method="L-BFGS-B"`` on the torch objective and gradient, default) or
            ``"gd"`` (gradient descent with :func:`backtracking_line_search`).
        tol: stop when the largest absolute gradient entry is below ``tol`` (default
            ``1e-10`` in float64, ``1e-6`` in float32).

    Returns:
        ``(C, d)`` fine-tuned weight in the dtype of ``x`` (for ``"gd"``: the iterate
        with the smallest gradient).

    Raises:
        ValueError: for a non-positive ``lambda_l2``/``num_epoch``, an unknown solver
            or mismatched shapes.
    """
    check_rps_settings(lambda_l2, num_epoch, solver)
    if x.ndim != 2 or y.ndim != 2 or init_theta.shape != (y.shape[1], x.shape[1]):
        msg = (
            f"Expected x (n, d), y (n, C), init_theta (C, d); got {tuple(x.shape)}, "
            f"{tuple(y.shape)}, {tuple(init_theta.shape)}."
        )
        raise ValueError(msg)
    dtype = x.dtype
    x = x.to(device)
    targets = rps_targets(y.to(device=device, dtype=dtype))
    per_sample = rps_per_sample_loss(loss_func)

    def mean_loss(phi: Tensor, t: Tensor) -> Tensor:
        return per_sample(phi, t).mean()

    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-6
    theta = init_theta.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)

    def value_and_grad(th: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            val = _objective(th, x, targets, mean_loss, lambda_l2)
            (g,) = torch.autograd.grad(val, th)
        return val.detach(), g

    if solver == "lbfgs":
        shape = theta.shape

        def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
            th = torch.as_tensor(flat, device=x.device).reshape(shape).to(dtype)
            val, g = value_and_grad(th.requires_grad_(True))
            return float(val), g.reshape(-1).double().cpu().numpy()

        res = scipy.optimize.minimize(
            fun,
            theta.detach().reshape(-1).double().cpu().numpy(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": num_epoch, "gtol": tol, "ftol": 0.0, "maxcor": 30},
        )
        return torch.as_tensor(res.x, device=x.device).reshape(shape).to(dtype)
    best, best_g = theta.detach(), float("inf")
    for it in range(num_epoch + 1):
        val, g = value_and_grad(theta)
        gmax = float(g.abs().max())
        if gmax < best_g:
            best, best_g = theta.detach(), gmax
        if gmax <= tol or it == num_epoch:
            break
        theta = backtracking_line_search(theta, g, mean_loss, x, targets, val, lambda_l2)
        theta.requires_grad_(True)
    return best


def rps_alpha(
    finetuned_theta: Tensor,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    x_train: Tensor,
    y_pred_train: Tensor,
    lambda_l2: float,
    n_train: int | None = None,
) -> Tensor:
    """Representer weights ``alpha`` of every training sample and class.

    Args:
        finetuned_theta: ``(C, d)`` fine-tuned weight.
        loss_func: ``L(logits, targets) -> scalar``.
        x_train: ``(n, d)`` training features (same transform as in the fit).
        y_pred_train: ``(n, C)`` raw pre-trained outputs of those samples.
        lambda_l2: L2 strength of the fit.
        n_train: number of samples in the fine-tuning objective (default ``n``).

    Returns:
        ``(n, C)``: ``alpha_i = -1/(2 lambda n_train) dl(phi_i, t_i)/dphi_i``.
    """
    n = x_train.shape[0] if n_train is None else n_train
    theta = finetuned_theta.detach().to(x_train)
    phi = (x_train @ theta.T).detach()
    targets = rps_targets(y_pred_train.to(x_train))

    with torch.enable_grad():
        phi.requires_grad_(True)
        # l_i depends on phi_i only, so d(sum_i l_i)/dphi stacks the per-sample gradients
        (dl,) = torch.autograd.grad(rps_per_sample_loss(loss_func)(phi, targets).sum(), phi)
    return dl / (-2.0 * lambda_l2 * n)


def get_rps_weight(
    finetuned_theta: Tensor,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    x_train: Tensor,
    y_pred_train: Tensor,
    y_test: Tensor | None,
    lambda_l2: float,
    *,
    n_train: int | None = None,
) -> Tensor:
    """Representer weights, picked by the test labels (upstream layout).

    The arguments are those of :func:`rps_alpha` (same names) plus ``y_test``, the
    ``(m,)`` integer test labels (None: all classes).

    Returns:
        Multi-class: ``(n, m)`` with entry ``[i, j] = alpha_i[y_test[j]]`` (``(n, C)``
        if ``y_test`` is None); single output: ``(n, 1)``.
    """
    alpha = rps_alpha(finetuned_theta, loss_func, x_train, y_pred_train, lambda_l2, n_train)
    if alpha.shape[1] == 1 or y_test is None:
        return alpha
    return alpha[:, y_test.to(alpha.device).long().reshape(-1)]


def rps_corr_check(
    rps_weight: Tensor, x: Tensor, y: Tensor, *, verbose: bool = True
) -> tuple[Tensor, Tensor]:
    """Sanity check: do the representer values reconstruct the pre-activations?

    ``phi_hat = (x x^T) alpha`` is compared per class with the reference ``y``.

    Args:
        rps_weight: ``(n, C)`` representer weights ``alpha`` (all classes).
        x: ``(n, d)`` the features used in the fit.
        y: ``(n, C)`` reference pre-activations (fine-tuned ``x theta^T``, or the
            model's own logits to see how well the fit matches the model).
        verbose: print the result.

    Returns:
        ``(l1, corr)``: per-class mean absolute difference and Pearson correlation,
        both ``(C,)``.
    """
    phi_hat = (x @ x.T) @ rps_weight.to(x)
    y = y.to(phi_hat)
    l1 = (phi_hat - y).abs().mean(dim=0)
    a = phi_hat - phi_hat.mean(dim=0)
    b = y - y.mean(dim=0)
    corr = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))
    if verbose:
        print(f"RPS reconstruction per class: mean |diff| {l1.tolist()}, pearson {corr.tolist()}")
    return l1, corr
