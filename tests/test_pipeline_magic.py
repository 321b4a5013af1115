"""MAGIC on the shared pipeline (issue #18 test matrix): ``out=``, top-k, self-influence,
a string ``max_memory``, and test blocks split over 2 gloo ranks (== one process).
The interrupted-``cache_dir`` resume is in ``test_algorithm_magic``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import MAGICAttributor
from dattri.model_util import SubsetTrainConfig
from tests.gloo import run_on_ranks
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


def _two_rank_run(shared: str) -> dict[str, torch.Tensor]:
    att, train, test = _attributor(cache_dir=os.path.join(shared, "cache"))
    return {
        "scores": att.attribute(train, test),
        "file": att.attribute(train, test, out=os.path.join(shared, "s.npy")).clone(),
    }


def test_two_ranks_split_the_test_blocks(full: torch.Tensor, tmp_path: Path) -> None:
    for res in run_on_ranks(_two_rank_run, tmp_path):
        torch.testing.assert_close(res["scores"], full, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res["file"], full.float())
    # each rank saved its own test blocks' scores: 3 blocks of 2 + 2 + 1 columns
    assert len(list((tmp_path / "shared" / "cache").glob("scores_*.pt"))) == 3
