"""LoGra, FactGraSS and BlockProjectedIF on the shared pipeline (issue #18).

For each of the three attributors, on a tiny float64 MLP:

* an interrupted ``cache_dir`` cache (the loader raises after 2 batches) resumes, only
  the missing batches are recomputed, and the scores equal an uninterrupted run;
* ``attribute(..., out=path.npy)`` equals the in-memory matrix;
* ``attribute_topk`` equals ``torch.topk`` of the full matrix;
* ``self_attribute`` equals the diagonal of ``attribute(train, train)``;
* 2 gloo ranks (one module-scoped ``torch.multiprocessing`` run for all three) give
  the single-process results, in memory and through a shared store + score file;
* ``max_memory``: the planned tiles and gradient chunks fit the budget, and the
  scores do not change.

The in-memory scores themselves are checked against brute-force references in
``tests/test_algorithm_logra.py`` and against the golden files.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor
from dattri.algorithm.factgrass import FactGraSSAttributor
from dattri.algorithm.logra import LoGraAttributor
from dattri.algorithm.score.tiles import BUDGET_SHARES
from dattri.algorithm.store.host_rows import HostRows
from dattri.algorithm.store.memmap_store import StoredRows
from dattri.task import AttributionTask
from tests.gloo import run_on_ranks
from tests.problems import cached_random_mlp

N_TRAIN, N_TEST, BATCH = 22, 5, 4  # 6 training batches, the last one of 2
WORLD = 2
TOL = 1e-10  # float64 throughout: only the order of the sums differs

METHODS = {
    "logra": (LoGraAttributor, {"proj_params": {"proj_dim_per_layer": 9}, "damping": 0.05}),
    "factgrass": (
        FactGraSSAttributor,
        {"proj_params": {"proj_dim_per_layer": 8}, "blowup_factor": 2},  # auto damping
    ),
    "block": (
        BlockProjectedIFAttributor,
        {
            "sparsifier_params": {"proj_dim": 3},
            "projector_params": {"proj_dim": 8, "proj_type": "sjlt"},
            "damping": 0.1,
        },
    ),
}


def _problem():
    pb = cached_random_mlp(n_train=N_TRAIN, n_test=N_TEST, d_in=5, hidden=6, train=False)
    train = DataLoader(TensorDataset(pb.x_train, pb.y_train), batch_size=BATCH)
    test = DataLoader(TensorDataset(pb.x_test, pb.y_test), batch_size=3)
    return pb, train, test


def _make(name: str, **kw) -> BlockProjectedIFAttributor:
    pb, _, _ = _problem()
    model = pb.model

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    cls, settings = METHODS[name]
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    return cls(task, verbose=False, **settings, **kw)


class _Boom(RuntimeError):
    pass


def _count_train_batches(att, fail_after: int | None = None) -> list[int]:
    """Count (and optionally fail after) the training batches the featurizer sees."""
    calls = [0]
    original = type(att.featurizer).__call__

    def wrapped(self, ckpt_idx, batch, target=False, where=""):
        if not target:
            if fail_after is not None and calls[0] >= fail_after:
                raise _Boom
            calls[0] += 1
        return original(self, ckpt_idx, batch, target, where)

    att.featurizer.__class__ = type("Counted", (type(att.featurizer),), {"__call__": wrapped})
    return calls


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    """In-memory scores, self-influence and top-k of each method."""
    _, train, test = _problem()
    out = {}
    for name in METHODS:
        att = _make(name)
        att.cache(train)
        full = att.attribute(train, test)
        out[name] = {
            "scores": full,
            "train_train": att.attribute(train, train),
            "self": att.self_attribute(train),
        }
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_interrupted_cache_resumes_to_the_same_scores(name, reference, tmp_path):
    _, train, test = _problem()
    folder = tmp_path / "store"
    broken = _make(name, cache_dir=folder)
    calls = _count_train_batches(broken, fail_after=2)
    with pytest.raises(_Boom):
        broken.cache(train)
    assert calls[0] == 2
    resumed = _make(name, cache_dir=folder)
    counter = _count_train_batches(resumed)
    resumed.cache(train)
    assert counter[0] == len(train) - 2  # only the missing batches were compressed
    assert isinstance(resumed._store.features[0], StoredRows)
    scores = resumed.attribute(train, test)
    fresh = _make(name, cache_dir=tmp_path / "fresh")
    fresh.cache(train)
    assert torch.equal(scores, fresh.attribute(train, test))
    expected = reference[name]["scores"]
    torch.testing.assert_close(scores, expected, rtol=TOL, atol=TOL)
    # a complete store is reused without compressing anything
    again = _make(name, cache_dir=folder)
    assert _count_train_batches(again, fail_after=0) == [0]
    again.cache(train)
    assert torch.equal(again.attribute(train, test), scores)
    # float32 storage: same scores to float32 rounding
    half = _make(name, cache_dir=tmp_path / "f32", store_dtype="float32")
    half.cache(train)
    torch.testing.assert_close(half.attribute(train, test), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_out_file_topk_and_self_attribute(name, reference, tmp_path):
    _, train, test = _problem()
    ref = reference[name]
    full = ref["scores"]
    att = _make(name)
    att.cache(train)
    mapped = att.attribute(train, test, out=tmp_path / "scores.npy")
    assert mapped.dtype == torch.float32 and mapped.shape == (N_TRAIN, N_TEST)
    torch.testing.assert_close(mapped, full.float(), rtol=1e-6, atol=1e-7)
    assert np.load(tmp_path / "scores.npy").shape == (N_TRAIN, N_TEST)
    # another loader (same rows, other batches): featurized, same numbers
    other = DataLoader(train.dataset, batch_size=5)
    torch.testing.assert_close(att.attribute(other, test), full, rtol=TOL, atol=TOL)
    # streamed top-k == torch.topk of the full matrix (both sides)
    for loader in (train, other):
        top = att.attribute_topk(loader, test, k=4)
        assert torch.equal(top.helpful_indices, full.topk(4, dim=0).indices.T)
        assert torch.equal(top.harmful_indices, full.topk(4, dim=0, largest=False).indices.T)
        torch.testing.assert_close(top.helpful_scores, full.topk(4, dim=0).values.T)
    # self-influence == diagonal, cached and featurized rows
    diag = ref["train_train"].diagonal()
    assert (diag > 0).all()
    torch.testing.assert_close(ref["self"], diag, rtol=TOL, atol=TOL)
    torch.testing.assert_close(att.self_attribute(other), diag, rtol=TOL, atol=TOL)
    torch.testing.assert_close(att.compute_self_attribution(), diag, rtol=TOL, atol=TOL)


def test_single_pass_iterators(reference):
    """Generators: cached once; an uncached one is read once and scored."""
    _, train, test = _problem()
    full = reference["logra"]["scores"]
    att = _make("logra")
    gen = iter(list(train))
    att.cache(gen)
    torch.testing.assert_close(att.attribute(gen, test), full, rtol=TOL, atol=TOL)
    other = iter(list(DataLoader(train.dataset, batch_size=5)))
    torch.testing.assert_close(att.attribute(other, iter(list(test))), full, rtol=TOL, atol=TOL)
    diag = reference["logra"]["train_train"].diagonal()
    torch.testing.assert_close(att.self_attribute(iter(list(train))), diag, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_max_memory_plans_tiles_within_the_budget(name, reference, tmp_path):
    _, train, test = _problem()
    budget = 6_000
    att = _make(name, max_memory=budget)
    att.cache(train)
    d = att.featurizer.out_dim
    plan = att.tile_plan(N_TEST)
    reserved = N_TEST * d * 8 + 8 * sum(k * k for k in att.layer_dims)  # test rows, Fisher
    share = (budget - reserved) // BUDGET_SHARES
    assert plan.train_block * d * 8 <= share  # training rows of a tile
    assert plan.test_block * d * 8 <= share  # test rows of a tile
    assert plan.train_block * plan.test_block * 8 <= share  # the score tile
    assert reserved + 6 * share <= budget  # with room for a transient copy of each
    assert plan.train_block < N_TRAIN and plan.test_block < N_TEST  # really tiled
    # rows over half the budget are spilled to a temporary memmap store
    spilled = 2 * N_TRAIN * d * 8 > budget
    assert isinstance(att._store.features[0], StoredRows if spilled else HostRows)
    grad_rows = att.featurizer.grad_rows  # samples compressed at once
    assert grad_rows is not None
    assert grad_rows == max(1, budget // BUDGET_SHARES // (3 * 8 * att.featurizer.sample_numel))
    scores = att.attribute(train, test)
    assert att._store.block_rows == plan.train_block  # the tiles that were used
    torch.testing.assert_close(scores, reference[name]["scores"], rtol=TOL, atol=TOL)
    top = att.attribute_topk(train, test, k=3)
    assert torch.equal(top.helpful_indices, scores.topk(3, dim=0).indices.T)
    with pytest.raises(ValueError, match="too small"):
        _make(name, max_memory=500).cache(train)


# ---------------------------------------------------------------- torch.distributed
def run_all(store_dir: str) -> dict[str, torch.Tensor]:
    """Every method in memory and through a shared store + score file (any world size)."""
    _, train, test = _problem()
    out = {}
    other = DataLoader(train.dataset, batch_size=5)
    for name in METHODS:
        att = _make(name, chunk_size=1)  # row blocks of one batch: shared over the ranks
        calls = _count_train_batches(att)
        att.cache(train)
        out[f"{name}/cache_calls"] = torch.tensor(calls[0])
        out[f"{name}/scores"] = att.attribute(train, test)
        out[f"{name}/other"] = att.attribute(other, test)
        out[f"{name}/self"] = att.self_attribute(train)
        out[f"{name}/self_other"] = att.self_attribute(other)
        top = att.attribute_topk(train, test, k=3)
        out[f"{name}/top"] = top.helpful_indices
        out[f"{name}/bottom"] = top.harmful_indices
        stored = _make(name, cache_dir=os.path.join(store_dir, name), max_memory=20_000)
        stored.cache(train)
        path = os.path.join(store_dir, f"{name}.npy")
        out[f"{name}/store"] = stored.attribute(train, test, out=path).clone()
        out[f"{name}/store_self"] = stored.compute_self_attribution()
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    ranks = run_on_ranks(run_all, tmp_path_factory.mktemp("dist"))
    single = run_all(str(tmp_path_factory.mktemp("single")))
    return single, ranks


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_ranks_equal_one_process(spawned, name):
    single, ranks = spawned
    assert int(single[f"{name}/cache_calls"]) == len(_problem()[1])
    ref = single[f"{name}/scores"]
    torch.testing.assert_close(single[f"{name}/store"], ref.float(), rtol=1e-6, atol=1e-7)
    for res in ranks:
        for key in ("scores", "other", "self", "self_other", "store", "store_self"):
            want = single[f"{name}/{key}"]
            got = res[f"{name}/{key}"]
            assert got.shape == want.shape, key
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * float(ref.abs().max()))
        # each rank compressed only its share of the training batches
        assert int(res[f"{name}/cache_calls"]) == len(_problem()[1]) // WORLD
        for key in ("top", "bottom"):
            assert torch.equal(res[f"{name}/{key}"], single[f"{name}/{key}"]), key
