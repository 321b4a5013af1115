"""Spectral preconditioner built from a sub-sampled Hessian / a kept subset of Ritz pairs
(``preconditioner_subsample``, ``preconditioner_keep``), against explicit Hessians and
``torch.linalg.solve`` in float64."""

import warnings

import pytest
import torch

from dattri.algorithm import IFAttributorCG
from dattri.algorithm.solve.preconditioners import subsample_batches
from dattri.func.hessian import IHVPUsageError, cg_solve
from dattri.func.spectral_precond import block_krylov_eigs, spectral_preconditioner
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp, symmetric_with_eigenvalues

pytestmark = pytest.mark.filterwarnings("ignore:Layer-hook gradients:UserWarning")
F64 = torch.float64


def test_keep_and_product_cost_of_spectral_preconditioner():
    p, reg = 120, 1e-2
    eigs = torch.cat([torch.logspace(2, -1, 20, dtype=F64), torch.linspace(-0.004, 0.01, p - 20)])
    a = symmetric_with_eigenvalues(eigs) + reg * torch.eye(p, dtype=F64)
    a = 0.5 * (a + a.T)

    def op(m):
        return m @ a

    full = spectral_preconditioner(op, p, reg, rank=60, block_size=6, dtype=F64)
    kept = spectral_preconditioner(
        op, p, reg, rank=60, block_size=6, dtype=F64, keep=20, product_cost=0.25
    )
    assert kept.hvps == 60 and kept.hvp_equivalents == pytest.approx(15.0)
    assert full.hvp_equivalents == 60.0
    # the 20 pairs of largest |theta - reg| of the same Krylov space, now exact eigenpairs
    assert kept.eigenvalues.shape == (20,)
    torch.testing.assert_close(kept.eigenvalues, full.eigenvalues[:20])
    torch.testing.assert_close(kept.eigenvalues - reg, eigs[:20], rtol=1e-8, atol=0)
    assert kept.level == pytest.approx(float((kept.eigenvalues[-1] - reg).abs()) + reg)
    m = kept.matrix()
    torch.testing.assert_close(m, m.T, atol=1e-12, rtol=0)
    assert float(torch.linalg.eigvalsh(m).min()) > 0  # SPD
    b = torch.randn(5, p, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = torch.linalg.solve(a, b.T).T
    _, plain = cg_solve(op, b, 500, 1e-10)
    x, info = cg_solve(op, b, 500, 1e-10, preconditioner=kept)
    assert bool(info.converged.all()) and info.hvps * 3 < plain.hvps
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-8 * float(ref.abs().max()))
    # block_krylov_eigs(keep=) forms only the kept pairs: the same ones
    theta, vecs, resid, n = block_krylov_eigs(op, p, 60, block_size=6, dtype=F64)
    t2, v2, r2, n2 = block_krylov_eigs(op, p, 60, block_size=6, dtype=F64, keep=20, center=reg)
    sel = (theta - reg).abs().argsort(descending=True)[:20].sort().values
    assert n == n2 == 60 and t2.shape == (20,)
    torch.testing.assert_close(t2, theta[sel])
    torch.testing.assert_close(v2, vecs[sel])
    torch.testing.assert_close(r2, resid[sel])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(IHVPUsageError, match="`keep`"):
            spectral_preconditioner(op, p, reg, rank=10, dtype=F64, keep=bad)
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(IHVPUsageError, match="`product_cost`"):
            spectral_preconditioner(op, p, reg, rank=10, dtype=F64, product_cost=bad)


def test_subsample_batches_is_seeded_and_sized():
    a = subsample_batches(10, 0.3, seed=4)
    assert a == subsample_batches(10, 0.3, seed=4)  # deterministic for a seed
    assert len(a) == 3 and a == sorted(set(a)) and all(0 <= i < 10 for i in a)
    draws = {tuple(subsample_batches(10, 0.3, seed=s)) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    assert (
        subsample_batches(10, 0.01) == subsample_batches(10, 0.01)
        and len(subsample_batches(10, 0.01)) == 1
    )  # at least one batch
    assert subsample_batches(4, 1.0) == [0, 1, 2, 3]


def _setup():
    pb = cached_random_mlp(n_train=20, n_test=4, hidden=5)
    task = AttributionTask(
        loss_func=pb.loss_if_nowd, model=pb.model, checkpoints=pb.model.state_dict()
    )
    return pb, task


def _spectral_cg(task, reg, **kw):
    """A tight-tolerance ``IFAttributorCG`` with the spectral preconditioner (``kw``)."""
    return IFAttributorCG(
        task,
        max_iter=400,
        tol=1e-10,
        regularization=reg,
        verbose=False,
        preconditioner="spectral",
        **kw,
    )


def _explicit(att, batches):
    """Hessian of the size-weighted mean loss over ``batches`` (``(batch, size)``)."""
    func, params = att._loss_and_params(0)
    n = sum(s for _, s in batches)
    hess = 0
    for batch, size in batches:
        h = torch.autograd.functional.hessian(lambda w, b=batch: func(w, b), params)
        hess = hess + size / n * h
    return 0.5 * (hess + hess.T)


def test_if_cg_subsampled_spectral_solves_the_full_system():
    pb, task = _setup()
    reg = pb.weight_decay
    train = pb.train_loader(4)  # 5 batches of 4
    p = pb.flat_params().numel()
    atts = []
    for _ in range(2):
        att = _spectral_cg(task, reg, preconditioner_rank=p, preconditioner_subsample=0.4)
        att.cache(train)
        atts.append(att)
    att = atts[0]
    pre = att._inverses[0].preconditioner
    # deterministic: the same batches and the same Ritz pairs on a second build
    torch.testing.assert_close(pre.eigenvectors, atts[1]._inverses[0].preconditioner.eigenvectors)
    idx = subsample_batches(5, 0.4, seed=0)
    assert len(idx) == 2
    assert pre.hvps == p and pre.hvp_equivalents == pytest.approx(p * 8 / 20)
    # full rank on the sub-sampled Hessian: P = |H_S + reg I|^{-1} (explicit Hessian)
    batches = list(zip(att._batches, att._sizes))
    a_sub = _explicit(att, [batches[i] for i in idx]) + reg * torch.eye(p, dtype=F64)
    ev, vec = torch.linalg.eigh(a_sub)
    torch.testing.assert_close(
        pre.matrix(), vec @ torch.diag(1 / ev.abs()) @ vec.T, rtol=1e-7, atol=1e-7
    )
    # ... and the solve is still the full-data one
    a = _explicit(att, batches) + reg * torch.eye(p, dtype=F64)
    rhs = task.per_sample_grads((pb.x_test, pb.y_test), keep_batch_dim=True, target=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLP Hessian may be indefinite
        got = att.transform_test_rep(0, rhs)
    assert bool(att.last_cg_info.converged.all())
    ref = torch.linalg.solve(a, rhs.T).T
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8 * float(ref.abs().max()))
    assert att.last_cg_info.preconditioner_hvps == p


def test_if_cg_keep_equals_explicit_solve():
    pb, task = _setup()
    reg = pb.weight_decay
    train = pb.train_loader(4)
    att = _spectral_cg(task, reg, preconditioner_rank=30, preconditioner_keep=10)
    att.cache(train)
    pre = att._inverses[0].preconditioner
    assert pre.eigenvalues.shape == (10,) and pre.hvps == 30
    p = pb.flat_params().numel()
    a = _explicit(att, list(zip(att._batches, att._sizes))) + reg * torch.eye(p, dtype=F64)
    rhs = task.per_sample_grads((pb.x_test, pb.y_test), keep_batch_dim=True, target=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = att.transform_test_rep(0, rhs)
    ref = torch.linalg.solve(a, rhs.T).T
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8 * float(ref.abs().max()))


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.2, True, "0.1", float("nan")])
def test_subsample_rejects_bad_values(bad):
    _pb, task = _setup()
    with pytest.raises(ValueError, match="preconditioner_subsample"):
        IFAttributorCG(task, preconditioner="spectral", preconditioner_subsample=bad)


def test_subsample_and_keep_need_spectral():
    _pb, task = _setup()
    for kind in (None, "kfac", "kfac-spectral"):
        with pytest.raises(ValueError, match="preconditioner_subsample.*'spectral'"):
            IFAttributorCG(task, preconditioner=kind, preconditioner_subsample=0.5)
        with pytest.raises(ValueError, match="preconditioner_keep"):
            IFAttributorCG(task, preconditioner=kind, preconditioner_keep=4)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="preconditioner_keep"):
            IFAttributorCG(task, preconditioner="spectral", preconditioner_keep=bad)
    att = IFAttributorCG(task, preconditioner="spectral", preconditioner_subsample=1)
    assert att.preconditioner_subsample == 1.0
