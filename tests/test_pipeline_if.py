"""The influence-function family on the shared pipeline (issue #18 test matrix).

For every IF attributor (explicit, CG, LiSSA, Arnoldi, DataInf, EK-FAC; RelatIF through
``relatif_method``) on a small MLP: an interrupted ``cache_dir`` store resumes to the
uninterrupted scores, ``attribute(..., out=)`` equals the in-memory matrix,
``attribute_topk`` equals ``torch.topk`` of it, ``self_attribute`` its diagonal,
``max_memory`` tiles stay in the budget and give the same scores, and a 2-process gloo
run (training rows, and LiSSA's test batches, split over the ranks) equals one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dattri.algorithm.features.representations import TrainRepFeaturizer
from dattri.algorithm.if_ekfac import IFAttributorEKFAC
from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri.algorithm.score.tiles import BUDGET_SHARES
from dattri.task import AttributionTask
from tests.gloo import run_on_ranks
from tests.test_distributed import _losses, _problem

pytestmark = pytest.mark.filterwarnings(
    "ignore:IFAttributorCG.*did not reach tol:UserWarning",
    "ignore:IFAttributorLiSSA with zero damping:UserWarning",
)

#: float32 scores of a sum over ~100 parameters: reassociation (tiles, rank sums of HVPs)
#: moves them by a few ulps of the largest entry.
TOL = 1e-5


def _factories() -> dict[str, Callable[..., object]]:
    return {
        "explicit": lambda t, **kw: IFAttributorExplicit(t, regularization=1.0, **kw),
        "cg": lambda t, **kw: IFAttributorCG(t, max_iter=6, regularization=1.0, **kw),
        "lissa": lambda t, **kw: IFAttributorLiSSA(
            t, batch_size=4, recursion_depth=30, damping=0.1, scaling=20.0, **kw
        ),
        "arnoldi": lambda t, **kw: IFAttributorArnoldi(
            t, proj_dim=8, max_iter=20, regularization=0.1, **kw
        ),
        "datainf": lambda t, **kw: IFAttributorDataInf(t, regularization=0.1, **kw),
        "ekfac": lambda t, **kw: IFAttributorEKFAC(t, damping=0.1, **kw),
    }


NAMES = sorted(_factories())


def _make(name: str, **kw: object) -> tuple[object, DataLoader, DataLoader]:
    _, model, ckpts, train, test = _problem()
    loss_batch, _ = _losses(model)
    attr = _factories()[name](AttributionTask(loss_batch, model, ckpts[0]), verbose=False, **kw)
    return attr, train, test


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    ref = ref.double()
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


# ------------------------------------------------------------------ one process
@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    out = {}
    for name in NAMES:
        attr, train, test = _make(name)
        attr.cache(train)
        out[name] = attr.attribute(train, test)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_out_topk_self_equal_the_full_matrix(name: str, reference, tmp_path: Path) -> None:
    attr, train, test = _make(name)
    attr.cache(train)
    full = reference[name]
    assert full.shape == (22, 5) and full.abs().max() > 0
    mapped = attr.attribute(train, test, out=tmp_path / "s.npy")
    _close(mapped, full)
    _close(torch.from_numpy(np.load(tmp_path / "s.npy")), full)
    top = attr.attribute_topk(train, test, k=4)
    assert torch.equal(top.helpful_indices, full.topk(4, dim=0).indices.T)
    assert torch.equal(top.harmful_indices, (-full).topk(4, dim=0).indices.T)
    _close(attr.self_attribute(train), attr.attribute(train, train).diagonal())
    theta = attr.attribute(train, test, relatif_method="theta")
    theta_top = attr.attribute_topk(train, test, k=3, relatif_method="theta")
    assert torch.equal(theta_top.helpful_indices, theta.topk(3, dim=0).indices.T)


class _Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("name", NAMES)
def test_interrupted_store_resumes_to_the_same_scores(
    name: str, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attr, train, test = _make(name, cache_dir=tmp_path / "store")
    calls = {"n": 0}
    original = TrainRepFeaturizer.__call__

    def dies_after_two_batches(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise _Interrupted
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainRepFeaturizer, "__call__", dies_after_two_batches)
    with pytest.raises(_Interrupted):
        attr.cache(train)
    monkeypatch.setattr(TrainRepFeaturizer, "__call__", original)
    again, _, _ = _make(name, cache_dir=tmp_path / "store")
    again.cache(train)  # resumes: the first two batches are read back, not recomputed
    _close(again.attribute(train, test), reference[name])
    # a third attributor reuses the complete store without featurizing anything
    monkeypatch.setattr(TrainRepFeaturizer, "__call__", dies_after_two_batches)
    calls["n"] = 10
    reused, _, _ = _make(name, cache_dir=tmp_path / "store")
    reused.cache(train)
    _close(reused.attribute(train, test), reference[name])
    # another loader (not the cached one) is featurized, not read from the store
    monkeypatch.setattr(TrainRepFeaturizer, "__call__", original)
    other = DataLoader(train.dataset, batch_size=5)
    _close(reused.attribute(other, test), reference[name])


@pytest.mark.parametrize("name", ["cg", "explicit"])
def test_max_memory_tiles_fit_the_budget(name: str, reference, tmp_path: Path) -> None:
    budget = 60_000
    attr, train, test = _make(name, max_memory=budget)
    attr.cache(train)
    plan = attr._plan(train, 5)
    share = budget // BUDGET_SHARES
    p = attr.task.grad_layout(None)[0]
    assert plan.test_block < 5  # the budget forces column tiles
    assert plan.train_block * plan.test_block * 4 <= share  # float32 score tile
    assert plan.train_block * p * 4 <= share and plan.test_block * p * 4 <= share
    assert plan.grad_rows is not None and plan.grad_rows * 3 * 4 * p <= share
    _close(attr.attribute(train, test), reference[name])
    stored, _, _ = _make(name, max_memory=budget, cache_dir=tmp_path / "store")
    stored.cache(train)
    _close(stored.attribute(train, test), reference[name])
    assert stored._store.block_rows == stored._plan(train, 5).train_block  # rows per tile
    small, tr, te = _make(name, max_memory=100)
    small.cache(tr)
    with pytest.raises(ValueError, match="max_memory=.*too small"):
        small.attribute(tr, te)


def test_an_option_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match="cache_dir"):
        _make("cg", cache_dir=3)
    with pytest.raises(ValueError, match="max_memory"):
        _make("cg", max_memory="lots")


# ------------------------------------------------------------------- two ranks
def run_family(store_dir: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in NAMES:
        attr, train, test = _make(name, cache_dir=os.path.join(store_dir, name))
        attr.cache(train)
        out[name] = attr.attribute(train, test)
        out[f"{name}_file"] = attr.attribute(
            train, test, out=os.path.join(store_dir, f"{name}.npy")
        ).clone()
        other = DataLoader(train.dataset, batch_size=5)  # featurized, rows split by rank
        out[f"{name}_other"] = attr.attribute(other, test)
        out[f"{name}_self"] = attr.self_attribute(train)
        out[f"{name}_top"] = attr.attribute_topk(train, test, k=3).helpful_indices
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    return run_on_ranks(run_family, tmp_path_factory.mktemp("if_dist"))


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_equal_one_process(name: str, reference, two_ranks) -> None:
    ref = reference[name]
    for res in two_ranks:
        for key in (name, f"{name}_file", f"{name}_other"):
            _close(res[key], ref)
        assert torch.equal(res[f"{name}_top"], ref.topk(3, dim=0).indices.T)
    _close(two_ranks[0][f"{name}_self"], two_ranks[1][f"{name}_self"], 0.0)
    attr, train, _ = _make(name)
    attr.cache(train)
    _close(two_ranks[0][f"{name}_self"], attr.self_attribute(train))


def test_regularization_is_the_one_damping_name() -> None:
    by_alias, train, test = _make("ekfac")  # damping=0.1 (upstream's name)
    _, model, ckpts, _, _ = _problem()
    task = AttributionTask(_losses(model)[0], model, ckpts[0])
    by_name = IFAttributorEKFAC(task, regularization=0.1, verbose=False)
    for attr in (by_alias, by_name):
        attr.cache(train)
    torch.testing.assert_close(by_name.attribute(train, test), by_alias.attribute(train, test))
    with pytest.raises(ValueError, match="regularization=0.2 and damping=0.1 name the same"):
        IFAttributorEKFAC(task, damping=0.1, regularization=0.2)


def test_curvature_and_its_inverse_are_operators() -> None:
    """``MeanLossHVP @ v`` is the explicit Hessian product; ``CGInverse @ v`` its solve."""
    from dattri.algorithm.solve.inverses import CGInverse

    explicit, train, _ = _make("explicit")
    explicit.cache(train)
    hessian = explicit.hessian(0).double()  # H + 1.0 I, dense, float32 products
    op = explicit.mean_hvp_operator(0, regularization=1.0)
    v = torch.randn(hessian.shape[0], 3, generator=torch.Generator().manual_seed(0))
    scale = float(hessian.abs().max() * v.abs().max()) * hessian.shape[0]
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close((op @ v).double(), hessian @ v.double(), rtol=0, atol=scale * eps)
    torch.testing.assert_close(op @ v[:, 0], (op @ v)[:, 0])
    inverse = CGInverse(op, max_iter=200, tol=1e-6)
    x = (inverse @ v).double()
    residual = (hessian @ x - v.double()).norm(dim=0) / v.double().norm(dim=0)
    assert bool((residual < 1e-4).all()), residual
    assert inverse.last_info.converged.all()
