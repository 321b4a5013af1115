"""Tests of the Hessian-based influence-function attributors (Explicit, CG, LiSSA, Arnoldi).

References are brute force: per-sample gradients from a Python loop of
``torch.autograd.grad``, the Hessian of the mean training loss from ``torch.func.hessian``
on all training data at once, and actual leave-one-out retraining (L-BFGS, float64).
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri.func.hvp_core import linearization_bytes
from dattri.task import AttributionTask
from tests.problems import cached_digits_lr, cached_random_mlp, train_lbfgs

# Losses with an L2 term make the per-sample-gradient engine fall back to vmap, with a
# warning per call; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Layer-hook gradients:UserWarning")


# --------------------------------------------------------------------------- helpers
def lr_problem(**kw):
    return cached_digits_lr(n_train=100, **kw)


def lr_task(pb, **kw):
    """IF task: training loss with the L2 term, test target = plain cross-entropy."""
    return AttributionTask(
        loss_func=pb.loss_if,
        model=pb.model,
        checkpoints=pb.model.state_dict(),
        target_func=pb.loss_if_nowd,
        **kw,
    )


def flat_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def exact_grads(model, loss, x, y, names=None):
    """Per-sample gradients ``(n, p)`` by a loop of autograd.grad (sample as (1, ...))."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    rows = []
    for i in range(len(x)):
        val = loss(params, (x[i : i + 1], y[i : i + 1]))
        grads = torch.autograd.grad(val, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def exact_hessian(model, loss, x, y, names=None):
    """Hessian of the mean loss over ALL data at once w.r.t. the selected parameters."""
    params = flat_params(model)
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        parts = dict(params)
        for n, s, t in zip(names, shapes, flat.split(sizes)):
            parts[n] = t.reshape(s)
        return loss(parts, (x, y))

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return torch.func.hessian(f)(flat)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.fixture(scope="module")
def lr_ref():
    """Exact gradients, Hessian and explicit IF scores of the digits LR problem."""
    pb = lr_problem()
    g_tr = exact_grads(pb.model, pb.loss_if, pb.x_train, pb.y_train)
    g_te = exact_grads(pb.model, pb.loss_if_nowd, pb.x_test, pb.y_test)
    hess = exact_hessian(pb.model, pb.loss_if, pb.x_train, pb.y_train)
    return pb, g_tr, g_te, hess


@pytest.fixture(scope="module")
def explicit_lr(lr_ref):
    pb = lr_ref[0]
    attr = IFAttributorExplicit(lr_task(pb), verbose=False)
    attr.cache(pb.train_loader(32))
    return attr, attr.attribute(pb.train_loader(32), pb.test_loader(16))


# --------------------------------------------------------------------------- Explicit
def test_explicit_hessian_is_mean_over_uneven_batches(lr_ref, explicit_lr):
    # batch_size 32 on 100 samples gives batches 32, 32, 32, 4: a sum of per-batch
    # inverses (upstream) or an unweighted mean would both differ from the mean Hessian.
    _, _, _, hess = lr_ref
    attr, _ = explicit_lr
    torch.testing.assert_close(attr.hessian(0), hess, rtol=1e-10, atol=1e-12)


def test_explicit_scores_equal_hand_computation(lr_ref, explicit_lr):
    _, g_tr, g_te, hess = lr_ref
    _, scores = explicit_lr
    ref = g_tr @ torch.linalg.solve(hess, g_te.T)
    assert scores.shape == (100, 20)
    torch.testing.assert_close(scores, ref, rtol=1e-8, atol=1e-10)


def test_explicit_predicts_leave_one_out_retraining(lr_ref, explicit_lr):
    """IF vs actual LOO retraining on L2-regularised logistic regression.

    With ``L(θ) = (1/n) Σ_k f_k(θ)`` minimised at ``θ*`` (``f_k`` = per-sample loss incl.
    the L2 term), removing sample i gives ``L_{-i} = (n L - f_i) / (n - 1)`` whose
    gradient at ``θ*`` is ``-∇f_i / (n - 1)``; one Newton step gives
    ``θ_{-i} - θ* ≈ H^{-1} ∇f_i / (n - 1)`` and the test-loss change
    ``ℓ_j(θ_{-i}) - ℓ_j(θ*) ≈ ∇ℓ_jᵀ H^{-1} ∇f_i / (n - 1) = S_ij / (n - 1)``.
    """
    pb = lr_ref[0]
    _, scores = explicit_lr
    n = len(pb.x_train)
    removed = list(range(0, n, 8))  # 13 retrainings (x 20 test points) keep it fast

    def test_losses(model):
        with torch.no_grad():
            return nn.functional.cross_entropy(model(pb.x_test), pb.y_test, reduction="none")

    base = test_losses(pb.model)
    actual = []
    for i in removed:
        keep = torch.arange(n) != i
        model = copy.deepcopy(pb.model)  # warm start at θ*
        train_lbfgs(model, pb.x_train[keep], pb.y_train[keep], pb.weight_decay)
        actual.append(test_losses(model) - base)
    actual = torch.stack(actual)
    predicted = scores[removed] / (n - 1)
    assert corr(predicted, actual) > 0.95
    # The scale is right too: a sign error gives a negative slope, a missing/extra n a
    # slope near 1e-2 or 1e2. The first-order IF underestimates LOO for high-leverage
    # samples (exact removal amplifies by ~1 / (1 - leverage); here p = 650 > n = 100),
    # so the measured slope is ~1.7 rather than 1.
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    assert 1.0 < slope < 2.5


def test_explicit_layer_name_and_regularization():
    pm = cached_random_mlp()
    names = ["2.weight", "2.bias"]
    task = AttributionTask(pm.loss_if, pm.model, pm.model.state_dict())
    attr = IFAttributorExplicit(task, layer_name=names, regularization=0.05, verbose=False)
    attr.cache(pm.train_loader(16))
    scores = attr.attribute(pm.train_loader(16), pm.test_loader(4))
    g_tr = exact_grads(pm.model, pm.loss_if, pm.x_train, pm.y_train, names)
    g_te = exact_grads(pm.model, pm.loss_if, pm.x_test, pm.y_test, names)
    hess = exact_hessian(pm.model, pm.loss_if, pm.x_train, pm.y_train, names)
    hess = hess + 0.05 * torch.eye(len(hess), dtype=hess.dtype)
    torch.testing.assert_close(scores, g_tr @ torch.linalg.solve(hess, g_te.T))


def test_checkpoint_ensemble_is_mean():
    pb = lr_problem()
    sd1 = pb.model.state_dict()
    sd2 = {k: v * 0.9 for k, v in sd1.items()}
    model = copy.deepcopy(pb.model)
    loader, test = pb.train_loader(50), pb.test_loader(20)

    def run(ckpts):
        attr = IFAttributorExplicit(
            AttributionTask(pb.loss_if, model, ckpts), regularization=0.0, verbose=False
        )
        attr.cache(loader)
        return attr.attribute(loader, test)

    both = run([sd1, sd2])
    torch.testing.assert_close(both, 0.5 * (run(sd1) + run(sd2)))


# --------------------------------------------------------------------------- CG
def test_cg_matches_explicit(lr_ref, explicit_lr):
    pb = lr_ref[0]
    _, ref = explicit_lr
    attr = IFAttributorCG(lr_task(pb), max_iter=300, tol=1e-10, verbose=False)
    attr.cache(pb.train_loader(40))  # 40, 40, 20: uneven batches again
    scores = attr.attribute(pb.train_loader(32), pb.test_loader(16))
    assert rel_err(scores, ref) < 1e-4
    assert bool(attr.last_cg_info.converged.all())
    assert attr.last_cg_info.iterations < 300  # tol is honoured: it stopped early


def test_cg_warns_when_not_converged(lr_ref):
    pb = lr_ref[0]
    attr = IFAttributorCG(lr_task(pb), max_iter=2, verbose=False)
    attr.cache(pb.train_loader(50))
    with pytest.warns(UserWarning, match="did not reach tol"):
        attr.attribute(pb.train_loader(50), pb.test_loader(20))


# --------------------------------------------------------------------------- LiSSA
@pytest.mark.parametrize(
    "kwargs",
    [
        {"scaling": 1.0, "damping": 0.1},  # upstream semantics: (H + d s I)^-1
        {"scaling": "auto", "regularization": 0.1},  # tune-free interface
    ],
)
def test_lissa_full_batch_is_exact(lr_ref, kwargs):
    # With batch_size = n every step uses the full Hessian: the recursion is a
    # deterministic Neumann series contracting by 1 - (λ_min + 0.1) / s <= 0.89 per
    # step, so 150 steps reach ~1e-8 relative accuracy.
    pb, g_tr, g_te, hess = lr_ref
    attr = IFAttributorLiSSA(
        lr_task(pb), batch_size=100, recursion_depth=150, verbose=False, **kwargs
    )
    attr.cache(pb.train_loader(50))
    scores = attr.attribute(pb.train_loader(50), pb.test_loader(20))
    reg = hess + 0.1 * torch.eye(len(hess), dtype=hess.dtype)
    ref = g_tr @ torch.linalg.solve(reg, g_te.T)
    assert rel_err(scores, ref) < 1e-6
    if kwargs["scaling"] == "auto":  # the auto scaling bounds the spectrum
        assert attr.scaling_[0] >= float(torch.linalg.eigvalsh(hess).max())


def test_lissa_stochastic_minibatches_correlate(lr_ref):
    # batch_size 10: each step sees a noisy Hessian; the last iterate keeps O(1/sqrt(B))
    # noise, so we ask for a high correlation (measured 0.97), not equality.
    pb, g_tr, g_te, hess = lr_ref
    attr = IFAttributorLiSSA(
        lr_task(pb),
        batch_size=10,
        recursion_depth=200,
        scaling="auto",
        regularization=0.1,
        verbose=False,
    )
    attr.cache(pb.train_loader(50))
    scores = attr.attribute(pb.train_loader(50), pb.test_loader(20))
    ref = g_tr @ torch.linalg.solve(hess + 0.1 * torch.eye(len(hess), dtype=hess.dtype), g_te.T)
    assert corr(scores, ref) > 0.9


def test_lissa_default_warns_about_damping(lr_ref):
    pb = lr_ref[0]
    attr = IFAttributorLiSSA(lr_task(pb), recursion_depth=2, verbose=False)
    with pytest.warns(UserWarning, match="zero damping"):
        attr.cache(pb.train_loader(50))


# --------------------------------------------------------------------------- Arnoldi
@pytest.fixture(scope="module")
def small_lr():
    """3-class digits LR (p = 195) so a full-rank Arnoldi stays fast."""
    pb = cached_digits_lr(n_train=100, n_classes=3)
    g_tr = exact_grads(pb.model, pb.loss_if, pb.x_train, pb.y_train)
    g_te = exact_grads(pb.model, pb.loss_if_nowd, pb.x_test, pb.y_test)
    hess = exact_hessian(pb.model, pb.loss_if, pb.x_train, pb.y_train)
    return pb, g_tr, g_te, hess


def test_arnoldi_full_rank_matches_explicit(small_lr):
    pb, g_tr, g_te, hess = small_lr
    p = len(hess)
    attr = IFAttributorArnoldi(lr_task(pb), proj_dim=p, max_iter=p, verbose=False)
    attr.cache(pb.train_loader(100))  # one batch: p HVPs (multi-batch: see low-rank test)
    scores = attr.attribute(pb.train_loader(50), pb.test_loader(20))
    assert rel_err(scores, g_tr @ torch.linalg.solve(hess, g_te.T)) < 1e-6
    ref = IFAttributorExplicit(lr_task(pb), verbose=False)
    ref.cache(pb.train_loader(50))
    for method in ("l", "theta"):
        want = ref.attribute(pb.train_loader(50), pb.test_loader(20), relatif_method=method)
        got = attr.attribute(pb.train_loader(50), pb.test_loader(20), relatif_method=method)
        assert rel_err(got, want) < 1e-6


def test_arnoldi_low_rank_is_top_eigenspace(small_lr):
    pb, g_tr, g_te, hess = small_lr
    attr = IFAttributorArnoldi(lr_task(pb), proj_dim=10, max_iter=60, verbose=False)
    attr.cache(pb.train_loader(50))
    scores = attr.attribute(pb.train_loader(50), pb.test_loader(20))
    evals, evecs = torch.linalg.eigh(hess)
    top_vals, top_vecs = evals[-10:], evecs[:, -10:]
    ref = (g_tr @ top_vecs) / top_vals @ (g_te @ top_vecs).T
    assert rel_err(scores, ref) < 1e-4
    torch.testing.assert_close(attr.eigenvalues[0].sort().values, top_vals, rtol=1e-6, atol=0)


@pytest.mark.parametrize("budget", ["one batch", 0])
def test_arnoldi_kept_linearizations_do_not_change_result(small_lr, budget):
    pb = small_lr[0]
    kw = {"proj_dim": 10, "max_iter": 30, "verbose": False}
    ref = IFAttributorArnoldi(lr_task(pb), **kw)
    ref.cache(pb.train_loader(25))  # 4 batches merged into one (default budget keeps it)
    other = IFAttributorArnoldi(lr_task(pb), **kw)
    other.hvp_merge_rows = 25  # no merging: 4 HVP batches
    if budget == "one batch":  # keeps the first batch's graph, re-linearises the rest
        func, params = other._loss_and_params(0)
        other._cache_batches(pb.train_loader(25))
        budget = linearization_bytes(func, (params, other._batches[0]))
    other.linearization_budget_bytes = budget
    other.cache(pb.train_loader(25))
    torch.testing.assert_close(other.eigenvalues[0], ref.eigenvalues[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        other.attribute(pb.train_loader(50), pb.test_loader(20)),
        ref.attribute(pb.train_loader(50), pb.test_loader(20)),
        rtol=1e-10,
        atol=1e-12,
    )


def test_arnoldi_requires_cache(small_lr):
    pb = small_lr[0]
    attr = IFAttributorArnoldi(lr_task(pb), proj_dim=5, max_iter=10, verbose=False)
    with pytest.raises(ValueError, match="The Arnoldi projector has not been cached"):
        attr.attribute(pb.train_loader(50), pb.test_loader(20))
    with pytest.raises(ValueError, match="The Arnoldi projector has not been cached"):
        attr.self_attribute(pb.train_loader(50))


# ------------------------------------------------------------ shared behaviours (all six)
def _make(name, task, device="cpu"):
    kw = {"device": device, "verbose": False}
    cfg = {
        "explicit": lambda: IFAttributorExplicit(task, regularization=0.01, **kw),
        # the MLP's cross-entropy Hessian is indefinite: CG needs a regularization
        "cg": lambda: IFAttributorCG(task, max_iter=30, tol=1e-6, regularization=1.0, **kw),
        "lissa": lambda: IFAttributorLiSSA(
            task,
            batch_size=8,
            recursion_depth=10,
            scaling=5.0,
            regularization=0.1,
            **kw,
        ),
        "arnoldi": lambda: IFAttributorArnoldi(task, proj_dim=10, max_iter=25, **kw),
        "datainf": lambda: IFAttributorDataInf(task, **kw),
        "ekfac": lambda: IFAttributorEKFAC(task, **kw),
    }
    return cfg[name]()


ALL = ["explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac"]


def _mlp_task(pm, dict_batches=False):
    if not dict_batches:
        return AttributionTask(pm.loss_if_nowd, pm.model, pm.model.state_dict())

    def loss(params, data):
        logits = functional_call(pm.model, params, (data["x"],))
        return nn.functional.cross_entropy(logits, data["y"])

    return AttributionTask(loss, pm.model, pm.model.state_dict())


def _as_dicts(loader):
    return [{"x": x, "y": y} for x, y in loader]


@pytest.mark.parametrize("name", ALL)
def test_self_attribute_dict_batches_and_determinism(name):
    pm = cached_random_mlp()
    train, test = pm.train_loader(16), pm.test_loader(5)  # 3 train batches (16, 16, 8)
    attr = _make(name, _mlp_task(pm))
    attr.cache(train)
    scores = attr.attribute(train, test)
    assert scores.shape == (40, 10)
    assert bool(torch.isfinite(scores).all())
    # self_attribute == diag(attribute(train, train)) with several batches
    torch.testing.assert_close(attr.self_attribute(train), attr.attribute(train, train).diag())
    # a fresh attributor gives bit-identical scores (seeded, no global RNG)
    again = _make(name, _mlp_task(pm))
    again.cache(train)
    torch.testing.assert_close(again.attribute(train, test), scores, rtol=0, atol=0)
    # dict batches with a dict loss give the same scores as tuple batches
    dict_attr = _make(name, _mlp_task(pm, dict_batches=True))
    dict_attr.cache(_as_dicts(train))
    torch.testing.assert_close(dict_attr.attribute(_as_dicts(train), _as_dicts(test)), scores)
    # RelatIF "theta": each row divided by ||H^-1 g_i||, g_i = target gradient of z_i
    theta = attr.attribute(train, test, relatif_method="theta")
    g = attr.generate_test_rep(0, (pm.x_train, pm.y_train))
    if name == "arnoldi":  # H^-1 restricted to the Ritz space: U^T diag(1/λ) U g
        u, lam = attr.eigenvectors[0], attr.eigenvalues[0]
        denom = (((g @ u.T) / lam) @ u).norm(dim=1)
    else:
        denom = attr.transform_test_rep(0, g).norm(dim=1)
    torch.testing.assert_close(theta, scores / denom[:, None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    pm = cached_random_mlp()
    train, test = pm.train_loader(16), pm.test_loader(5)
    cpu = _make(name, _mlp_task(pm))
    cpu.cache(train)
    ref = cpu.attribute(train, test)
    model = copy.deepcopy(pm.model).cuda()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    attr = _make(name, AttributionTask(loss, model, model.state_dict()), device="cuda")
    attr.cache(train)  # CPU loaders: the attributor moves the batches
    scores = attr.attribute(train, test)
    assert scores.is_cuda
    torch.testing.assert_close(scores.cpu(), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(attr.self_attribute(train).cpu(), cpu.self_attribute(train))


def test_relatif_equals_hand_computation(lr_ref, explicit_lr):
    _, g_tr, _, hess = lr_ref
    attr, scores = explicit_lr
    pb = lr_ref[0]
    g_tr_target = exact_grads(pb.model, pb.loss_if_nowd, pb.x_train, pb.y_train)
    inv_t = torch.linalg.solve(hess, g_tr_target.T).T
    l_denom = (g_tr_target * inv_t).sum(1).abs().sqrt()
    got_l = attr.attribute(pb.train_loader(32), pb.test_loader(16), relatif_method="l")
    torch.testing.assert_close(got_l, scores / l_denom[:, None])
    got_t = attr.attribute(pb.train_loader(32), pb.test_loader(16), relatif_method="theta")
    torch.testing.assert_close(got_t, scores / inv_t.norm(dim=1)[:, None])
    self_l = attr.self_attribute(pb.train_loader(32), relatif_method="l")
    torch.testing.assert_close(self_l, (g_tr * inv_t).sum(1) / l_denom)
    with pytest.raises(ValueError, match="relatif_method"):
        attr.attribute(pb.train_loader(32), pb.test_loader(16), relatif_method="x")


# --------------------------------------------------------------------------- errors
def test_clear_errors(lr_ref):
    pb = lr_ref[0]
    loader = pb.train_loader(50)

    def vector_loss(params, data):
        x, y = data
        logits = functional_call(pb.model, params, (x,))
        return nn.functional.cross_entropy(logits, y, reduction="none")

    task = AttributionTask(vector_loss, pb.model, pb.model.state_dict())
    for cls in (IFAttributorExplicit, IFAttributorCG, IFAttributorArnoldi, IFAttributorLiSSA):
        with pytest.raises(ValueError, match="scalar"):
            cls(task, verbose=False).cache(loader)

    nan_x = pb.x_train.clone()
    nan_x[3, 5] = float("nan")
    nan_loader = [(nan_x[:50], pb.y_train[:50]), (nan_x[50:], pb.y_train[50:])]
    attr = IFAttributorExplicit(lr_task(pb), verbose=False)
    with pytest.raises(ValueError, match="(?i)nan|non-finite"):
        attr.cache(nan_loader)
    attr.cache(loader)
    with pytest.raises(ValueError, match="(?i)nan|non-finite"):
        attr.attribute(nan_loader, pb.test_loader(20))

    task = lr_task(pb)
    with pytest.raises(ValueError, match="regularization"):
        IFAttributorExplicit(task, regularization=-1.0)
    with pytest.raises(ValueError, match="mode"):
        IFAttributorCG(task, mode="fwd-fwd")
    with pytest.raises(ValueError, match="max_iter"):
        IFAttributorCG(task, max_iter=0)
    with pytest.raises(ValueError, match="scaling"):
        IFAttributorLiSSA(task, scaling="big")
    with pytest.raises(ValueError, match="damping"):
        IFAttributorLiSSA(task, damping=1.5)
    with pytest.raises(ValueError, match="precompute_data_ratio"):
        IFAttributorArnoldi(task, precompute_data_ratio=0.0)
    with pytest.raises(ValueError, match="layer_name"):
        IFAttributorExplicit(task, layer_name="nope")
    singular = IFAttributorExplicit(
        AttributionTask(pb.loss_if_nowd, pb.model, pb.model.state_dict()), verbose=False
    )
    with pytest.raises(ValueError, match="singular"):  # softmax LR: H has a null space
        singular.cache(loader)


def test_factorization_conditioning_checks():
    from dattri.algorithm.influence_function import _Factorization

    rng = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=rng, dtype=torch.float64))
    evals = torch.tensor([3.0, 2.0, 1.0, -0.5, 1e-3, 2e-3], dtype=torch.float64)
    mat = q @ torch.diag(evals) @ q.T  # indefinite but non-singular: exact inverse
    rhs = torch.randn(4, 6, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(_Factorization(mat).solve(rhs), torch.linalg.solve(mat, rhs.T).T)
    evals[4] = 0.0
    with pytest.raises(ValueError, match="singular"):
        _Factorization(q @ torch.diag(evals) @ q.T)
    evals[4] = 1e-7  # fine in float64, rounding-dominated in float32
    with pytest.warns(UserWarning, match="ill-conditioned"):
        _Factorization((q @ torch.diag(evals) @ q.T).float())
