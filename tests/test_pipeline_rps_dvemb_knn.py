"""RPS, DVEmb and KNN-Shapley on the shared pipeline (issue #18).

Per attributor, on the stored tiny golden MLP problem (float64): an interrupted
``cache_dir`` cache resumed == uninterrupted, ``attribute(..., out=)`` == in memory,
``attribute_topk`` == ``torch.topk`` of the full matrix, ``self_attribute`` == the
diagonal, ``max_memory`` gives tiles within the budget (and the same scores), and a
2-process gloo run (one module fixture, fork) == one process on every rank (RPS and
KNN split the training rows; DVEmb splits the embedding columns of its recursion, both
the low-rank and the dense form, and the scoring rows).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dattri.algorithm import DVEmbAttributor, KNNShapleyAttributor, RPSAttributor
from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features import dvemb_embeddings as dvemb_emb
from dattri.task import AttributionTask
from tests.gloo import run_on_ranks
from tests.golden.cases import DVEMB_BS, DVEMB_LR, load_problems, loss_sample, soft_ce

WORLD = 2
K = 4
RTOL = 1e-10  # float64 everywhere: only the summation order of tiles may differ


@pytest.fixture(scope="module")
def pb():
    return load_problems()["mlp"]


class _Data(Dataset):
    """Training pairs; raises past ``fail_after`` samples while armed (an interruption)."""

    def __init__(self, x, y, fail_after=None):
        self.x, self.y, self.fail_after = x, y, fail_after

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.fail_after is not None and i >= self.fail_after:
            raise RuntimeError("simulated interruption")
        return self.x[i], self.y[i]


def _loaders(pb, bs=8, fail_after=None):
    train = DataLoader(_Data(pb.x_train, pb.y_train, fail_after), batch_size=bs)
    test = DataLoader(_Data(pb.x_test, pb.y_test), batch_size=4)
    return train, test


# ------------------------------------------------------------------ builders
def _rps(pb, **kw):
    model = pb.model()
    task = AttributionTask(
        loss_func=soft_ce, model=model, checkpoints=pb.checkpoints[:2], target_func=soft_ce
    )
    return RPSAttributor(task, final_linear_layer_name="2", verbose=False, **kw)


def _dvemb(pb, **kw):
    """SGD on the stored initial MLP for 2 epochs, every step recorded."""
    model = pb.model(pb.init)
    model.train()
    task = AttributionTask(loss_func=loss_sample(model), model=model, checkpoints={})
    attr = DVEmbAttributor(task, verbose=False, **kw)
    for epoch in range(pb.schedule.shape[0]):
        perm = pb.schedule[epoch]
        for s in range(0, len(perm), DVEMB_BS):
            idx = perm[s : s + DVEMB_BS]
            x, y = pb.x_train[idx], pb.y_train[idx]
            attr.cache_gradients(epoch, (x, y), idx, DVEMB_LR)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= DVEMB_LR * p.grad
    return attr


def _knn(**kw):
    return KNNShapleyAttributor(k_neighbors=5, verbose=False, **kw)


def run_all(folder: str) -> dict[str, torch.Tensor]:
    """Every pipeline output of the three attributors (any number of ranks)."""
    pb = load_problems()["mlp"]
    train, test = _loaders(pb)
    out: dict[str, torch.Tensor] = {}

    def topk(prefix, top):
        out[f"{prefix}_top_idx"], out[f"{prefix}_top_val"] = top.helpful_indices, top.helpful_scores
        out[f"{prefix}_bot_idx"] = top.harmful_indices

    rps = _rps(pb)
    rps.cache(train)
    out["rps"] = rps.attribute(train, test)
    out["rps_self"] = rps.self_attribute(train)
    topk("rps", rps.attribute_topk(train, test, K))
    other = DataLoader(train.dataset, batch_size=5)  # not the cached loader
    out["rps_other"] = rps.attribute(other, test)
    stored = _rps(pb, cache_dir=os.path.join(folder, "rps"), max_memory=6000)
    stored.cache(train)
    out["rps_store"] = stored.attribute(train, test, out=os.path.join(folder, "rps.npy")).clone()

    dv = _dvemb(pb)
    dv.cache()
    out["dvemb"] = dv.attribute(test)
    out["dvemb_self"] = dv.self_attribute(train)
    topk("dvemb", dv.attribute_topk(test, K))
    dense = _dvemb(pb)
    dense.cache(method="dense")  # the default here is low-rank (N = 80 < 2 d)
    out["dvemb_dense"] = dense.attribute(test)
    dvs = _dvemb(pb, cache_dir=os.path.join(folder, "dvemb"), max_memory=20_000)
    dvs.cache()
    out["dvemb_store"] = dvs.attribute(test, out=os.path.join(folder, "dvemb.npy")).clone()

    knn = _knn()
    out["knn"] = knn.attribute(train, test)
    out["knn_self"] = knn.self_attribute(train)
    topk("knn", knn.attribute_topk(train, test, K))
    out["knn_out"] = knn.attribute_train_test(
        train, test, out=os.path.join(folder, "knn.npy")
    ).clone()
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    ranks = run_on_ranks(run_all, tmp_path_factory.mktemp("dist3"))
    single = run_all(str(tmp_path_factory.mktemp("single3")))
    return single, ranks


def _close(got, ref, rtol=RTOL):
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


# ------------------------------------------------------------------ single process
def test_dvemb_is_a_base_attributor_with_keywords():
    assert issubclass(DVEmbAttributor, BaseAttributor)
    assert getattr(DVEmbAttributor.attribute, "_loader_keywords", False)


def test_rps_resume_out_topk_self(pb, tmp_path):
    train, test = _loaders(pb)
    ref = _rps(pb)
    ref.cache(train)
    full = ref.attribute(train, test)
    # interrupted cache: the loader fails in the 3rd batch of checkpoint 0
    bad, _ = _loaders(pb, fail_after=16)
    attr = _rps(pb, cache_dir=tmp_path / "store")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        attr.cache(bad)
    done = json.loads((tmp_path / "store" / "done-r0.json").read_text())["done"]
    assert done == {"ckpt0": [[0, 16]]}
    again = _rps(pb, cache_dir=tmp_path / "store")
    again.cache(train)
    for a, b in zip(again.theta, ref.theta):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _close(again.attribute(train, test), full, 0)
    # score file == in memory
    mapped = ref.attribute(train, test, out=tmp_path / "s.npy")
    _close(mapped, full, 1e-6)
    assert np.load(tmp_path / "s.npy").shape == (40, 10)
    # top-k == torch.topk, self == diagonal
    top = ref.attribute_topk(train, test, K)
    assert torch.equal(top.helpful_indices, full.topk(K, dim=0).indices.T)
    assert torch.equal(top.harmful_indices, full.topk(K, dim=0, largest=False).indices.T)
    _close(ref.self_attribute(train), ref.attribute(train, train).diag())
    # a store written for another layer setting is refused by the store's own checks
    other = _rps(pb, cache_dir=tmp_path / "store", normalize_preactivate=True)
    other.cache(train)  # same rows (normalisation is applied after): reused
    with pytest.raises(ValueError, match="another task or other settings"):
        RPSAttributor(
            AttributionTask(soft_ce, pb.model(), pb.checkpoints[:1], target_func=soft_ce),
            "2",
            verbose=False,
            cache_dir=tmp_path / "store",
        ).cache(train)


def test_rps_max_memory_tiles(pb):
    train, test = _loaders(pb)
    ref = _rps(pb)
    ref.cache(train)
    budget = 6000
    attr = _rps(pb, max_memory=budget)
    attr.cache(train)  # the rows exceed half the budget: a temporary store
    assert type(attr._store.features[0]).__name__ == "StoredRows"
    tests = attr._tests(test)
    width = tests[0][0].shape[1] + attr.featurizer.out_dim
    n, tiles = attr._iter_tiles(train, tests)
    count = 0
    for _, _, tile in tiles:
        count += 1
        assert tile.numel() * 8 <= budget / 12
        assert tile.shape[0] * width * 8 <= budget / 12
    assert n == 40 and count > 10
    _close(attr.attribute(train, test), ref.attribute(train, test))


def test_dvemb_resume_out_topk_self(pb, tmp_path, monkeypatch):
    train, test = _loaders(pb)
    ref = _dvemb(pb)
    ref.cache()
    full = ref.attribute(test)
    steps_per_epoch = pb.schedule.shape[1] // DVEMB_BS
    calls = {"n": 0}
    step = dvemb_emb.EmbeddingRecursion.step

    def counting(self, g, eta, limit=None):
        calls["n"] += 1
        if limit is not None and calls["n"] > limit:
            raise KeyboardInterrupt
        return step(self, g, eta)

    # interrupted in the first step of epoch 0 (epochs run last-first)
    monkeypatch.setattr(
        dvemb_emb.EmbeddingRecursion,
        "step",
        lambda self, g, eta: counting(self, g, eta, steps_per_epoch),
    )
    with pytest.raises(KeyboardInterrupt):
        _dvemb(pb, cache_dir=tmp_path / "emb").cache()
    assert (tmp_path / "emb" / dvemb_emb.STATE_FILE).exists()
    calls["n"] = 0
    monkeypatch.setattr(dvemb_emb.EmbeddingRecursion, "step", counting)
    again = _dvemb(pb, cache_dir=tmp_path / "emb")
    again.cache()
    assert calls["n"] == steps_per_epoch  # only epoch 0 was computed
    calls["n"] = 0
    reused = _dvemb(pb, cache_dir=tmp_path / "emb")
    reused.cache()  # a complete store: nothing recomputed
    assert calls["n"] == 0
    _close(reused.attribute(test), full, 0)
    for e in ref.embeddings:
        _close(again.embeddings[e].materialize(), ref.embeddings[e], 0)
    _close(again.attribute(test), full, 0)
    _close(
        again.attribute(test, epoch=1, train_data_indices=[3, 1, 2]),
        ref.attribute(test, epoch=1, train_data_indices=[3, 1, 2]),
    )
    # another training run (other steps) is refused by the store
    other = _dvemb(pb, cache_dir=tmp_path / "emb")
    other.cached_gradients[0][0] = other.cached_gradients[0][0] * 2
    with pytest.raises(ValueError, match="another task or other settings"):
        other.cache()
    # out=, top-k, self == diagonal
    _close(ref.attribute(test, out=tmp_path / "d.npy"), full, 1e-6)
    top = ref.attribute_topk(test, K)
    assert torch.equal(top.helpful_indices, full.topk(K, dim=0).indices.T)
    assert torch.equal(top.harmful_indices, full.topk(K, dim=0, largest=False).indices.T)
    _close(ref.self_attribute(train), ref.attribute(train).diag())


def test_dvemb_max_memory_tiles(pb):
    _, test = _loaders(pb)
    ref = _dvemb(pb)
    ref.cache()
    budget = 20_000
    attr = _dvemb(pb, max_memory=budget)
    attr.cache()  # 2 x (40, 83) float64 embeddings exceed half the budget: spilled
    assert type(next(iter(attr.embeddings.values()))).__name__ == "StoredRows"
    _, _, tiles = attr._tiles(test, None, None)
    sizes = [tile.numel() * 8 for _, _, tile in tiles]
    assert len(sizes) > 10 and max(sizes) <= budget / 12
    _close(attr.attribute(test), ref.attribute(test))


def test_knn_out_topk_self_budget_and_refused_options(pb, tmp_path):
    train, test = _loaders(pb)
    knn = _knn()
    full = knn.attribute_train_test(train, test)
    _close(knn.attribute(train, test), full.T, 0)
    _close(knn.attribute(train, test, out=tmp_path / "k.npy"), full.T, 1e-6)
    assert np.load(tmp_path / "k.npy").shape == (10, 40)
    _close(knn.attribute_train_test(train, test, out=tmp_path / "kt.npy"), full, 1e-6)
    top = knn.attribute_topk(train, test, K)
    assert torch.equal(top.helpful_scores, full.topk(K, dim=0).values.T)
    assert torch.equal(top.harmful_scores, full.topk(K, dim=0, largest=False).values.T)
    _close(knn.self_attribute(train), knn.attribute_train_test(train, train).diag(), 0)
    budget = 6000
    small = _knn(max_memory=budget)
    block = small._test_block(40)
    assert block * 64 * 40 <= budget / 2
    _, _, _, tiles = small._iter_tiles(train, test, None, None)
    assert max(t.shape[1] for _, _, t in tiles) <= block < 4
    _close(small.attribute_train_test(train, test), full)
    with pytest.raises(ValueError, match="too small"):
        _knn(max_memory=100).attribute(train, test)
    for name in ("cache_dir", "store_dtype"):
        with pytest.raises(ValueError, match=f"does not take {name}"):
            _knn(**{name: "float32" if name == "store_dtype" else str(tmp_path)})


# ------------------------------------------------------------------ distributed
NAMES = [
    "rps",
    "rps_self",
    "rps_other",
    "rps_store",
    "dvemb",
    "dvemb_self",
    "dvemb_store",
    "dvemb_dense",
    "knn",
    "knn_self",
    "knn_out",
]


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_equal_single_process(spawned, name):
    single, ranks = spawned
    ref = single[name]
    assert ref.abs().max() > 0
    for res in ranks:
        _close(res[name], ref, 1e-6 if name.endswith(("store", "out")) else RTOL)


@pytest.mark.parametrize("method", ["rps", "dvemb", "knn"])
def test_two_ranks_topk_equal_single_process(spawned, method):
    single, ranks = spawned
    full = single[method].T if method == "knn" else single[method]  # (n_train, n_test)
    cols = torch.arange(full.shape[1])
    for res in ranks:
        _close(res[f"{method}_top_val"], single[f"{method}_top_val"])
        # indices: equal scores (KNN-Shapley values tie between training points)
        for f, largest in (("top_idx", True), ("bot_idx", False)):
            vals = full[res[f"{method}_{f}"], cols[:, None]]
            _close(vals, full.topk(K, dim=0, largest=largest).values.T)


def test_stored_runs_equal_in_memory(spawned):
    single, _ = spawned
    _close(single["rps_store"], single["rps"], 1e-6)
    _close(single["dvemb_store"], single["dvemb"], 1e-6)
    _close(single["dvemb_dense"], single["dvemb"], 1e-8)
    _close(single["rps_other"], single["rps"])
