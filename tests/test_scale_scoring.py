"""Blockwise scoring: budgets, tile plans, score files, streaming top-k."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dattri.algorithm.score.tiles import (
    MemmapScoreSink,
    TensorSink,
    TopKSink,
    make_sink,
    parse_memory,
    plan_tiles,
)
from dattri.algorithm.store.memmap_store import StoredRows
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.params.projection import TracInProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask
from tests.test_scale_store import _setup


def _tiles(scores: torch.Tensor, rows: int, cols: int):
    for r in range(0, scores.shape[0], rows):
        for c in range(0, scores.shape[1], cols):
            yield r, c, scores[r : r + rows, c : c + cols]


def test_parse_memory() -> None:
    assert parse_memory(None) is None
    assert parse_memory(1000) == 1000
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("1.5 MiB") == int(1.5 * 2**20)
    assert parse_memory("512kib") == 512 * 1024
    for bad in ("lots", "2XB", -1, 0, True):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)


def test_plan_tiles_fits_the_budget() -> None:
    free = plan_tiles(10_000, 300, 64)
    assert free.test_block == 300 and free.train_block * 300 <= 1 << 22
    for budget in (10**5, 10**6, "50MB"):
        plan = plan_tiles(200_000, 2_000, 1024, budget, num_params=5_000, itemsize=4)
        share = parse_memory(budget) // 12
        assert plan.train_block * 1024 * 4 <= share
        assert plan.test_block * 1024 * 4 <= share
        assert plan.train_block * plan.test_block * 4 <= share
        assert plan.grad_rows == max(1, share // (3 * 4 * 5_000))
        assert plan.train_block >= 1 and plan.test_block >= 1
    big = plan_tiles(100, 10, 8, "1GB")
    assert (big.train_block, big.test_block) == (100, 10)
    with pytest.raises(ValueError, match="too small"):
        plan_tiles(100, 10, 1024, 1000)
    with pytest.raises(ValueError, match="too small"):
        plan_tiles(100, 10, 8, 10**6, reserved=10**6)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 3), (64, 64), (5, 40)])
def test_topk_sink_equals_torch_topk(rows: int, cols: int) -> None:
    scores = torch.randn(53, 40, generator=torch.Generator().manual_seed(0))
    sink = TopKSink(6, 40)
    for r, c, tile in _tiles(scores, rows, cols):
        sink.add(r, c, tile)
    res = sink.finalize()
    top = scores.topk(6, dim=0)
    bottom = scores.topk(6, dim=0, largest=False)
    assert torch.equal(res.helpful_indices, top.indices.T)
    assert torch.equal(res.helpful_scores, top.values.T)
    assert torch.equal(res.harmful_indices, bottom.indices.T)
    assert torch.equal(res.harmful_scores, bottom.values.T)
    with pytest.raises(RuntimeError, match="No score tile"):
        TopKSink(3).finalize()
    with pytest.raises(ValueError, match="k must"):
        TopKSink(0)


def test_score_sinks_assemble_tiles(tmp_path) -> None:
    scores = torch.randn(23, 11, dtype=torch.float64)
    dense = TensorSink(23, 11, torch.float64, "cpu")
    memmap = make_sink(tmp_path / "s.npy", 23, 11, torch.float64, "cpu")
    assert isinstance(memmap, MemmapScoreSink)
    for r, c, tile in _tiles(scores, 4, 5):
        dense.add(r, c, tile)
        memmap.add(r, c, tile)
    assert torch.equal(dense.finalize(), scores)
    mapped = memmap.finalize()
    assert mapped.dtype == torch.float32 and mapped.shape == (23, 11)
    assert torch.equal(mapped, scores.float())
    assert np.array_equal(np.load(tmp_path / "s.npy"), scores.float().numpy())
    with pytest.raises(ValueError, match=".npy"):
        MemmapScoreSink(tmp_path / "s.bin", 2, 2)
    with pytest.raises(TypeError, match="out must be"):
        make_sink(3, 2, 2, torch.float32, "cpu")


def _make_trak(model, ckpts, margin, prob, **kw):
    return TRAKAttributor(
        AttributionTask(margin, model, ckpts),
        prob,
        TRAKProjectionParams(proj_dim=12, proj_seed=3),
        regularization=1e-3,
        verbose=False,
        **kw,
    )


def test_trak_tiled_scores_equal_untiled(tmp_path) -> None:
    model, ckpts, margin, prob, train, test = _setup()
    ref = _make_trak(model, ckpts, margin, prob)
    ref.cache(train)
    expected = ref.attribute(test)
    # a budget small enough for 3-row x 2-column tiles: many tiles, same scores
    tiled = _make_trak(model, ckpts, margin, prob, max_memory=6_000)
    tiled.cache(train)
    got = tiled.attribute(test)
    assert tiled._store.block_rows < 30
    assert tiled._test_block(tiled._store, 7) < 7
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # score file
    mapped = tiled.attribute(test, out=tmp_path / "scores.npy")
    torch.testing.assert_close(mapped, expected.float(), rtol=1e-6, atol=1e-7)
    assert np.load(tmp_path / "scores.npy").shape == (30, 7)
    # streaming top-k (tiled) equals torch.topk of the full matrix
    top = tiled.attribute_topk(None, test, k=4)
    assert torch.equal(top.helpful_indices, expected.topk(4, dim=0).indices.T)
    assert torch.equal(top.harmful_indices, expected.topk(4, dim=0, largest=False).indices.T)
    # another loader (same rows, other batches) scored against the cached kernel
    other = DataLoader(train.dataset, batch_size=7)
    torch.testing.assert_close(
        tiled.attribute(test, other, out=tmp_path / "other.npy"),
        expected.float(),
        rtol=1e-6,
        atol=1e-7,
    )
    top_other = tiled.attribute_topk(other, test, k=4)
    assert torch.equal(top_other.helpful_indices, top.helpful_indices)


def test_tracin_budget_and_score_file(tmp_path) -> None:
    model, ckpts, margin, _, train, test = _setup()

    def make(**kw):
        return TracInAttributor(
            AttributionTask(margin, model, ckpts),
            weight_list=[0.5, 2.0],
            normalized_grad=False,
            proj_params=TracInProjectionParams(proj_dim=10),
            verbose=False,
            **kw,
        )

    ref = make()
    ref.cache(train)
    expected = ref.attribute(train, test)
    # Chunked gradients round differently (other matmul shapes). A score is a k-term dot
    # product of features that are p-term projections, so its forward error is at most
    # about gamma_{p+k} times the Cauchy-Schwarz magnitude sum_c w_c |phi_ic| |phi_jc|
    # <= sqrt(self_i self_j) (self-influences of the reference; weights are positive).
    p = sum(v.numel() for v in model.parameters())
    u = torch.finfo(torch.float64).eps / 2
    gamma = (p + 10) * u / (1 - (p + 10) * u)
    magnitude = torch.sqrt(ref.self_attribute(train)[:, None] * ref.self_attribute(test)[None, :])
    bound = gamma * magnitude

    def assert_within(got):
        assert got.shape == expected.shape
        assert ((got - expected).abs() <= bound).all(), ((got - expected).abs() / bound).max()

    tiled = make(max_memory=20_000)  # also splits loader batches into gradient chunks
    tiled.cache(train)
    assert tiled.featurizer.grad_rows is not None and tiled.featurizer.grad_rows < 4
    assert_within(tiled.attribute(train, test))
    top = tiled.attribute_topk(train, test, k=3)
    assert torch.equal(top.helpful_indices, expected.topk(3, dim=0).indices.T)
    mapped = ref.attribute(train, test, out=tmp_path / "t.npy")  # uncached-style sink path
    torch.testing.assert_close(mapped, expected.float(), rtol=1e-6, atol=1e-7)
    # features (30 x 10 x 2 float64 = 4800 B) exceed half the budget: temporary store
    spilled = make(max_memory=8_000)
    spilled.cache(train)
    folder = Path(spilled.scale_options._tmp)
    assert isinstance(spilled._store.features[0], StoredRows) and folder.is_dir()
    assert_within(spilled.attribute(train, test))
    del spilled, top
    gc.collect()
    assert not folder.exists()  # removed with the attributor


def test_bad_scale_arguments() -> None:
    model, ckpts, margin, prob, _, _ = _setup()
    with pytest.raises(ValueError, match="store_dtype"):
        _make_trak(model, ckpts, margin, prob, store_dtype="int8")
    with pytest.raises(ValueError, match="max_memory"):
        _make_trak(model, ckpts, margin, prob, max_memory="a lot")
    with pytest.raises(TypeError, match="cache_dir"):
        _make_trak(model, ckpts, margin, prob, cache_dir=3)
