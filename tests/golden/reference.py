"""Brute-force references for the golden entries that have a closed form.

Per-sample gradients by a Python loop of ``torch.autograd.grad``, the Hessian of the
mean training loss by ``torch.autograd.functional.hessian`` on the flat parameter
vector, inverses by ``torch.linalg.solve`` / ``eigh`` in float64: nothing of
``dattri`` is used, so a golden file that agrees with these is right, not only frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tests.golden.cases import (
    DVEMB_BS,
    DVEMB_LR,
    LISSA_REG,
    N_TRAIN,
    TRACIN_LRS,
    WD,
    GoldenProblem,
    margin_sample,
)


def _unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, s = {}, 0
    for n, p in model.named_parameters():
        out[n] = theta[s : s + p.numel()].view_as(p)
        s += p.numel()
    return out


def _flat(state: dict[str, Tensor], model: nn.Module) -> Tensor:
    return torch.cat([state[n].reshape(-1) for n, _ in model.named_parameters()])


def ce_grads(pb: GoldenProblem, x: Tensor, y: Tensor, state: dict | None = None) -> Tensor:
    """Per-sample gradients of the cross-entropy, ``(n, p)``."""
    model = pb.model()
    theta = _flat(pb.params if state is None else state, model)
    rows = []
    for i in range(len(x)):
        t = theta.clone().requires_grad_(True)
        out = functional_call(model, _unflatten(model, t), (x[i : i + 1],))
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, y[i : i + 1]), t)
        rows.append(g)
    return torch.stack(rows)


def margin_grads(pb: GoldenProblem, x: Tensor, y: Tensor, state: dict) -> Tensor:
    """Per-sample gradients of TRAK's margin ``log p - log(1 - p)``, ``(n, p)``."""
    model = pb.model()
    theta = _flat(state, model)
    margin = margin_sample(model)
    rows = []
    for i in range(len(x)):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(margin(_unflatten(model, t), (x[i], y[i])), t)
        rows.append(g)
    return torch.stack(rows)


def hessian(pb: GoldenProblem) -> Tensor:
    """Hessian of the mean training cross-entropy (no L2 term), ``(p, p)``."""
    model = pb.model()

    def f(theta: Tensor) -> Tensor:
        out = functional_call(model, _unflatten(model, theta), (pb.x_train,))
        return nn.functional.cross_entropy(out, pb.y_train)

    return torch.autograd.functional.hessian(f, _flat(pb.params, model))


def influence(pb: GoldenProblem, reg: float = WD) -> dict[str, Tensor]:
    """``G_tr (H + reg I)^-1 G_te^T`` and its pieces (exact influence functions)."""
    g_tr = ce_grads(pb, pb.x_train, pb.y_train)
    g_te = ce_grads(pb, pb.x_test, pb.y_test)
    mat = hessian(pb) + reg * torch.eye(g_tr.shape[1], dtype=torch.float64)
    ihvp_tr = torch.linalg.solve(mat, g_tr.T).T  # (n, p)
    scores = ihvp_tr @ g_te.T
    self_scores = (ihvp_tr * g_tr).sum(1)
    return {
        "scores": scores,
        "self": self_scores,
        "relatif_l": scores / self_scores.abs().sqrt()[:, None],
        "relatif_l_self": self_scores / self_scores.abs().sqrt(),
        "relatif_theta": scores / ihvp_tr.norm(dim=1)[:, None],
        "relatif_theta_self": self_scores / ihvp_tr.norm(dim=1),
        "g_tr": g_tr,
        "g_te": g_te,
        "mat": mat,
    }


def arnoldi_truncated(ref: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Scores in the top-``rank`` eigenspace of ``H + WD I`` (what Arnoldi targets)."""
    evals, evecs = torch.linalg.eigh(ref["mat"])
    top = evals.abs().argsort(descending=True)[:rank]
    u, lam = evecs[:, top], evals[top]
    a, b = ref["g_tr"] @ u, ref["g_te"] @ u
    return {"scores": (a / lam) @ b.T, "self": (a * a / lam).sum(1)}


def grad_dot(pb: GoldenProblem, weights: tuple, normalized: bool = False) -> dict[str, Tensor]:
    """``sum_k w_k <g_k(z_i), g_k(z_j)>`` (cosine if ``normalized``) over the checkpoints."""
    scores = self_scores = 0
    for w, state in zip(weights, pb.checkpoints):
        a = ce_grads(pb, pb.x_train, pb.y_train, state)
        b = ce_grads(pb, pb.x_test, pb.y_test, state)
        if normalized:
            a = a / a.norm(dim=1, keepdim=True)
            b = b / b.norm(dim=1, keepdim=True)
        scores = scores + w * a @ b.T
        self_scores = self_scores + w * (a * a).sum(1)
    return {"scores": scores, "self": self_scores}


def trak_identity(pb: GoldenProblem, reg_factor: float = 0.1) -> dict[str, Tensor]:
    """One-checkpoint TRAK without projection, automatic regularization.

    ``Q_i Phi_i (Phi^T Phi + lambda I)^-1 phi_j``, ``Phi`` = margin gradients /
    ``sqrt(p)``, ``Q = 1 - p(correct)``, ``lambda = 0.1 tr(Phi^T Phi) / min(n, p)``.
    """
    state = pb.checkpoints[0]
    p = pb.num_params
    big = margin_grads(pb, pb.x_train, pb.y_train, state) / p**0.5
    small = margin_grads(pb, pb.x_test, pb.y_test, state) / p**0.5
    kernel = big.T @ big
    lam = reg_factor * float(kernel.trace()) / min(big.shape[0], p)
    inv = torch.linalg.inv(kernel + lam * torch.eye(p, dtype=torch.float64))
    with torch.no_grad():
        prob = torch.softmax(pb.model(state)(pb.x_train), 1).gather(1, pb.y_train[:, None])[:, 0]
    q = 1 - prob
    return {
        "scores": q[:, None] * (big @ inv @ small.T),
        "self": q * (big @ inv @ big.T).diagonal(),
    }


def knn_shapley(pb: GoldenProblem, k: int) -> dict[str, Tensor]:
    """Exact KNN-Shapley values by Jia et al.'s recursion, one test point at a time.

    Sorting the training points by Euclidean distance (stable: the earlier sample is
    nearer on ties), ``s_N = 1[y_N = y] / N`` and
    ``s_i = s_{i+1} + (1[y_i = y] - 1[y_{i+1} = y]) / K * min(K, i) / i``.
    """

    def values(x_te: Tensor, y_te: Tensor) -> Tensor:
        n = len(pb.x_train)
        out = torch.zeros(len(x_te), n, dtype=torch.float64)
        for j in range(len(x_te)):
            dist = (pb.x_train - x_te[j]).norm(dim=1)
            order = torch.argsort(dist, stable=True).tolist()
            match = [float(pb.y_train[a] == y_te[j]) for a in order]
            s = [0.0] * n
            s[n - 1] = match[n - 1] / n
            for i in range(n - 2, -1, -1):  # 0-based i is the (i + 1)-th nearest
                s[i] = s[i + 1] + (match[i] - match[i + 1]) / k * min(k, i + 1) / (i + 1)
            for pos, a in enumerate(order):
                out[j, a] = s[pos]
        return out

    test = values(pb.x_test, pb.y_test)
    return {
        "scores": test.T,
        "attribute_test_train": test,
        "self": values(pb.x_train, pb.y_train).diagonal(),
    }


def dvemb(pb: GoldenProblem) -> dict[str, Tensor]:
    """Data value embeddings by the explicit unrolled product over the SGD steps.

    Replays the stored SGD run (``theta -= lr * mean_i g_i``) and forms
    ``emb_{t,i} = eta_t (I - eta_{T-1} H_{T-1}) ... (I - eta_{t+1} H_{t+1}) g_{t,i}``
    with ``eta_t = lr / |B_t|`` and ``H_s = sum_j g_{s,j} g_{s,j}^T`` as dense matrices.
    """
    model = pb.model()
    theta = _flat(pb.init, model)
    steps = []
    for epoch in range(pb.schedule.shape[0]):
        perm = pb.schedule[epoch]
        for s in range(0, N_TRAIN, DVEMB_BS):
            idx = perm[s : s + DVEMB_BS]
            state = _unflatten(model, theta)
            g = ce_grads(pb, pb.x_train[idx], pb.y_train[idx], state)
            steps.append((epoch, idx, DVEMB_LR / len(idx), g))
            theta = theta - DVEMB_LR * g.mean(0)
    p = theta.numel()
    prod = torch.eye(p, dtype=torch.float64)
    emb = torch.zeros(pb.schedule.shape[0], N_TRAIN, p, dtype=torch.float64)
    for epoch, idx, eta, g in reversed(steps):
        emb[epoch, idx] += eta * g @ prod.T
        prod = prod @ (torch.eye(p, dtype=torch.float64) - eta * g.T @ g)
    final = _unflatten(model, theta)
    g_te = ce_grads(pb, pb.x_test, pb.y_test, final)
    g_tr = ce_grads(pb, pb.x_train, pb.y_train, final)
    total = emb.sum(0)
    return {
        "scores": total @ g_te.T,
        "scores_epoch0": emb[0] @ g_te.T,
        "self": (total * g_tr).sum(1),
    }


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` (the golden comparison's measure)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def closed_forms(problems: dict[str, GoldenProblem]) -> dict[str, tuple[dict, float]]:
    """``entry -> (reference outputs, tolerance of the method against them)``.

    Tolerances (``max |method - reference| / max |reference|``): exact methods 1e-9
    (float64 rounding only). CG: its ``tol=1e-6`` relative residual times
    ``cond(H + WD I)`` (~1e2 here), 1e-4. LiSSA (damping ``LISSA_REG``): the full-batch
    recursion contracts by ``1 - lambda_min / scaling`` <= 0.85 a step, to < 1e-7 in its
    100 steps (1e-6); the mini-batch one (20
    samples a step) is a noisy estimate (~0.3 here), checked to 0.5 so that a wrong
    scale or sign still fails. Arnoldi with all ``p`` directions is exact; truncated
    Arnoldi is compared with the exact top-30 eigenspace of ``H + WD I`` (1e-6).
    KNN-Shapley (exact recursion) 1e-12; DVEmb (unrolled products, no projection) 1e-9.
    """
    inf = {k: influence(pb) for k, pb in problems.items()}
    out: dict[str, tuple[dict, float]] = {}
    for k in ("lr", "mlp"):
        ref = inf[k]
        exact = {"scores": ref["scores"], "self": ref["self"]}
        out[f"if_explicit_{k}"] = (exact, 1e-9)
        out[f"if_cg_{k}"] = (exact, 1e-4)
        lissa = influence(problems[k], LISSA_REG)
        lissa = {"scores": lissa["scores"], "self": lissa["self"]}
        out[f"if_lissa_{k}"] = (lissa, 1e-6)
        out[f"if_lissa_minibatch_{k}"] = (lissa, 0.5)
        for norm in ("l", "theta"):
            out[f"relatif_{norm}_{k}"] = (
                {"scores": ref[f"relatif_{norm}"], "self": ref[f"relatif_{norm}_self"]},
                1e-9,
            )
        out[f"grad_dot_{k}"] = (grad_dot(problems[k], (1.0,)), 1e-9)
    out["if_arnoldi_lr"] = ({"scores": inf["lr"]["scores"], "self": inf["lr"]["self"]}, 1e-6)
    out["if_arnoldi_mlp"] = (arnoldi_truncated(inf["mlp"], 30), 1e-6)
    out["grad_cos_mlp"] = (grad_dot(problems["mlp"], (1.0,), normalized=True), 1e-9)
    out["tracin_identity_lr"] = (grad_dot(problems["lr"], TRACIN_LRS), 1e-9)
    out["trak1_lr"] = (trak_identity(problems["lr"]), 1e-9)
    out["knn_shapley_lr"] = (knn_shapley(problems["lr"], 5), 1e-12)
    out["dvemb_mlp"] = (dvemb(problems["mlp"]), 1e-9)
    return out
