"""MAGIC on the shared pipeline (issue #18 test matrix): ``out=``, top-k, self-influence,
a string ``max_memory``, and test blocks split over 2 gloo ranks (== one process).
The interrupted-``cache_dir`` resume is in ``test_algorithm_magic``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import MAGICAttributor
from dattri.model_util import SubsetTrainConfig
from tests.test_algorithm_magic import _data, _task, _train, mlp

CFG = {"epochs": 2, "lr": 0.3, "batch_size": 8, "seed": 1, "momentum": 0.9}


def _attributor(**kw: object) -> tuple[MAGICAttributor, DataLoader, DataLoader]:
    x, y, xt, yt = _data(n=16, n_test=5)
    cfg = SubsetTrainConfig(**CFG, dtype=torch.float64)
    sd = _train(mlp, x, y, cfg, seed=1)
    att = MAGICAttributor(_task(mlp, sd), mlp, cfg, test_block_size=2, verbose=False, **kw)
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    test = DataLoader(TensorDataset(xt, yt), batch_size=5)
    att.cache(train)
    return att, train, test


@pytest.fixture(scope="module")
def full() -> torch.Tensor:
    att, train, test = _attributor()
    return att.attribute(train, test)


def test_out_topk_self_and_string_budget(full: torch.Tensor, tmp_path: Path) -> None:
    att, train, test = _attributor(max_memory="1MB")
    assert att.max_memory == 10**6
    torch.testing.assert_close(att.attribute(train, test), full, rtol=1e-12, atol=1e-15)
    mapped = att.attribute(train, test, out=tmp_path / "m.npy")
    assert mapped.dtype == torch.float32
    torch.testing.assert_close(mapped, full.float())
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), full.float().numpy())
    top = att.attribute_topk(train, test, k=3)
    assert torch.equal(top.helpful_indices, full.topk(3, dim=0).indices.T)
    self_scores = att.self_attribute(train)
    torch.testing.assert_close(self_scores, att.attribute(train, train).diagonal())


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        att, train, test = _attributor(cache_dir=os.path.join(out_dir, "cache"))
        res = {
            "scores": att.attribute(train, test),
            "file": att.attribute(train, test, out=os.path.join(out_dir, "s.npy")).clone(),
        }
        torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_test_blocks(full: torch.Tensor, tmp_path: Path) -> None:
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    for rank in range(2):
        res = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(res["scores"], full, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res["file"], full.float())
    # each rank saved its own test blocks' scores: 3 blocks of 2 + 2 + 1 columns
    assert len(list((tmp_path / "cache").glob("scores_*.pt"))) == 3
