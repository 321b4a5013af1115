"""The on-disk feature store: round trips, manifests, resumable TRAK/TracIn caches."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.store.memmap_store import (
    MemmapFeatureStore,
    StoredRows,
    batch_plan,
    checkpoint_fingerprint,
    iter_batches,
    parse_store_dtype,
)
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.params.projection import TracInProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

N_TRAIN, N_TEST = 30, 7


def _setup(n_ckpt: int = 2):
    p = cached_random_mlp(n_train=N_TRAIN, n_test=N_TEST, train=False)
    model = copy.deepcopy(p.model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    ckpts = [base] + [
        {k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
        for _ in range(n_ckpt - 1)
    ]

    def margin(params, data):
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        logp = -nn.functional.cross_entropy(logits, y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def prob(params, data):
        x, y = data
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-nn.functional.cross_entropy(logits, y.unsqueeze(0)))

    train = DataLoader(TensorDataset(p.x_train, p.y_train), batch_size=4)  # 8 batches
    test = DataLoader(TensorDataset(p.x_test, p.y_test), batch_size=4)
    return model, ckpts, margin, prob, train, test


def _trak(model, ckpts, margin, prob, **kwargs) -> TRAKAttributor:
    return TRAKAttributor(
        AttributionTask(margin, model, ckpts),
        prob,
        TRAKProjectionParams(proj_dim=12, proj_seed=3),
        regularization=1e-3,
        verbose=False,
        **kwargs,
    )


class _Boom(RuntimeError):
    pass


def _fail_after(attr, n_calls: int) -> list[int]:
    """Make training featurization raise after ``n_calls`` batches; returns the counter."""
    calls = [0]
    original = attr.featurizer.__class__.__call__

    def wrapped(self, ckpt_idx, batch, target=False, where=""):
        if not target:  # training gradients only
            if calls[0] >= n_calls:
                raise _Boom
            calls[0] += 1
        return original(self, ckpt_idx, batch, target, where)

    attr.featurizer.__class__ = type("Wrapped", (attr.featurizer.__class__,), {"__call__": wrapped})
    return calls


# ----------------------------------------------------------------------- store
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_store_round_trip(tmp_path, dtype: str) -> None:
    values = torch.randn(10, 3, dtype=torch.float64)
    store = MemmapFeatureStore.open(tmp_path, {"a": 1}, 10, {"f": ((3,), dtype)})
    store.write("f", 0, values[:4])
    store.write("f", 4, values[4:])
    got = store.read("f", slice(2, 9))
    assert got.dtype == torch.float32 and got.shape == (7, 3)
    expected = values[2:9].to(getattr(torch, dtype)).to(torch.float32)
    assert torch.equal(got, expected)
    rows = StoredRows(store, "f", torch.float64, torch.device("cpu"))
    assert rows.shape == (10, 3) and len(rows) == 10
    assert torch.equal(rows.materialize(), values.to(getattr(torch, dtype)).double())
    with pytest.raises(TypeError, match="step-1"):
        rows[::2]
    if dtype == "float32":  # a plain .npy file anyone can read
        assert np.array_equal(np.load(tmp_path / "f.npy"), values.float().numpy())


def test_progress_is_recorded_and_merged(tmp_path) -> None:
    store = MemmapFeatureStore.open(tmp_path, {}, 10, {"f": ((), "float32")})
    store.mark_done("u", 0, 3)
    store.mark_done("u", 6, 10)
    store.mark_done("u", 3, 6)
    assert store.done_ranges("u") == [[0, 10]] and store.is_complete("u")
    assert not store.is_complete("other")
    store.commit()
    again = MemmapFeatureStore.open(tmp_path, {}, 10, {"f": ((), "float32")})
    assert again.is_complete("u")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


def test_mismatched_manifest_is_refused(tmp_path) -> None:
    MemmapFeatureStore.open(tmp_path, {"proj_dim": 8}, 5, {"f": ((8,), "float32")})
    with pytest.raises(ValueError, match=r"proj_dim: stored 8 vs now 16"):
        MemmapFeatureStore.open(tmp_path, {"proj_dim": 16}, 5, {"f": ((8,), "float32")})
    with pytest.raises(ValueError, match="n_samples"):
        MemmapFeatureStore.open(tmp_path, {"proj_dim": 8}, 6, {"f": ((8,), "float32")})
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not empty"):
        MemmapFeatureStore.open(other, {}, 5, {"f": ((8,), "float32")})
    with pytest.raises(ValueError, match="store_dtype"):
        parse_store_dtype("int8", torch.float32)


def test_batch_plan_and_iter_batches() -> None:
    loader = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=4)
    assert batch_plan(loader) == [4, 4, 2]
    got = [(i, b[0].tolist()) for i, b in iter_batches(loader, [0, 2])]
    assert got == [(0, [0.0, 1.0, 2.0, 3.0]), (2, [8.0, 9.0])]
    plain = [torch.zeros(3), torch.zeros(2)]
    assert batch_plan(plain) == [3, 2]
    assert [i for i, _ in iter_batches(plain, [1])] == [1]
    with pytest.raises(ValueError, match="shuffle=False"):
        batch_plan(DataLoader(TensorDataset(torch.arange(4.0)), shuffle=True))


def test_checkpoint_fingerprint_changes_with_weights() -> None:
    model, ckpts, margin, _, _, _ = _setup()
    a = checkpoint_fingerprint(AttributionTask(margin, model, ckpts))
    assert a == checkpoint_fingerprint(AttributionTask(margin, model, ckpts))
    ckpt2 = {k: v.clone() for k, v in ckpts[1].items()}
    next(iter(ckpt2.values()))[0] += 1e-9
    assert a != checkpoint_fingerprint(AttributionTask(margin, model, [ckpts[0], ckpt2]))


# ---------------------------------------------------------------- attributors
def test_trak_store_equals_in_memory_and_resumes(tmp_path) -> None:
    model, ckpts, margin, prob, train, test = _setup()
    ref = _trak(model, ckpts, margin, prob)
    ref.cache(train)
    expected = ref.attribute(test)

    folder = tmp_path / "store"
    broken = _trak(model, ckpts, margin, prob, cache_dir=folder)
    calls = _fail_after(broken, 5)  # 5 of 16 (2 checkpoints x 8 batches) done
    with pytest.raises(_Boom):
        broken.cache(train)
    assert calls[0] == 5
    progress = json.loads((folder / "done-r0.json").read_text())
    assert progress["done"] == {"ckpt0": [[0, 20]]}
    assert progress["arrays"] == {"ckpt0": ["extra_0", "features_0"]}

    resumed = _trak(model, ckpts, margin, prob, cache_dir=folder)
    counter = _fail_after(resumed, 10**6)
    resumed.cache(train)
    assert counter[0] == 16 - 5  # only the missing batches were recomputed
    scores = resumed.attribute(test)
    uninterrupted = _trak(model, ckpts, margin, prob, cache_dir=tmp_path / "fresh")
    uninterrupted.cache(train)
    assert torch.equal(scores, uninterrupted.attribute(test))
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    assert isinstance(resumed._store.features[0], StoredRows)
    # self-attribution and other-loader scoring read the store too
    torch.testing.assert_close(resumed.self_attribute(), ref.self_attribute(), rtol=1e-10, atol=0)

    # a complete store is reused without computing anything
    again = _trak(model, ckpts, margin, prob, cache_dir=folder)
    assert _fail_after(again, 0) == [0]
    again.cache(train)
    assert torch.equal(again.attribute(test), scores)


def test_trak_store_refuses_other_settings(tmp_path) -> None:
    model, ckpts, margin, prob, train, _ = _setup()
    _trak(model, ckpts, margin, prob, cache_dir=tmp_path).cache(train)
    other = TRAKAttributor(
        AttributionTask(margin, model, ckpts),
        prob,
        TRAKProjectionParams(proj_dim=10, proj_seed=3),
        verbose=False,
        cache_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="out_dim"):
        other.cache(train)
    with pytest.raises(ValueError, match="checkpoints"):
        _trak(model, ckpts[:1], margin, prob, cache_dir=tmp_path).cache(train)
    shifted = DataLoader(
        TensorDataset(train.dataset.tensors[0] + 1, train.dataset.tensors[1]), batch_size=4
    )
    with pytest.raises(ValueError, match=r"batch 0 of the loader \(samples 0-3; changed: 0-3\)"):
        _trak(model, ckpts, margin, prob, cache_dir=tmp_path).cache(shifted)


def test_half_precision_store_scores_in_float32(tmp_path) -> None:
    model, ckpts, margin, prob, train, test = _setup()
    model32 = copy.deepcopy(model).float()
    ckpts32 = [{k: v.float() for k, v in c.items()} for c in ckpts]

    def margin32(params, data):
        return margin(params, (data[0].float(), data[1]))

    def prob32(params, data):
        return prob(params, (data[0].float(), data[1]))

    def make(**kw):
        return TRAKAttributor(
            AttributionTask(margin32, model32, ckpts32),
            prob32,
            TRAKProjectionParams(proj_dim=12, proj_seed=3),
            regularization=1e-2,
            verbose=False,
            **kw,
        )

    ref = make()
    ref.cache(train)
    expected = ref.attribute(test)
    for dtype, rtol in (("float16", 2e-2), ("bfloat16", 1e-1)):
        attr = make(cache_dir=tmp_path / dtype, store_dtype=dtype)
        attr.cache(train)
        got = attr.attribute(test)
        assert got.dtype == torch.float32
        err = (got - expected).norm() / expected.norm()
        assert err < rtol, (dtype, float(err))
    size16 = (tmp_path / "float16" / "features_0.npy").stat().st_size
    assert size16 < N_TRAIN * 12 * 2 + 200  # two bytes per value (plus the .npy header)


def test_tracin_store_resumes_and_matches(tmp_path) -> None:
    model, ckpts, _, _, train, test = _setup()

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)
        )

    def make(**kw):
        return TracInAttributor(
            AttributionTask(loss, model, ckpts),
            weight_list=[0.3, 1.0],
            normalized_grad=True,
            proj_params=TracInProjectionParams(proj_dim=10),
            verbose=False,
            **kw,
        )

    ref = make()
    ref.cache(train)
    expected = ref.attribute(train, test)
    broken = make(cache_dir=tmp_path)
    _fail_after(broken, 11)
    with pytest.raises(_Boom):
        broken.cache(train)
    resumed = make(cache_dir=tmp_path)
    counter = _fail_after(resumed, 10**6)
    resumed.cache(train)
    assert counter[0] == 16 - 11
    torch.testing.assert_close(resumed.attribute(train, test), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(resumed.self_attribute(train), ref.self_attribute(train))
    with pytest.raises(ValueError, match="normalized"):
        TracInAttributor(
            AttributionTask(loss, model, ckpts),
            weight_list=[0.3, 1.0],
            normalized_grad=False,
            proj_params=TracInProjectionParams(proj_dim=10),
            verbose=False,
            cache_dir=tmp_path,
        ).cache(train)
