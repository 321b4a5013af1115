"""Tests for dattri.func.fisher: empirical-Fisher IFVP, EK-FAC and DataInf."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dattri.func.fisher import (
    IFVPUsageError,
    datainf_regularization,
    ekfac_eigenvalues,
    ekfac_ifvp,
    estimate_covariance,
    estimate_eigenvector,
    estimate_lambda,
    ifvp_at_x_explicit,
    ifvp_datainf,
    ifvp_explicit,
    kfac_factors,
    linear_grad_to_matrix,
    linear_layer_cache,
    matrix_to_linear_grad,
)

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def loop_grads(per_sample_loss, theta, n):
    """Exact per-sample gradients by a Python loop of torch.autograd.grad."""
    rows = []
    for i in range(n):
        t = theta.detach().clone().requires_grad_(True)
        rows.append(torch.autograd.grad(per_sample_loss(t)[i], t)[0].reshape(-1))
    return torch.stack(rows)


# ----------------------------------------------------------------- empirical Fisher
def lr_losses(w, X, y):
    return F.binary_cross_entropy_with_logits(X @ w, y, reduction="none")


def mlp_losses(theta, X, y):
    W1 = theta[:24].reshape(6, 4)
    W2 = theta[24:].reshape(3, 6)
    return F.cross_entropy(torch.tanh(X @ W1.T) @ W2.T, y, reduction="none")


@pytest.mark.parametrize(("case", "reg"), [("lr", 0.0), ("lr", 0.1), ("mlp", 0.1)])
def test_ifvp_explicit_matches_fisher_solve(case, reg):
    g = gen(0)
    if case == "lr":  # n = 40 >= p = 5: dense Cholesky path
        X, theta = torch.randn(40, 5, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
        y = (torch.rand(40, generator=g) > 0.5).to(DT)
        func = lr_losses
    else:  # n = 12 < p = 42: Woodbury path
        X, theta = torch.randn(12, 4, generator=g, dtype=DT), torch.randn(42, generator=g, dtype=DT)
        y = torch.randint(0, 3, (12,), generator=g)
        func = mlp_losses
    n, p = X.shape[0], theta.numel()
    G = loop_grads(lambda t: func(t, X, y), theta, n)
    fisher = sum(torch.outer(G[i], G[i]) for i in range(n)) / n
    V = torch.randn(3, p, generator=g, dtype=DT)
    expect = torch.linalg.solve(fisher + reg * torch.eye(p, dtype=DT), V.T).T
    f = ifvp_at_x_explicit(func, theta, X, y, regularization=reg)
    assert rel_err(f(V), expect) < 1e-8
    assert rel_err(f(V[0]), expect[0]) < 1e-8
    assert torch.allclose(torch.stack([f(v) for v in V]), f(V), rtol=1e-10, atol=1e-12)
    assert rel_err(ifvp_explicit(func, regularization=reg)((theta, X, y), V), expect) < 1e-8


def test_ifvp_scalar_func_is_rank_one_fisher():
    g = gen(1)
    X, y = torch.randn(20, 5, generator=g, dtype=DT), torch.ones(20, dtype=DT)
    w = torch.randn(5, generator=g, dtype=DT)

    def mean_loss(w_):
        return lr_losses(w_, X, y).mean()

    grad = torch.autograd.functional.jacobian(mean_loss, w)
    V = torch.randn(2, 5, generator=g, dtype=DT)
    expect = torch.linalg.solve(torch.outer(grad, grad) + 0.5 * torch.eye(5, dtype=DT), V.T).T
    assert rel_err(ifvp_at_x_explicit(mean_loss, w, regularization=0.5)(V), expect) < 1e-10


def test_ifvp_explicit_errors():
    g = gen(2)
    X, y = torch.randn(3, 5, generator=g, dtype=DT), torch.ones(3, dtype=DT)
    w = torch.randn(5, generator=g, dtype=DT)
    with pytest.raises(IFVPUsageError, match="singular"):
        ifvp_at_x_explicit(lr_losses, w, X, y)  # rank 3 < p = 5, no regularization
    with pytest.raises(IFVPUsageError, match="argnums"):
        ifvp_at_x_explicit(lr_losses, w, X, y, argnums=3)
    with pytest.raises(IFVPUsageError, match="regularization"):
        ifvp_explicit(lr_losses, regularization=-1.0)
    with pytest.raises(IFVPUsageError, match="per-sample"):
        ifvp_at_x_explicit(lambda w_: torch.outer(w_, w_), w, regularization=1.0)
    f = ifvp_at_x_explicit(lr_losses, w, X, y, regularization=1.0)
    with pytest.raises(IFVPUsageError, match="shape"):
        f(torch.ones(4, dtype=DT))
    with pytest.raises(IFVPUsageError, match="NaN or inf"):
        f(torch.tensor([math.nan, 0, 0, 0, 0], dtype=DT))
    with pytest.raises(IFVPUsageError, match="NaN or inf"):
        ifvp_at_x_explicit(lambda w_: torch.sqrt(w_ - 10), w, regularization=1.0)


# ----------------------------------------------------------------- EK-FAC, pure functions
def explicit_fisher(a, ds, bias):
    """Exact empirical Fisher of one Linear layer (row-major vec of [W | b])."""
    if bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    G = torch.einsum("...o,...i->...oi", ds, a)
    if G.dim() == 4:
        G = G.sum(1)  # per-sample gradient = sum over tokens
    G = G.reshape(G.shape[0], -1)
    return G.T @ G / G.shape[0], G


def ekfac_parts(a, ds, bias):
    A, S = kfac_factors(a, ds, bias=bias)
    q_a, q_s = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
    return q_a, q_s, ekfac_eigenvalues(a, ds, q_a, q_s, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_ekfac_single_sample_is_exact(bias):
    """One sample, 2-D input: G = ds aᵀ is rank one, A = a aᵀ, S = ds dsᵀ.

    The top eigenvectors are a/|a| and ds/|ds|, so Q_Sᵀ G Q_A has a single non-zero entry
    and F = vec G vec Gᵀ is diagonal in the basis K = Q_S ⊗ Q_A with exactly Λ on the
    diagonal. Hence F̂ = F and (F̂ + δI)^{-1} V = (F + δI)^{-1} V for every δ > 0.
    """
    g = gen(3)
    a, ds = torch.randn(1, 4, generator=g, dtype=DT), torch.randn(1, 3, generator=g, dtype=DT)
    q_a, q_s, lam = ekfac_parts(a, ds, bias)
    fisher, _ = explicit_fisher(a, ds, bias)
    K = torch.kron(q_s, q_a)
    assert torch.allclose(K @ torch.diag(lam.flatten()) @ K.T, fisher, atol=1e-12)
    V = torch.randn(5, 3, 4 + bias, generator=g, dtype=DT)
    for damping in (1e-3, 0.5):
        expect = torch.linalg.solve(
            fisher + damping * torch.eye(fisher.shape[0], dtype=DT), V.reshape(5, -1).T
        ).T
        assert rel_err(ekfac_ifvp(V, q_a, q_s, lam, damping).reshape(5, -1), expect) < 1e-8


@pytest.mark.parametrize("tokens", [None, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_ekfac_many_samples(bias, tokens):
    """Λ equals the diagonal of F in the basis K (exact for any data); under the K-FAC
    assumption (a independent of ds) the IFVP correlates > 0.95 with the exact one."""
    g = gen(4)
    B, d_in, d_out = 600, 5, 3
    shape = (B,) if tokens is None else (B, tokens)
    a = (
        torch.randn(*shape, d_in, generator=g, dtype=DT)
        @ torch.randn(d_in, d_in, generator=g, dtype=DT)
        + 0.5
    )
    ds = torch.randn(*shape, d_out, generator=g, dtype=DT) @ torch.randn(
        d_out, d_out, generator=g, dtype=DT
    )
    q_a, q_s, lam = ekfac_parts(a, ds, bias)
    fisher, G = explicit_fisher(a, ds, bias)
    K = torch.kron(q_s, q_a)
    assert torch.allclose(torch.diagonal(K.T @ fisher @ K), lam.flatten(), rtol=1e-9, atol=1e-12)
    damping = 1e-2 * float(torch.diagonal(fisher).mean())
    V = G[:40]
    expect = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=DT), V.T).T
    out = ekfac_ifvp(V.reshape(40, d_out, -1), q_a, q_s, lam, damping).reshape(40, -1)
    assert corr(out, expect) > 0.95


def test_ekfac_mask_and_errors():
    g = gen(5)
    a, ds = torch.randn(4, 6, 3, generator=g, dtype=DT), torch.randn(4, 6, 2, generator=g, dtype=DT)
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    A, S = kfac_factors(a, ds, mask=mask)
    A2, S2 = kfac_factors(a[:, :4], ds[:, :4])
    assert torch.allclose(A, A2) and torch.allclose(S, S2)
    with pytest.raises(IFVPUsageError, match="mask"):
        kfac_factors(a, ds, mask=torch.ones(4, 5))
    with pytest.raises(IFVPUsageError, match="matching"):
        kfac_factors(a, ds[:3])
    q_a, q_s = torch.eye(3, dtype=DT), torch.eye(2, dtype=DT)
    lam = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(IFVPUsageError, match="damping"):
        ekfac_ifvp(torch.ones(2, 3, dtype=DT), q_a, q_s, lam)
    with pytest.raises(IFVPUsageError, match="trailing shape"):
        ekfac_ifvp(torch.ones(3, 2, dtype=DT), q_a, q_s, lam, 1.0)
    with pytest.raises(IFVPUsageError, match="damping"):
        ekfac_ifvp(torch.ones(2, 3, dtype=DT), q_a, q_s, lam, -1.0)


def test_linear_grad_packing_matches_parameter_layout():
    g = gen(6)
    W, b = torch.randn(7, 3, 4, generator=g), torch.randn(7, 3, generator=g)
    M = linear_grad_to_matrix(W, b)
    assert M.shape == (7, 3, 5)
    assert torch.equal(M[:, 1, :4], W[:, 1]) and torch.equal(M[:, :, 4], b)
    assert torch.equal(linear_grad_to_matrix(W.reshape(7, 12), b), M)
    assert torch.equal(linear_grad_to_matrix(W.reshape(7, 12), d_out=3), W)
    W2, b2 = matrix_to_linear_grad(M, bias=True)
    assert torch.equal(W2, W) and torch.equal(b2, b)
    with pytest.raises(IFVPUsageError, match="d_out"):
        linear_grad_to_matrix(W.reshape(7, 12))


# ----------------------------------------------------------------- EK-FAC, loader pipeline
class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3, bias=False)

    def forward(self, x):  # works for (B, d) and (B, T, d)
        return self.fc2(torch.tanh(self.fc1(x)))


def per_sample_losses(model, x, y):
    out = model(x)
    if out.dim() == 3:  # sequence: per-sample loss = sum over tokens
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("tokens", [None, 3])
def test_estimate_pipeline_matches_exact_per_sample_grads(tokens):
    torch.manual_seed(0)
    model = SeqModel().to(DT)
    g = gen(7)
    n = 24
    x = (
        torch.randn(n, 4, generator=g, dtype=DT)
        if tokens is None
        else torch.randn(n, tokens, 4, generator=g, dtype=DT)
    )
    y = torch.randint(0, 3, (n,) if tokens is None else (n, tokens), generator=g)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]

    def mean_loss(batch):
        return per_sample_losses(model, *batch).mean()

    with linear_layer_cache(model, ["fc1", "fc2"]) as cache:
        cov = estimate_covariance(mean_loss, loader, cache)
        eig = estimate_eigenvector(cov)
        lam = estimate_lambda(mean_loss, loader, eig, cache)
        cov2 = estimate_covariance(mean_loss, loader, cache, max_iter=1)
    assert not model.fc1._forward_hooks  # hooks removed
    # exact per-sample gradients (Python loop), packed as [W | b]
    exact = {}
    for name in ("fc1", "fc2"):
        mod = getattr(model, name)
        rows = []
        for i in range(n):
            loss = per_sample_losses(model, x[i : i + 1], y[i : i + 1])[0]
            params = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
            grads = torch.autograd.grad(loss, params)
            rows.append(
                linear_grad_to_matrix(grads[0][None], grads[1][None] if len(grads) > 1 else None)[0]
            )
        exact[name] = torch.stack(rows).reshape(n, -1)
    # layer-0 covariance is the input second moment (token sums, mean over samples)
    xa = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).reshape(-1, 5)
    assert torch.allclose(cov["fc1"][0], xa.T @ xa / n, atol=1e-12)
    xb = torch.cat([x[:8], torch.ones_like(x[:8, ..., :1])], dim=-1).reshape(-1, 5)
    assert torch.allclose(cov2["fc1"][0], xb.T @ xb / 8, atol=1e-12)
    if tokens is None:  # 2-D: the bias column of G_b is ds_b, so S = mean ds dsᵀ
        ds = exact["fc1"].reshape(n, 5, 5)[:, :, -1]
        assert torch.allclose(cov["fc1"][1], ds.T @ ds / n, atol=1e-12)
    for name, G in exact.items():
        q_a, q_s = eig[name]
        fisher = G.T @ G / n
        K = torch.kron(q_s, q_a)
        assert torch.allclose(
            torch.diagonal(K.T @ fisher @ K), lam[name].flatten(), rtol=1e-8, atol=1e-12
        )
        # EK-FAC is the best diagonal fit in basis K: never worse than K-FAC (S ⊗ A)
        A, S = cov[name]
        ekfac = K @ torch.diag(lam[name].flatten()) @ K.T
        assert (ekfac - fisher).norm() <= (torch.kron(S, A) - fisher).norm() + 1e-12


def test_layer_cache_errors():
    model = SeqModel()
    with pytest.raises(IFVPUsageError, match="nn.Linear"), linear_layer_cache(model, ["nope"]):
        pass
    with pytest.raises(IFVPUsageError, match="max_iter"):
        estimate_covariance(lambda b: b, [], {}, max_iter=0)
    with pytest.raises(IFVPUsageError, match="empty"):
        estimate_covariance(lambda b: b.sum(), [torch.ones(2)], {})


# ----------------------------------------------------------------- DataInf
def datainf_naive(G, v, r):
    """(1/n) Σ_i (g_i g_iᵀ + r I)^{-1} v with explicit matrix inverses."""
    n, p = G.shape
    inv = (
        sum(
            torch.linalg.inv(torch.outer(G[i], G[i]) + r * torch.eye(p, dtype=G.dtype))
            for i in range(n)
        )
        / n
    )
    return v @ inv.T


def test_datainf_matches_naive_closed_form():
    g = gen(8)
    layers = [torch.randn(9, 4, generator=g, dtype=DT), torch.randn(9, 6, generator=g, dtype=DT)]
    V = torch.randn(5, 10, generator=g, dtype=DT)
    out = ifvp_datainf(layers, V, regularization=0.3)
    expect = torch.cat(
        [datainf_naive(layers[0], V[:, :4], 0.3), datainf_naive(layers[1], V[:, 4:], 0.3)], 1
    )
    assert rel_err(out, expect) < 1e-10
    # per-layer list input/output, per-layer regularization, 1-D v
    regs = [0.2, 0.7]
    outs = ifvp_datainf(layers, [V[:, :4], V[:, 4:]], regularization=regs)
    assert isinstance(outs, list)
    assert rel_err(outs[1], datainf_naive(layers[1], V[:, 4:], 0.7)) < 1e-10
    assert rel_err(ifvp_datainf(layers, V[2], regs), ifvp_datainf(layers, V, regs)[2]) < 1e-12
    # single tensor = one layer; default regularization rule
    r = datainf_regularization(layers[1])
    assert r == pytest.approx(0.1 * float((layers[1] ** 2).sum(1).mean()) / 6)
    assert rel_err(ifvp_datainf(layers[1], V[:, 4:]), datainf_naive(layers[1], V[:, 4:], r)) < 1e-10
    zero = torch.zeros(3, 4, dtype=DT)
    assert torch.allclose(ifvp_datainf(zero, V[:, :4]), V[:, :4])  # fallback r = 1, no 0/0


def test_datainf_errors():
    G = torch.randn(5, 4, dtype=DT)
    with pytest.raises(IFVPUsageError, match="regularization"):
        ifvp_datainf(G, torch.ones(2, 4, dtype=DT), regularization=0.0)
    with pytest.raises(IFVPUsageError, match="regularization"):
        ifvp_datainf([G, G], torch.ones(2, 8, dtype=DT), regularization=[1.0])
    with pytest.raises(IFVPUsageError, match="shape"):
        ifvp_datainf(G, torch.ones(2, 5, dtype=DT))
    with pytest.raises(IFVPUsageError, match="sizes"):
        ifvp_datainf([G, G], [torch.ones(2, 4, dtype=DT), torch.ones(2, 3, dtype=DT)])
    with pytest.raises(IFVPUsageError, match="same"):
        ifvp_datainf([G, G[:3]], torch.ones(2, 8, dtype=DT))
    with pytest.raises(IFVPUsageError, match="train_grads"):
        ifvp_datainf([], torch.ones(2, 8, dtype=DT))


def test_pipeline_single_sample_layer_is_exact():
    """Loader with one sample, one Linear layer (with bias): EK-FAC inverse == exact."""
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])

    def mean_loss(batch):
        return F.cross_entropy(layer(batch[0]), batch[1])

    with linear_layer_cache(layer, [""]) as cache:
        eig = estimate_eigenvector(estimate_covariance(mean_loss, [(x, y)], cache))
        lam = estimate_lambda(mean_loss, [(x, y)], eig, cache)[""]
    gw, gb = torch.autograd.grad(mean_loss((x, y)), [layer.weight, layer.bias])
    g = linear_grad_to_matrix(gw[None], gb[None]).reshape(-1)
    fisher = torch.outer(g, g)
    V = torch.randn(6, 3, 5, generator=gen(9), dtype=DT)
    expect = torch.linalg.solve(fisher + 0.1 * torch.eye(15, dtype=DT), V.reshape(6, -1).T).T
    out = ekfac_ifvp(V, *eig[""], lam, damping=0.1).reshape(6, -1)
    assert rel_err(out, expect) < 1e-8


@pytest.mark.gpu
def test_fisher_on_cuda_match_cpu():
    assert torch.cuda.is_available(), "needs CUDA: run on the GPU machine with `pytest -m gpu`"
    g = gen(10)
    X, y = torch.randn(12, 4, generator=g, dtype=DT), torch.randint(0, 3, (12,), generator=g)
    theta = torch.randn(42, generator=g, dtype=DT)
    V = torch.randn(3, 42, generator=g, dtype=DT)
    cpu = ifvp_at_x_explicit(mlp_losses, theta, X, y, regularization=0.1)(V)
    gpu = ifvp_at_x_explicit(mlp_losses, theta.cuda(), X.cuda(), y.cuda(), regularization=0.1)
    assert torch.allclose(gpu(V.cuda()).cpu(), cpu, rtol=1e-8)
    layers = [torch.randn(9, 4, generator=g, dtype=DT), torch.randn(9, 6, generator=g, dtype=DT)]
    W = torch.randn(5, 10, generator=g, dtype=DT)
    out = ifvp_datainf([t.cuda() for t in layers], W.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), ifvp_datainf(layers, W), rtol=1e-10)
    torch.manual_seed(0)
    model = SeqModel().to(DT)
    x, yy = torch.randn(16, 3, 4, generator=g, dtype=DT), torch.randint(0, 3, (16, 3), generator=g)
    loader = [(x[:8], yy[:8]), (x[8:], yy[8:])]
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)

        def mean_loss(batch):
            return per_sample_losses(model, *batch).mean()

        with linear_layer_cache(model, ["fc1", "fc2"]) as cache:
            eig = estimate_eigenvector(estimate_covariance(mean_loss, loader, cache, device=device))
            results[device] = estimate_lambda(mean_loss, loader, eig, cache, device=device)
    for name in ("fc1", "fc2"):
        assert results["cuda"][name].device.type == "cuda"
        assert torch.allclose(
            results["cuda"][name].cpu(), results["cpu"][name], rtol=1e-6, atol=1e-10
        )
