"""Preconditioned CG / Neumann / LiSSA and CG on indefinite systems, against explicit
solves (torch.linalg.solve, dense Kronecker products, IFAttributorExplicit)."""

import warnings

import pytest
import torch

from dattri.algorithm import IFAttributorCG, IFAttributorExplicit
from dattri.func.hessian import ihvp_at_x_cg, ihvp_at_x_lissa, ihvp_cg, neumann_solve
from dattri.func.preconditioners import (
    KroneckerBlock,
    diagonal_preconditioner,
    hutchinson_diagonal,
    kfac_block,
    kronecker_preconditioner,
)
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

pytestmark = pytest.mark.filterwarnings("ignore:Layer-hook gradients:UserWarning")


def _quadratic(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    a = 0.5 * (a + a.T)
    return a, (lambda x: 0.5 * x @ a @ x)


def test_cg_on_indefinite_system_returns_the_solve():
    """Regression (issue #15): rows used to stop at the first negative curvature as 0."""
    a, func = _quadratic([-2.0, -1.0, -0.5, 0.5, 1.0, 3.0])
    x = torch.zeros(6, dtype=torch.float64)
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = ihvp_at_x_cg(func, x, max_iter=30, tol=1e-11)
    with pytest.warns(UserWarning, match="negative curvature") as rec:
        got = solver(v)
    assert len([r for r in rec if "negative curvature" in str(r.message)]) == 1  # once
    ref = torch.linalg.solve(a, v.T).T
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)
    info = solver.info
    assert bool(info.converged.all()) and bool(info.negative_curvature.any())
    assert "negative curvature" in info.message
    # regularization making it indefinite but non-singular: same through ihvp_cg
    f = ihvp_cg(func, max_iter=30, tol=1e-11, regularization=0.75)
    with pytest.warns(UserWarning, match="negative curvature"):
        got = f((x,), v)
    ref = torch.linalg.solve(a + 0.75 * torch.eye(6, dtype=torch.float64), v.T).T
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)


def test_preconditioned_cg_same_solve_fewer_products():
    g = torch.Generator().manual_seed(0)
    p = 60
    scales = torch.logspace(0, 4, p, dtype=torch.float64)  # badly scaled diagonal
    noise = torch.randn(p, p, generator=g, dtype=torch.float64) * 0.05
    a = torch.diag(scales) + (noise @ noise.T) * scales.sqrt()[:, None] * scales.sqrt()[None]
    a = 0.5 * (a + a.T)

    def func(x):
        return 0.5 * x @ a @ x

    x = torch.zeros(p, dtype=torch.float64)
    v = torch.randn(4, p, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve(a, v.T).T
    plain = ihvp_at_x_cg(func, x, max_iter=500, tol=1e-10)
    pre = ihvp_at_x_cg(
        func, x, max_iter=500, tol=1e-10, preconditioner=diagonal_preconditioner(a.diagonal())
    )
    for solver in (plain, pre):
        torch.testing.assert_close(solver(v), ref, rtol=1e-7, atol=1e-12)
        assert bool(solver.info.converged.all())
    assert pre.info.hvps * 3 <= plain.info.hvps
    # the same from an HVP-estimated diagonal (Hutchinson, 256 probes)
    diag = hutchinson_diagonal(lambda m: m @ a, p, 256, dtype=torch.float64)
    assert (diag / a.diagonal() - 1).abs().max() < 1.0
    est = ihvp_at_x_cg(
        func, x, max_iter=500, tol=1e-10, preconditioner=diagonal_preconditioner(diag.abs())
    )
    torch.testing.assert_close(est(v), ref, rtol=1e-7, atol=1e-12)
    # Neumann series with the exact-diagonal preconditioner converges too
    sol, info = neumann_solve(
        lambda m: m @ a,
        v,
        5000,
        1e-9,
        scaling=1.2
        * float(
            torch.linalg.eigvalsh(
                a / a.diagonal().sqrt()[:, None] / a.diagonal().sqrt()[None]
            ).max()
        ),
        preconditioner=diagonal_preconditioner(a.diagonal()),
    )
    assert bool(info.converged.all())
    torch.testing.assert_close(sol, ref, rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError, match="positive"):
        diagonal_preconditioner(torch.tensor([1.0, -1.0]))


def test_kronecker_preconditioner_is_the_dense_kron_inverse():
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 3, 4

    def spd(k):
        m = torch.randn(k, k, generator=g, dtype=torch.float64)
        return m @ m.T + 0.1 * torch.eye(k, dtype=torch.float64)

    cov_a, cov_s = spd(d_in + 1), spd(d_out)
    # flat layout: [2 other entries | W (d_out*d_in, row-major) | b (d_out)]
    p = 2 + d_out * d_in + d_out
    blk = kfac_block(cov_a, cov_s, weight_offset=2, bias_offset=2 + d_out * d_in)
    damping = 0.3
    pre = kronecker_preconditioner([blk], p, damping, fallback=2.0)
    v = torch.randn(5, p, generator=g, dtype=torch.float64)
    # dense reference: the bias is the last column of [W | b]
    mat = torch.cat([v[:, 2 : 2 + d_out * d_in].reshape(5, d_out, d_in), v[:, -d_out:, None]], 2)
    dense = torch.kron(cov_s, cov_a) + damping * torch.eye(d_out * (d_in + 1), dtype=torch.float64)
    sol = torch.linalg.solve(dense, mat.reshape(5, -1).T).T.reshape(5, d_out, d_in + 1)
    got = pre(v)
    torch.testing.assert_close(got[:, :2], v[:, :2] / 2.3)
    torch.testing.assert_close(got[:, 2 : 2 + d_out * d_in], sol[..., :d_in].reshape(5, -1))
    torch.testing.assert_close(got[:, -d_out:], sol[..., d_in])
    with pytest.raises(ValueError, match="overlap"):
        kronecker_preconditioner(
            [blk, KroneckerBlock(0, None, blk.q_a[:-1, :-1], blk.q_s, blk.lam[:, :-1])], p, 1.0
        )


@pytest.mark.parametrize("kind", ["diagonal", "kfac", "ekfac"])
def test_if_cg_preconditioned_equals_explicit(kind):
    pb = cached_random_mlp(n_train=20, n_test=4, hidden=5)
    task = AttributionTask(
        loss_func=pb.loss_if_nowd, model=pb.model, checkpoints=pb.model.state_dict()
    )
    reg = pb.weight_decay
    train, test = pb.train_loader(20), pb.test_loader(4)
    ref_att = IFAttributorExplicit(task, regularization=reg, verbose=False)
    ref_att.cache(train)
    ref = ref_att.attribute(train, test)
    results = {}
    for pre in (None, kind):
        att = IFAttributorCG(
            task, max_iter=400, tol=1e-9, regularization=reg, verbose=False, preconditioner=pre
        )
        att.cache(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLP Hessian may be indefinite
            got = att.attribute(train, test)
        assert bool(att.last_cg_info.converged.all())
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8 * ref.abs().max())
        results[pre] = att.last_cg_info.hvps
    assert results[kind] < results[None]


def test_preconditioned_lissa_same_fixed_point():
    pb = cached_random_mlp(n_train=20, n_test=4, hidden=5)
    params = pb.flat_params()
    names = [n for n, _ in pb.model.named_parameters()]
    shapes = [p.shape for _, p in pb.model.named_parameters()]

    def loss(flat, x, y):
        ps, off = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = flat[off : off + s.numel()].reshape(s)
            off += s.numel()
        return pb.loss_if(ps, (x, y))

    n = pb.x_train.shape[0]
    v = torch.randn(
        2, params.numel(), generator=torch.Generator().manual_seed(0), dtype=params.dtype
    )
    h = torch.func.hessian(loss)(params, pb.x_train, pb.y_train)
    ref = torch.linalg.solve(h + 0.5 * torch.eye(h.shape[0], dtype=h.dtype), v.T).T
    diag = h.diagonal().abs() + 0.5
    common = dict(batch_size=n, num_repeat=1, verbose=False)  # full batch: deterministic
    # scaling above lambda_max(P H) (about 1 for a good diagonal preconditioner)
    p_op = diagonal_preconditioner(diag)
    scale = 1.5
    pre = ihvp_at_x_lissa(
        loss,
        params,
        pb.x_train,
        pb.y_train,
        recursion_depth=200,
        damping=0.5 / scale,
        scaling=scale,
        preconditioner=p_op,
        **common,
    )(v)
    torch.testing.assert_close(pre, ref, rtol=1e-6, atol=1e-8)
