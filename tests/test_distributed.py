"""torch.distributed (2-process gloo) gives the single-process scores.

One ``torch.multiprocessing`` run of two processes (module fixture, fork start)
computes, on each rank, TRAK (in memory, with a shared on-disk store + score file,
top-k), TracIn, IF-CG, IF-explicit and EK-FAC
on a small MLP with the training set sharded over the ranks; the tests compare every
rank's result with the same computation in this (single) process to 1e-5.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.if_ekfac import IFAttributorEKFAC
from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
from dattri.algorithm.runtime.distributed import (
    all_reduce_sum,
    gather_rows,
    rank_world,
    row_offset,
    shard_batches,
    shard_range,
)
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.params.projection import TracInProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

pytestmark = pytest.mark.filterwarnings("ignore:IFAttributorCG.*did not reach tol:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TOL = 1e-5


def _problem():
    p = cached_random_mlp(n_train=22, n_test=5, train=False)
    model = copy.deepcopy(p.model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    second = {
        k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()
    }
    train = DataLoader(TensorDataset(p.x_train, p.y_train), batch_size=8)  # 3 batches, last 6
    test = DataLoader(TensorDataset(p.x_test, p.y_test), batch_size=5)
    return p, model, [base, second], train, test


def _losses(model):
    def loss_batch(params, data):  # IF convention: (1, ...) sample or a whole batch
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def loss_sample(params, data):  # un-batched sample
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return loss_batch, loss_sample


def _margin_prob(model):
    def margin(params, data):
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        logp = -nn.functional.cross_entropy(logits, y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def prob(params, data):
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-nn.functional.cross_entropy(logits, y.unsqueeze(0)))

    return margin, prob


def run_methods(store_dir: str) -> dict[str, torch.Tensor]:
    """Every scale-relevant method on the shared problem (any number of ranks)."""
    _, model, ckpts, train, test = _problem()
    out: dict[str, torch.Tensor] = {}
    margin, prob = _margin_prob(model)
    loss_batch, loss_sample = _losses(model)
    proj = TRAKProjectionParams(proj_dim=16, proj_seed=1)
    trak = TRAKAttributor(
        AttributionTask(margin, model, ckpts), prob, proj, regularization=1e-3, verbose=False
    )
    trak.cache(train)
    out["trak"] = trak.attribute(test)
    top = trak.attribute_topk(None, test, k=5)
    out["trak_top_idx"], out["trak_top_val"] = top.helpful_indices, top.helpful_scores
    out["trak_bot_idx"] = top.harmful_indices
    other = DataLoader(train.dataset, batch_size=3)  # not the cached loader: featurized
    out["trak_other"] = trak.attribute(test, other)
    stored = TRAKAttributor(
        AttributionTask(margin, model, ckpts),
        prob,
        proj,
        regularization=1e-3,
        verbose=False,
        cache_dir=os.path.join(store_dir, "trak"),
        max_memory=40_000,
    )
    stored.cache(train)
    scores = stored.attribute(test, out=os.path.join(store_dir, "scores.npy"))
    out["trak_store"] = scores.clone()
    tracin = TracInAttributor(
        AttributionTask(loss_sample, model, ckpts),
        weight_list=[0.5, 1.0],
        normalized_grad=False,
        proj_params=TracInProjectionParams(proj_dim=16),
        verbose=False,
    )
    tracin.cache(train)
    out["tracin"] = tracin.attribute(train, test)
    task_if = AttributionTask(loss_batch, model, ckpts[0])
    cg = IFAttributorCG(task_if, max_iter=5, tol=1e-6, regularization=1.0, verbose=False)
    cg.cache(train)
    out["if_cg"] = cg.attribute(train, test)
    explicit = IFAttributorExplicit(task_if, regularization=1.0, verbose=False)
    explicit.cache(train)
    out["if_explicit"] = explicit.attribute(train, test)
    ekfac = IFAttributorEKFAC(task_if, verbose=False)
    ekfac.cache(train)
    out["ekfac"] = ekfac.attribute(train, test)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert rank_world() == (rank, world)
        # helpers
        x = torch.full((2, 3), float(rank + 1))
        assert torch.equal(all_reduce_sum(x), torch.full((2, 3), 3.0))
        assert all_reduce_sum({"a": [x, 1.5]})["a"][1] == 3.0
        rows = torch.arange(rank + 1, dtype=torch.float64)[:, None] + 10 * rank
        assert gather_rows(rows).flatten().tolist() == [0.0, 10.0, 11.0]
        assert row_offset(rank + 1) == (rank, 3)
        assert [i for i, _ in shard_batches(list(range(5)))] == list(shard_range(5))
        results = run_methods(os.path.join(out_dir, "store"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    folder = tmp_path_factory.mktemp("dist")
    # fork: the children inherit the imported modules (spawn would re-import torch and
    # dattri in each child); each child sets one thread before any computation.
    mp.start_processes(
        _worker,
        args=(WORLD, str(folder / "init"), str(folder)),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    single = run_methods(str(tmp_path_factory.mktemp("single")))
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return single, ranks


def test_shard_range_covers_everything() -> None:
    for n in (0, 1, 5, 12):
        for w in (1, 2, 3, 5):
            parts = [list(shard_range(n, r, w)) for r in range(w)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(3, 2, 2)


def test_helpers_single_process() -> None:
    assert rank_world() == (0, 1)
    x = torch.ones(3)
    assert all_reduce_sum(x) is x
    assert gather_rows(x) is x
    assert [b for _, b in shard_batches(iter([7, 8, 9]), limit=2)] == [7, 8]


@pytest.mark.parametrize("name", ["trak", "trak_store", "tracin", "if_cg", "if_explicit", "ekfac"])
def test_two_ranks_equal_single_process(spawned, name: str) -> None:
    single, ranks = spawned
    ref = single[name].to(torch.float64)
    assert ref.shape == (22, 5)
    assert ref.abs().max() > 0
    for res in ranks:
        got = res[name].to(torch.float64)
        torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL * float(ref.abs().max()))


def test_store_rows_and_score_file_equal_in_memory(spawned) -> None:
    single, ranks = spawned
    # float64 store, tiles from max_memory: equal to the in-memory scores
    torch.testing.assert_close(
        single["trak_store"].double(), single["trak"].double(), rtol=1e-6, atol=1e-9
    )
    for res in ranks:
        torch.testing.assert_close(res["trak_store"], ranks[0]["trak_store"], rtol=0, atol=0)


def test_two_ranks_topk_equal_single(spawned) -> None:
    single, ranks = spawned
    full = single["trak"]
    assert torch.equal(single["trak_top_idx"], full.topk(5, dim=0).indices.T)
    for res in ranks:
        assert torch.equal(res["trak_top_idx"], single["trak_top_idx"])
        assert torch.equal(res["trak_bot_idx"], single["trak_bot_idx"])
        torch.testing.assert_close(res["trak_top_val"], single["trak_top_val"], rtol=TOL, atol=0)


def test_torchrun_example_single_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "torchrun_attribute.py"),
            "--quick",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scores = np.load(tmp_path / "scores.npy")
    assert scores.ndim == 2 and np.isfinite(scores).all()


@pytest.mark.slow
def test_torchrun_example_two_processes(tmp_path: Path) -> None:
    """The example under ``torchrun --nproc_per_node 2`` gives the one-process scores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "examples" / "torchrun_attribute.py")
    for folder, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
    ):
        proc = subprocess.run(
            [*launcher, script, "--quick", "--out-dir", str(tmp_path / folder)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    one = np.load(tmp_path / "one" / "scores.npy")
    two = np.load(tmp_path / "two" / "scores.npy")
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())
