"""Tests for dattri.func.hessian (HVP / IHVP solvers) against explicit float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

import dattri.func.hessian as hess_mod
import dattri.func.ihvp as ihvp_mod
from dattri.func.hessian import (
    IHVPUsageError,
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)

DT = torch.float64


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------- problems
def lr_loss(w, X, y):
    return F.binary_cross_entropy_with_logits(X @ w, y)


@pytest.fixture(scope="module")
def lr():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=DT)
    y = (torch.rand(40, generator=g) > 0.5).to(DT)
    w = 0.1 * torch.randn(5, generator=g, dtype=DT)
    H = torch.autograd.functional.hessian(lambda w_: lr_loss(w_, X, y), w)
    return w, X, y, H


D_IN, D_H, D_OUT = 4, 6, 3
P_MLP = D_IN * D_H + D_H + D_H * D_OUT + D_OUT


def mlp_loss(theta, X, y):
    i = 0
    W1 = theta[i : i + D_IN * D_H].reshape(D_H, D_IN)
    i += D_IN * D_H
    b1 = theta[i : i + D_H]
    i += D_H
    W2 = theta[i : i + D_H * D_OUT].reshape(D_OUT, D_H)
    i += D_H * D_OUT
    b2 = theta[i:]
    return F.cross_entropy(torch.tanh(X @ W1.T + b1) @ W2.T + b2, y)


@pytest.fixture(scope="module")
def mlp():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, D_IN, generator=g, dtype=DT)
    y = torch.randint(0, D_OUT, (30,), generator=g)
    theta = 0.5 * torch.randn(P_MLP, generator=g, dtype=DT)
    H = torch.autograd.functional.hessian(lambda t: mlp_loss(t, X, y), theta)
    return theta, X, y, H


def ref_solve(H, v, lam):
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.solve(A, v.reshape(-1, H.shape[0]).T).T.reshape(v.shape)


def vecs(p, k=4, seed=3):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ----------------------------------------------------------------- HVP
@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("problem", ["lr", "mlp"])
def test_hvp_matches_autograd_hessian(problem, mode, request):
    x0, X, y, H = request.getfixturevalue(problem)
    loss = lr_loss if problem == "lr" else mlp_loss
    V = vecs(x0.numel())
    for reg in (0.0, 0.3):
        expect = V @ H.T + reg * V
        f = hvp_at_x(loss, (x0, X, y), mode=mode, regularization=reg)
        assert rel_err(f(V), expect) < 1e-6
        assert rel_err(f(V[1]), expect[1]) < 1e-6
        assert f(V[1]).shape == (x0.numel(),)
        g = hvp(loss, mode=mode, regularization=reg)
        assert rel_err(g((x0, X, y), V), expect) < 1e-6
        assert rel_err(g((x0, X, y), V[0]), expect[0]) < 1e-6


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_matrix_argument_and_other_argnums(mode):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(10, 4, generator=g, dtype=DT)
    W = torch.randn(3, 4, generator=g, dtype=DT)

    def f(X, W):
        return (torch.tanh(X @ W.T) ** 2).sum()

    H = torch.autograd.functional.hessian(lambda w: f(X, w), W).reshape(12, 12)
    V = torch.randn(5, 3, 4, generator=g, dtype=DT)
    h = hvp_at_x(f, (X, W), argnums=1, mode=mode)
    assert h(V).shape == (5, 3, 4)
    assert rel_err(h(V).reshape(5, 12), V.reshape(5, 12) @ H) < 1e-6
    assert rel_err(h(V[0]), (H @ V[0].reshape(12)).reshape(3, 4)) < 1e-6
    assert rel_err(h(V.reshape(5, 12)), V.reshape(5, 12) @ H) < 1e-6  # flat form
    h_neg = hvp_at_x(f, (X, W), argnums=-1, mode=mode)
    assert torch.allclose(h_neg(V), h(V))


def test_hvp_at_x_works_under_vmap_and_casts_dtype(lr):
    w, X, y, H = lr
    V = vecs(5)
    f = hvp_at_x(lr_loss, (w, X, y))
    assert rel_err(torch.func.vmap(f)(V), V @ H) < 1e-10
    out = hvp_at_x(lr_loss, (w.float(), X.float(), y.float()), mode="rev-fwd")(V)
    assert out.dtype == DT
    assert rel_err(out, V @ H) < 1e-5


# ----------------------------------------------------------------- explicit
@pytest.mark.parametrize("problem", ["lr", "mlp"])
def test_ihvp_explicit(problem, request):
    x0, X, y, H = request.getfixturevalue(problem)
    loss = lr_loss if problem == "lr" else mlp_loss
    V = vecs(x0.numel())
    lam = 0.05 if problem == "lr" else 1.0  # MLP: makes H + lam I positive definite
    expect = ref_solve(H, V, lam)
    f = ihvp_at_x_explicit(loss, x0, X, y, regularization=lam, chunk_size=7)
    assert rel_err(f(V), expect) < 1e-6
    assert rel_err(f(V[2]), expect[2]) < 1e-6
    assert rel_err(ihvp_explicit(loss, regularization=lam)((x0, X, y), V), expect) < 1e-6


def test_ihvp_explicit_factorises_once():
    calls = []

    def f(w, X, y):
        calls.append(1)
        return lr_loss(w, X, y)

    g = torch.Generator().manual_seed(4)
    w, X, y = (
        torch.randn(5, dtype=DT, generator=g),
        torch.randn(20, 5, dtype=DT),
        torch.ones(20, dtype=DT),
    )
    solver = ihvp_explicit(f, regularization=0.1)
    solver((w, X, y), vecs(5))
    n_build = len(calls)
    assert n_build > 0
    solver((w, X, y), vecs(5, seed=8))  # same x: no Hessian work
    assert len(calls) == n_build
    w.add_(0.1)  # in-place change is detected
    out = solver((w, X, y), vecs(5))
    assert len(calls) == 2 * n_build
    H = torch.autograd.functional.hessian(lambda w_: lr_loss(w_, X, y), w)
    assert rel_err(out, ref_solve(H, vecs(5), 0.1)) < 1e-8


def test_ihvp_explicit_indefinite_and_singular():
    g = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))[0]
    M = Q @ torch.diag(torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0], dtype=DT)) @ Q.T

    def quad(x):
        return 0.5 * x @ M @ x

    V = vecs(6)
    out = ihvp_at_x_explicit(quad, torch.zeros(6, dtype=DT))(V)  # eigh fallback
    assert rel_err(out, torch.linalg.solve(M, V.T).T) < 1e-10
    with pytest.raises(IHVPUsageError, match="singular"):
        ihvp_at_x_explicit(quad, torch.zeros(6, dtype=DT), regularization=1.0)
    with pytest.warns(UserWarning, match="not positive definite"):
        ihvp_at_x_cg(quad, torch.zeros(6, dtype=DT), max_iter=20)(V)


# ----------------------------------------------------------------- CG
@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("problem", ["lr", "mlp"])
def test_ihvp_cg_converges_and_stops_early(problem, mode, request):
    x0, X, y, H = request.getfixturevalue(problem)
    loss = lr_loss if problem == "lr" else mlp_loss
    lam = 0.05 if problem == "lr" else 1.0
    V = vecs(x0.numel())
    V[1] = 0.0  # a zero row must not produce 0/0
    expect = ref_solve(H, V, lam)
    max_iter = 200
    f = ihvp_at_x_cg(loss, x0, X, y, max_iter=max_iter, tol=1e-10, mode=mode, regularization=lam)
    out = f(V)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out, expect) < 1e-4
    assert f.info.iterations < max_iter
    assert bool(f.info.converged.all())
    assert float(f.info.residuals.max()) <= 1e-10
    true_res = (V - (out @ H + lam * out)).norm(dim=1) / V.norm(dim=1).clamp_min(1e-300)
    assert float(true_res.max()) < 1e-8


def test_ihvp_cg_tol_and_max_iter(mlp):
    theta, X, y, H = mlp
    V = vecs(P_MLP)
    loose = ihvp_at_x_cg(mlp_loss, theta, X, y, max_iter=500, tol=1e-2, regularization=1.0)
    tight = ihvp_at_x_cg(mlp_loss, theta, X, y, max_iter=500, tol=1e-9, regularization=1.0)
    loose(V)
    tight(V)
    assert loose.info.iterations < tight.info.iterations
    assert float(loose.info.residuals.max()) <= 1e-2
    capped = ihvp_at_x_cg(mlp_loss, theta, X, y, max_iter=2, tol=1e-12, regularization=1.0)
    capped(V)
    assert capped.info.iterations == 2
    assert not bool(capped.info.converged.any())
    solver = ihvp_cg(mlp_loss, max_iter=500, tol=1e-9, regularization=1.0)
    assert rel_err(solver((theta, X, y), V), ref_solve(H, V, 1.0)) < 1e-4
    assert solver.info.iterations == tight.info.iterations


# ----------------------------------------------------------------- LiSSA
def test_lissa_full_batch_is_exact(lr):
    w, X, y, H = lr
    V = vecs(5)
    lam, scaling = 0.05, 0.5
    f = ihvp_at_x_lissa(
        lr_loss,
        w,
        X,
        y,
        batch_size=40,
        recursion_depth=60,
        damping=lam / scaling,
        scaling=scaling,
        verbose=False,
    )
    assert rel_err(f(V), ref_solve(H, V, lam)) < 1e-6


def test_lissa_minibatch_accuracy(lr):
    w, X, y, H = lr
    V = vecs(5, k=3)
    lam, scaling = 0.05, 2.0
    f = ihvp_at_x_lissa(
        lr_loss,
        w,
        X,
        y,
        batch_size=30,
        num_repeat=3,
        recursion_depth=100,
        damping=lam / scaling,
        scaling=scaling,
        verbose=False,
    )
    assert rel_err(f(V), ref_solve(H, V, lam)) < 5e-2


def test_lissa_seeded_reproducible_and_vectorised(lr):
    w, X, y, _ = lr
    V = vecs(5, k=3)
    kw = dict(batch_size=5, num_repeat=2, recursion_depth=10, scaling=2.0, verbose=False)
    state = torch.get_rng_state()
    f = ihvp_at_x_lissa(lr_loss, w, X, y, **kw)
    out = f(V)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(out, f(V))  # reproducible
    row = f(V[1])  # same batches for every row: vectorised == per-vector
    assert torch.allclose(row, out[1], rtol=1e-10, atol=1e-12)
    other = ihvp_at_x_lissa(lr_loss, w, X, y, seed=1, **kw)(V)
    assert not torch.allclose(other, out)
    g = ihvp_lissa(lr_loss, **kw)
    assert torch.equal(g((w, X, y), V), out)


def test_lissa_uses_batch_size_and_num_repeat(lr):
    w, X, y, _ = lr
    sizes = []

    def loss(w_, X_, y_):
        sizes.append(X_.shape[0])
        return lr_loss(w_, X_, y_)

    ihvp_at_x_lissa(
        loss, w, X, y, batch_size=7, num_repeat=3, recursion_depth=4, scaling=5.0, verbose=False
    )(vecs(5))
    assert set(sizes) == {7}
    assert len(sizes) == 3 * 4  # one linearisation per step (rev-rev)


def test_lissa_collate_fn_and_in_dims(lr):
    w, X, y, H = lr

    def loss(w_, data):
        return lr_loss(w_, *data)

    kw = dict(batch_size=40, recursion_depth=60, damping=0.1, scaling=0.5, verbose=False)
    f = ihvp_at_x_lissa(loss, w, X, y, collate_fn=lambda s: (s[0], (s[1], s[2])), **kw)
    assert rel_err(f(vecs(5)), ref_solve(H, vecs(5), 0.05)) < 1e-6
    g = ihvp_at_x_lissa(
        lr_loss, w, X.T, y, in_dims=(None, 1, 0), collate_fn=lambda s: (s[0], s[1].T, s[2]), **kw
    )
    assert rel_err(g(vecs(5)), ref_solve(H, vecs(5), 0.05)) < 1e-6
    with pytest.raises(IHVPUsageError, match="in_dims"):
        ihvp_at_x_lissa(lr_loss, w, X, y, in_dims=(0, 0, 0), verbose=False)
    with pytest.raises(IHVPUsageError, match="in_dims"):
        ihvp_at_x_lissa(lr_loss, w, X, y, in_dims=(None, 0), verbose=False)
    with pytest.raises(IHVPUsageError, match="sample count"):
        ihvp_at_x_lissa(lr_loss, w, X, y[:10], verbose=False)
    with pytest.raises(IHVPUsageError, match="batch_size"):
        ihvp_at_x_lissa(lr_loss, w, X, y, batch_size=41, verbose=False)


def test_lissa_divergence_warns(lr):
    w, X, y, _ = lr
    f = ihvp_at_x_lissa(
        lr_loss, w, X, y, batch_size=40, recursion_depth=500, scaling=0.01, verbose=False
    )
    with pytest.warns(UserWarning, match="scaling"):
        out = f(vecs(5))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------- Arnoldi
@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
def test_arnoldi_exact_when_krylov_spans(mlp, mode):
    theta, X, y, H = mlp
    V = vecs(P_MLP)
    state = torch.get_rng_state()
    f = ihvp_at_x_arnoldi(
        mlp_loss,
        theta,
        X,
        y,
        max_iter=200,
        top_k=P_MLP,
        regularization=1.0,
        mode=mode,
        norm_constant=7.0,
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert rel_err(f(V), ref_solve(H, V, 1.0)) < 1e-6
    assert rel_err(f(V[0]), ref_solve(H, V[0], 1.0)) < 1e-6
    # indefinite, non-singular H + 0.01 I (7 repeated eigenvalues: needs the restarts)
    g = ihvp_at_x_arnoldi(
        mlp_loss, theta, X, y, max_iter=200, top_k=P_MLP, regularization=0.01, mode=mode, seed=3
    )
    assert rel_err(g(V), ref_solve(H, V, 0.01)) < 1e-6


def test_arnoldi_top_k_is_spectral_truncation(lr):
    w, X, y, H = lr
    lam = 0.05
    evals, evecs = torch.linalg.eigh(H + lam * torch.eye(5, dtype=DT))
    U = evecs[:, -2:]  # top-2 eigenpairs
    V = vecs(5)
    expect = ((V @ U) / evals[-2:]) @ U.T
    f = ihvp_at_x_arnoldi(lr_loss, w, X, y, max_iter=10, top_k=2, regularization=lam)
    assert rel_err(f(V), expect) < 1e-8
    f2 = ihvp_arnoldi(lr_loss, max_iter=10, top_k=2, regularization=lam)
    assert rel_err(f2((w, X, y), V), expect) < 1e-8


def test_arnoldi_seeded_and_float32(lr):
    w, X, y, _H = lr
    args = (w.float(), X.float(), y.float())
    a = ihvp_at_x_arnoldi(lr_loss, *args, max_iter=3, top_k=3, seed=5)(vecs(5).float())
    b = ihvp_at_x_arnoldi(lr_loss, *args, max_iter=3, top_k=3, seed=5)(vecs(5).float())
    c = ihvp_at_x_arnoldi(lr_loss, *args, max_iter=3, top_k=3, seed=6)(vecs(5).float())
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------- all solvers
def test_vectorised_equals_per_vector(mlp):
    theta, X, y, _ = mlp
    V = vecs(P_MLP, k=3)
    solvers = [
        hvp_at_x(mlp_loss, (theta, X, y)),
        ihvp_at_x_explicit(mlp_loss, theta, X, y, regularization=1.0),
        ihvp_at_x_cg(mlp_loss, theta, X, y, max_iter=8, regularization=1.0),
        ihvp_at_x_arnoldi(mlp_loss, theta, X, y, max_iter=15, top_k=10, regularization=1.0),
        ihvp_at_x_lissa(
            mlp_loss, theta, X, y, batch_size=10, recursion_depth=5, scaling=20.0, verbose=False
        ),
    ]
    for f in solvers:
        batched = f(V)
        looped = torch.stack([f(v) for v in V])
        assert torch.allclose(batched, looped, rtol=1e-9, atol=1e-12)


def test_ihvp_alias_module():
    for name in hess_mod.__all__:
        assert getattr(ihvp_mod, name) is getattr(hess_mod, name)
    assert issubclass(IHVPUsageError, ValueError)


# ----------------------------------------------------------------- errors
def _builders(lr):
    w, X, y, _ = lr
    return {
        "hvp_at_x": lambda **k: hvp_at_x(lr_loss, (w, X, y), **k),
        "explicit": lambda **k: ihvp_at_x_explicit(lr_loss, w, X, y, **k),
        "cg": lambda **k: ihvp_at_x_cg(lr_loss, w, X, y, **k),
        "arnoldi": lambda **k: ihvp_at_x_arnoldi(lr_loss, w, X, y, max_iter=5, **k),
        "lissa": lambda **k: ihvp_at_x_lissa(
            lr_loss, w, X, y, recursion_depth=2, scaling=10.0, verbose=False, **k
        ),
    }


@pytest.mark.parametrize("name", ["hvp_at_x", "explicit", "cg", "arnoldi", "lissa"])
def test_bad_inputs_raise(lr, name):
    build = _builders(lr)[name]
    with pytest.raises(IHVPUsageError, match="argnums"):
        build(argnums=3)
    f = build()
    with pytest.raises(IHVPUsageError, match="shape"):
        f(torch.ones(6, dtype=DT))
    with pytest.raises(IHVPUsageError, match="shape"):
        f(torch.ones(2, 4, dtype=DT))
    with pytest.raises(IHVPUsageError, match="NaN or inf"):
        f(torch.tensor([1.0, math.nan, 0, 0, 0], dtype=DT))
    with pytest.raises(IHVPUsageError, match="NaN or inf"):
        f(torch.full((2, 5), math.inf, dtype=DT))
    with pytest.raises(IHVPUsageError, match="floating-point"):
        f(torch.ones(5, dtype=torch.long))
    if name != "explicit":
        with pytest.raises(IHVPUsageError, match="mode"):
            build(mode="fwd-fwd")


def test_bad_mode_and_hyperparameters(lr):
    w, X, y, _ = lr
    for builder in (hvp, ihvp_cg, ihvp_arnoldi, ihvp_lissa):
        with pytest.raises(IHVPUsageError, match="mode"):
            builder(lr_loss, mode="rev")
    with pytest.raises(IHVPUsageError, match="argnums"):
        hvp(lr_loss, argnums=5)((w, X, y), vecs(5))
    with pytest.raises(IHVPUsageError, match="regularization"):
        ihvp_at_x_explicit(lr_loss, w, X, y, regularization=-1.0)
    with pytest.raises(IHVPUsageError, match="max_iter"):
        ihvp_at_x_cg(lr_loss, w, X, y, max_iter=0)
    with pytest.raises(IHVPUsageError, match="tol"):
        ihvp_at_x_cg(lr_loss, w, X, y, tol=-1.0)
    with pytest.raises(IHVPUsageError, match="scaling"):
        ihvp_at_x_lissa(lr_loss, w, X, y, scaling=0.0)
    with pytest.raises(IHVPUsageError, match="damping"):
        ihvp_at_x_lissa(lr_loss, w, X, y, damping=1.0)
    with pytest.raises(IHVPUsageError, match="norm_constant"):
        ihvp_at_x_arnoldi(lr_loss, w, X, y, norm_constant=0.0)
    with pytest.raises(IHVPUsageError, match="top_k"):
        ihvp_at_x_arnoldi(lr_loss, w, X, y, top_k=0)


def test_non_finite_hessian_raises():
    def bad(x):
        return torch.sqrt(x).sum()  # NaN derivatives for negative entries

    x = torch.tensor([-1.0, 2.0, 3.0], dtype=DT)
    with pytest.raises(IHVPUsageError, match="not finite"):
        hvp_at_x(bad, (x,))(torch.ones(3, dtype=DT))
    with pytest.raises(IHVPUsageError, match="not finite"):
        ihvp_at_x_explicit(bad, x)
    with pytest.raises(IHVPUsageError, match="not finite"):
        ihvp_at_x_cg(bad, x)(torch.ones(3, dtype=DT))


def test_solvers_work_under_no_grad(lr):
    w, X, y, H = lr
    V = vecs(5)
    with torch.no_grad():
        for mode in ("rev-rev", "rev-fwd"):
            assert rel_err(hvp_at_x(lr_loss, (w, X, y), mode=mode)(V), V @ H) < 1e-10
        out = ihvp_at_x_cg(lr_loss, w, X, y, max_iter=50, tol=1e-12, regularization=0.1)(V)
    assert rel_err(out, ref_solve(H, V, 0.1)) < 1e-8


@pytest.mark.gpu
def test_solvers_on_cuda_match_cpu(mlp):
    assert torch.cuda.is_available(), "needs CUDA: run on the GPU machine with `pytest -m gpu`"
    theta, X, y, H = mlp
    x_cpu = (theta, X, y)
    x_gpu = tuple(t.cuda() for t in x_cpu)
    V = vecs(P_MLP)
    for mode in ("rev-rev", "rev-fwd"):
        out = hvp_at_x(mlp_loss, x_gpu, mode=mode)(V.cuda())
        assert out.device.type == "cuda"
        assert rel_err(out.cpu(), V @ H) < 1e-8
    expect = ref_solve(H, V, 1.0)
    builders = {
        "explicit": lambda x: ihvp_at_x_explicit(mlp_loss, *x, regularization=1.0),
        "cg": lambda x: ihvp_at_x_cg(mlp_loss, *x, max_iter=200, tol=1e-10, regularization=1.0),
        "arnoldi": lambda x: ihvp_at_x_arnoldi(
            mlp_loss, *x, max_iter=200, top_k=P_MLP, regularization=1.0
        ),
    }
    for name, build in builders.items():
        f = build(x_gpu)
        out = f(V.cuda())
        assert out.device.type == "cuda", name
        assert rel_err(out.cpu(), expect) < 1e-6, name
        assert f(V).device.type == "cpu", name  # v on CPU: result follows v
    kw = dict(batch_size=10, num_repeat=2, recursion_depth=20, scaling=20.0, verbose=False)
    lissa_gpu = ihvp_at_x_lissa(mlp_loss, *x_gpu, **kw)(V.cuda())
    lissa_cpu = ihvp_at_x_lissa(mlp_loss, *x_cpu, **kw)(V)
    assert torch.allclose(lissa_gpu.cpu(), lissa_cpu, rtol=1e-8, atol=1e-10)  # same batches
    a_gpu = ihvp_at_x_arnoldi(mlp_loss, *x_gpu, max_iter=10, top_k=5, seed=2)(V.cuda())
    a_cpu = ihvp_at_x_arnoldi(mlp_loss, *x_cpu, max_iter=10, top_k=5, seed=2)(V)
    assert torch.allclose(a_gpu.cpu(), a_cpu, rtol=1e-6, atol=1e-8)  # same start vector
