"""Spectral (block-Krylov deflation) preconditioner and batched MINRES, against explicit
solves (torch.linalg.solve / eigh), scipy's MINRES and IFAttributorExplicit."""

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from dattri.algorithm import IFAttributorCG, IFAttributorExplicit
from dattri.func.hessian import IHVPUsageError, cg_solve, ihvp_at_x_cg, ihvp_cg
from dattri.func.minres import minres_solve
from dattri.func.spectral_precond import (
    SpectralPreconditioner,
    block_krylov_eigs,
    spectral_preconditioner,
    split_spectral_preconditioner,
)
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp, symmetric_with_eigenvalues

pytestmark = pytest.mark.filterwarnings("ignore:Layer-hook gradients:UserWarning")
F64 = torch.float64


def _rhs(k, p, seed=1):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _error_bound(a, x, b):
    """``||x - A^{-1} b|| <= ||A^{-1}|| ||b - A x||`` (+ float64 rounding of the solve)."""
    smin = torch.linalg.eigvalsh(a).abs().min()
    res = (b - x @ a).norm(dim=1)
    return (res / smin + 1e-10 * b.norm(dim=1) / smin)[:, None]


def test_block_krylov_ritz_pairs_are_exact_pairs_and_find_the_top():
    eigs = torch.cat([torch.logspace(3, 0, 10, dtype=F64), torch.linspace(-0.01, 0.01, 90)])
    a = symmetric_with_eigenvalues(eigs)
    theta, vecs, resid, hvps = block_krylov_eigs(lambda m: m @ a, 100, 40, block_size=8, dtype=F64)
    assert hvps == 40 and theta.shape == (40,) and vecs.shape == (40, 100)
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(40, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(resid, (vecs @ a - theta[:, None] * vecs).norm(dim=1))
    top = theta.abs().sort(descending=True).values[:10]
    torch.testing.assert_close(top, eigs[:10], rtol=1e-8, atol=0)
    with pytest.raises(IHVPUsageError, match="rank"):
        block_krylov_eigs(lambda m: m @ a, 100, 0)


def test_spectral_preconditioner_is_spd_and_exact_at_full_rank():
    eigs = [-3.0, -1.0, -0.2, 0.05, 0.3, 1.0, 2.0, 5.0, 20.0, 100.0, 0.5, 7.0]
    a = symmetric_with_eigenvalues(eigs)
    p = len(eigs)
    pre = spectral_preconditioner(lambda m: m @ a, p, 0.0, rank=50, block_size=5, dtype=F64)
    assert pre.hvps == p  # capped at p
    mat = pre.matrix()
    torch.testing.assert_close(mat, mat.T, atol=1e-12, rtol=0)
    ev, vec = torch.linalg.eigh(a)
    torch.testing.assert_close(mat, vec @ torch.diag(1 / ev.abs()) @ vec.T, rtol=1e-9, atol=1e-9)
    # low rank: still symmetric positive definite, inverse on the kept space, 1/level elsewhere
    low = spectral_preconditioner(lambda m: m @ a, p, 0.0, rank=4, block_size=2, dtype=F64)
    m = low.matrix()
    torch.testing.assert_close(m, m.T, atol=1e-12, rtol=0)
    assert float(torch.linalg.eigvalsh(m).min()) > 0
    u = low.eigenvectors
    torch.testing.assert_close(
        u @ m @ u.T, torch.diag(1 / low.eigenvalues.abs()), atol=1e-9, rtol=0
    )
    comp = torch.eye(p, dtype=F64) - u.T @ u
    torch.testing.assert_close(comp @ m @ comp, comp / low.level, atol=1e-9, rtol=0)
    # CG with the exact |A|^{-1}: P A has eigenvalues +-1, so two steps solve it
    b = _rhs(3, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        x, info = cg_solve(lambda m: m @ a, b, 10, 1e-10, preconditioner=pre)
    assert info.iterations <= 2 and bool(info.converged.all())
    ref = torch.linalg.solve(a, b.T).T
    assert bool(((x - ref).norm(dim=1, keepdim=True) <= _error_bound(a, x, b)).all())


def test_spectral_preconditioner_rejects_bad_pairs():
    with pytest.raises(IHVPUsageError, match="pairs"):
        SpectralPreconditioner(torch.ones(2, dtype=F64), torch.eye(3, dtype=F64), 0.0)
    with pytest.raises(IHVPUsageError, match="non-finite"):
        SpectralPreconditioner(torch.tensor([float("nan")]), torch.ones(1, 3), 0.0)


def test_spectral_pcg_fewer_products_on_decaying_spectrum():
    """Low rank + damping (the shape of a trained MLP's Hessian): 60 outliers over a
    cluster of 440 eigenvalues in [-0.005, 0.01], damping 0.01."""
    p, reg = 500, 1e-2
    eigs = torch.cat(
        [torch.logspace(2, -1.5, 60, dtype=F64), torch.linspace(-0.005, 0.01, p - 60, dtype=F64)]
    )
    h = symmetric_with_eigenvalues(eigs, seed=3)
    a = h + reg * torch.eye(p, dtype=F64)

    def op(m):
        return m @ h + reg * m

    b = _rhs(20, p, seed=4)
    plain_x, plain = cg_solve(op, b, 1000, 1e-8)
    pre = spectral_preconditioner(op, p, reg, rank=96, block_size=16, dtype=F64)
    x, info = cg_solve(op, b, 1000, 1e-8, preconditioner=pre)
    for sol, inf in ((plain_x, plain), (x, info)):
        assert bool(inf.converged.all())
        ref = torch.linalg.solve(a, b.T).T
        assert bool(((sol - ref).norm(dim=1, keepdim=True) <= _error_bound(a, sol, b)).all())
    # deterministic counts (same seeds; 6372 vs 341 when written): > 10x fewer
    assert info.hvps * 10 < plain.hvps, (info.hvps, plain.hvps)
    # and MINRES with the same SPD preconditioner does as well
    mx, minfo = minres_solve(op, b, 1000, 1e-8, preconditioner=pre)
    assert bool(minfo.converged.all()) and minfo.hvps * 10 < plain.hvps
    assert bool(((mx - ref).norm(dim=1, keepdim=True) <= _error_bound(a, mx, b)).all())


def test_ihvp_cg_spectral_option_matches_explicit_inverse():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(30, 8, generator=g, dtype=F64)

    def func(w):
        return torch.log1p(torch.exp(data @ w)).sum() / 30 + 0.1 * (w**4).sum()

    x = torch.randn(8, 3, generator=g, dtype=F64) * 0.5
    hess = torch.autograd.functional.hessian(func, x).reshape(24, 24)
    reg = 0.05
    a = hess + reg * torch.eye(24, dtype=F64)
    v = torch.randn(4, 24, generator=g, dtype=F64)
    solver = ihvp_at_x_cg(
        func,
        x,
        max_iter=100,
        tol=1e-10,
        regularization=reg,
        preconditioner="spectral",
        preconditioner_rank=10,
    )
    got = solver(v)
    assert solver.info.preconditioner_hvps == 10 and bool(solver.info.converged.all())
    assert bool(
        (
            (got - torch.linalg.solve(a, v.T).T).norm(dim=1, keepdim=True)
            <= _error_bound(a, got, v)
        ).all()
    )
    f = ihvp_cg(func, max_iter=100, tol=1e-10, regularization=reg, preconditioner="spectral")
    torch.testing.assert_close(f((x,), v), torch.linalg.solve(a, v.T).T, rtol=1e-7, atol=1e-9)
    assert f.info.preconditioner_hvps == 24  # rank 192 capped at p
    with pytest.raises(IHVPUsageError, match="preconditioner"):
        ihvp_at_x_cg(func, x, preconditioner="nystrom-typo")


def test_minres_matches_scipy_step_by_step_and_solves_indefinite():
    eigs = torch.cat([torch.linspace(-3, -0.5, 8, dtype=F64), torch.logspace(-1, 2, 32, dtype=F64)])
    a = symmetric_with_eigenvalues(eigs)
    b = _rhs(3, 40)
    pre = spectral_preconditioner(lambda m: m @ a, 40, 0.0, rank=12, block_size=4, dtype=F64)
    pm = pre.matrix().numpy()
    for it in (1, 3, 5, 8):
        for prec, m in ((None, None), (pre, pm)):
            x, info = minres_solve(lambda m_: m_ @ a, b, it, 0.0, preconditioner=prec)
            ref = np.stack(
                [sla.minres(a.numpy(), bb.numpy(), M=m, rtol=0, maxiter=it)[0] for bb in b]
            )
            # same recurrences (later steps amplify rounding chaotically: compare early ones)
            tol = 1e-11
            torch.testing.assert_close(
                x, torch.from_numpy(ref), rtol=tol, atol=tol * float(abs(ref).max())
            )
            # the carried residual is the true one
            torch.testing.assert_close(
                info.residuals, (b - x @ a).norm(dim=1) / b.norm(dim=1), rtol=1e-8, atol=1e-12
            )
    b[1] = 0  # a zero row is never divided by
    x, info = minres_solve(lambda m: m @ a, b, 200, 1e-10)
    assert bool(info.converged.all()) and bool((x[1] == 0).all())
    assert info.hvps < info.iterations * 3  # zero row never multiplied
    assert bool(info.negative_curvature[[0, 2]].any())
    ref = torch.linalg.solve(a, b.T).T
    assert bool(((x - ref).norm(dim=1, keepdim=True) <= _error_bound(a, x, b)).all())


def test_minres_rejects_bad_input():
    a = torch.eye(3, dtype=F64)
    with pytest.raises(IHVPUsageError, match="positive definite"):
        minres_solve(
            lambda m: m @ a, torch.ones(1, 3, dtype=F64), 5, 1e-6, preconditioner=lambda m: -m
        )
    with pytest.raises(IHVPUsageError, match="max_iter"):
        minres_solve(lambda m: m @ a, torch.ones(1, 3, dtype=F64), 0, 1e-6)
    with pytest.raises(IHVPUsageError, match="rhs"):
        minres_solve(lambda m: m @ a, torch.ones(3, dtype=F64), 5, 1e-6)


def test_if_cg_spectral_equals_explicit_with_fewer_products():
    pb = cached_random_mlp(n_train=20, n_test=4, hidden=5)
    task = AttributionTask(
        loss_func=pb.loss_if_nowd, model=pb.model, checkpoints=pb.model.state_dict()
    )
    reg = pb.weight_decay
    train, test = pb.train_loader(20), pb.test_loader(4)
    ref_att = IFAttributorExplicit(task, regularization=reg, verbose=False)
    ref_att.cache(train)
    ref = ref_att.attribute(train, test)
    p = pb.flat_params().numel()
    hvps = {}
    for pre in (None, "spectral"):
        att = IFAttributorCG(
            task,
            max_iter=400,
            tol=1e-9,
            regularization=reg,
            verbose=False,
            preconditioner=pre,
            preconditioner_rank=p,
        )
        att.cache(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLP Hessian may be indefinite
            got = att.attribute(train, test)
        info = att.last_cg_info
        assert bool(info.converged.all())
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8 * ref.abs().max())
        hvps[pre] = info.hvps
        assert info.preconditioner_hvps == (p if pre else 0)
    # the basis spans R^p: P = |H + reg I|^{-1}, so CG needs <= 2 steps per row (P A = +-1)
    assert hvps["spectral"] <= 2 * 4 < hvps[None]
    # MINRES: the same solve (also with the spectral preconditioner)
    for pre in (None, "spectral"):
        att = IFAttributorCG(
            task,
            max_iter=400,
            tol=1e-9,
            regularization=reg,
            verbose=False,
            preconditioner=pre,
            solver="minres",
        )
        att.cache(train)
        got = att.attribute(train, test)
        assert bool(att.last_cg_info.converged.all())
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8 * ref.abs().max())
    with pytest.raises(ValueError, match="solver"):
        IFAttributorCG(task, solver="gmres")
    with pytest.raises(ValueError, match="preconditioner_rank"):
        IFAttributorCG(task, preconditioner="spectral", preconditioner_rank=0)


def _half_of(m):
    """Symmetric square root of an SPD matrix and its batched product."""
    e, q = torch.linalg.eigh(m)
    half = q @ torch.diag(e.sqrt()) @ q.T
    return half, lambda v: v @ half


def test_split_spectral_preconditioner_spd_exact_at_full_rank_and_composes():
    """``P = C P_B C`` with ``B = C A C``: SPD, ``= A^{-1}`` when the basis spans R^p, and
    with a bulk preconditioner that is right on a wide band but misjudges a few directions
    (the K-FAC case) fewer products than the bulk or the deflation alone."""
    p, reg = 300, 1e-2
    g = torch.Generator().manual_seed(5)
    # H: 20 outliers, a band of 120 eigenvalues in [0.05, 0.2], the rest ~0
    eigs = torch.cat(
        [
            torch.logspace(1.5, -0.5, 20, dtype=F64),
            torch.linspace(0.05, 0.2, 120, dtype=F64),
            torch.linspace(-0.003, 0.003, p - 140, dtype=F64),
        ]
    )
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))
    h = q @ torch.diag(eigs) @ q.T
    h = 0.5 * (h + h.T)
    a = h + reg * torch.eye(p, dtype=F64)

    def op(m):
        return m @ a

    # bulk: the band and the null space right, the 20 outliers scaled down 30x
    bulk_eigs = eigs.clone()
    bulk_eigs[:20] /= 30
    bulk = q @ torch.diag((bulk_eigs.clamp_min(0) + reg) ** -1) @ q.T
    _c, half = _half_of(0.5 * (bulk + bulk.T))
    full = split_spectral_preconditioner(op, half, p, rank=p, block_size=50, dtype=F64)
    eye = torch.eye(p, dtype=F64)
    pm = full(eye)
    torch.testing.assert_close(pm, pm.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(pm @ a, eye, atol=1e-7, rtol=0)
    assert full.hvps == p
    pre = split_spectral_preconditioner(op, half, p, rank=40, block_size=4, dtype=F64)
    assert bool((torch.linalg.eigvalsh(0.5 * (pre(eye) + pre(eye).T)) > 0).all())
    b = _rhs(10, p, seed=6)
    ref = torch.linalg.solve(a, b.T).T
    counts = {}
    for name, m in (
        ("plain", None),
        ("bulk", lambda v: v @ bulk),
        ("spectral", spectral_preconditioner(op, p, reg, rank=40, block_size=4, dtype=F64)),
        ("split", pre),
    ):
        x, info = cg_solve(op, b, 2000, 1e-8, preconditioner=m)
        assert bool(info.converged.all()), name
        assert bool(((x - ref).norm(dim=1, keepdim=True) <= _error_bound(a, x, b)).all()), name
        counts[name] = info.hvps
    # deterministic (same seeds): plain 1372, bulk 259, spectral 611, split 80 when written
    assert counts["split"] * 2 < min(counts["bulk"], counts["spectral"]), counts
    with pytest.raises(IHVPUsageError, match="level"):
        split_spectral_preconditioner(op, half, p, rank=4, level=0.0)


@pytest.mark.parametrize("kind", ["kfac-spectral", "ekfac-spectral", "gkfac-spectral"])
def test_if_cg_kfac_spectral_equals_explicit(kind):
    pb = cached_random_mlp(n_train=20, n_test=4, hidden=5)
    task = AttributionTask(
        loss_func=pb.loss_if_nowd, model=pb.model, checkpoints=pb.model.state_dict()
    )
    reg = pb.weight_decay
    train, test = pb.train_loader(20), pb.test_loader(4)
    ref_att = IFAttributorExplicit(task, regularization=reg, verbose=False)
    ref_att.cache(train)
    ref = ref_att.attribute(train, test)
    p = pb.flat_params().numel()
    hvps = {}
    for pre, rank in ((None, 1), (kind, 8), (kind, p)):
        att = IFAttributorCG(
            task,
            max_iter=400,
            tol=1e-9,
            regularization=reg,
            verbose=False,
            preconditioner=pre,
            preconditioner_rank=rank,
        )
        att.cache(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLP Hessian may be indefinite
            got = att.attribute(train, test)
        info = att.last_cg_info
        assert bool(info.converged.all())
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8 * ref.abs().max())
        hvps[(pre, rank)] = info.hvps
        assert info.preconditioner_hvps == (rank if pre else 0)
    # full rank: P = (H + reg I)^{-1} (on an SPD H + reg I), <= 2 steps per row
    assert hvps[(kind, p)] <= 2 * 4 < hvps[(None, 1)]


def test_gkfac_spectral_rejects_batches_without_class_labels():
    pb = cached_random_mlp(n_train=20, n_test=4, hidden=5)
    task = AttributionTask(
        loss_func=pb.loss_if_nowd, model=pb.model, checkpoints=pb.model.state_dict()
    )
    x, y = next(iter(pb.train_loader(20)))

    def loss3(params, data):  # (inputs, labels, weights): not a plain (x, y) batch
        return pb.loss_if_nowd(params, data[:2])

    task3 = AttributionTask(loss_func=loss3, model=pb.model, checkpoints=pb.model.state_dict())
    att = IFAttributorCG(task3, preconditioner="gkfac-spectral", verbose=False)
    with pytest.raises(ValueError, match="gkfac-spectral.*batch 0"):
        att.cache([(x, y, torch.ones(len(y)))])
    with pytest.raises(ValueError, match="preconditioner must be"):
        IFAttributorCG(task, preconditioner="kfac-spectrall")
