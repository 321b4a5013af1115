"""Tests for the shared attributor machinery (base classes, batching, top-k)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.base import BaseInnerProductAttributor
from dattri.algorithm.runtime.batching import (
    ReusableBuffer,
    batch_size_of,
    check_loader,
    move_to_device,
    unsqueeze_batch,
)
from dattri.algorithm.score.topk import TopKAccumulator
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp


class _GradDot(BaseInnerProductAttributor):
    """Plain gradient inner products: exercises the base class alone."""


def test_topk_accumulator_equals_torch_topk():
    torch.manual_seed(0)
    scores = torch.randn(103, 7)
    acc = TopKAccumulator(5)
    for start in range(0, 103, 10):
        acc.update(scores[start : start + 10], start)
    res = acc.result()
    top = torch.topk(scores.T, 5, dim=1)
    bottom = torch.topk(scores.T, 5, dim=1, largest=False)
    assert torch.equal(res.helpful_indices, top.indices)
    assert torch.equal(res.helpful_scores, top.values)
    assert torch.equal(res.harmful_indices, bottom.indices)
    assert torch.equal(res.harmful_scores, bottom.values)
    with pytest.raises(ValueError, match="k must be"):
        TopKAccumulator(0)
    with pytest.raises(RuntimeError, match="No score block"):
        TopKAccumulator(2).result()


def test_batching_helpers():
    x, y = torch.ones(4, 3), torch.zeros(4)
    assert batch_size_of((x, y)) == 4
    assert batch_size_of({"input_ids": x}) == 4
    assert unsqueeze_batch({"a": x})["a"].shape == (1, 4, 3)
    assert isinstance(move_to_device([x, y], "cpu"), list)
    assert isinstance(move_to_device((x, y), "cpu"), tuple)
    with pytest.raises(TypeError, match="tensor"):
        batch_size_of(("a", 1))
    with pytest.raises(ValueError, match="empty"):
        check_loader(DataLoader(TensorDataset(torch.zeros(0, 2))), "train_dataloader")
    with pytest.warns(UserWarning, match="shuffles"):
        check_loader(DataLoader(TensorDataset(x), shuffle=True), "train_dataloader")
    with pytest.raises(TypeError, match="train_dataloader"):
        check_loader(3, "train_dataloader")


def test_inner_product_base_scores_self_attribute_topk():
    p = cached_random_mlp()
    task = AttributionTask(p.loss_if, p.model, [p.model.state_dict()])
    attr = _GradDot(task, verbose=False)
    train = p.train_loader(batch_size=16)
    test = p.test_loader(batch_size=4)
    with pytest.warns(UserWarning, match="cache"):
        scores = attr.attribute(train, test)
    g_tr = task.per_sample_grads((p.x_train, p.y_train), keep_batch_dim=True)
    g_te = task.per_sample_grads((p.x_test, p.y_test), keep_batch_dim=True)
    assert scores.shape == (len(p.x_train), len(p.x_test))
    torch.testing.assert_close(scores, g_tr @ g_te.T)
    self_scores = attr.self_attribute(train)
    torch.testing.assert_close(self_scores, (g_tr * g_tr).sum(1))
    res = attr.attribute_topk(train, test, k=3)
    torch.testing.assert_close(res.helpful_scores, torch.topk(scores.T, 3).values)
    theta = attr.attribute(train, test, relatif_method="theta")
    torch.testing.assert_close(theta, scores / g_tr.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="relatif_method"):
        attr.attribute(train, test, relatif_method="x")
    with pytest.raises(TypeError, match="AttributionTask"):
        _GradDot(object())


def test_reusable_buffer_lifetime():
    buf = ReusableBuffer()
    assert buf.get(4, 3, torch.float32, torch.device("cpu")) is None  # inactive
    with buf.active():
        a = buf.get(4, 3, torch.float32, "cpu")
        assert a.shape == (4, 3) and a.is_contiguous()
        b = buf.get(2, 3, torch.float32, "cpu")  # smaller: a prefix of the same storage
        assert b.data_ptr() == a.data_ptr() and b.shape == (2, 3)
        with buf.active():  # nested blocks share it
            assert buf.get(4, 3, torch.float32, "cpu").data_ptr() == a.data_ptr()
        assert buf._buffer is not None  # still held by the outer block
        c = buf.get(5, 3, torch.float64, "cpu")  # other dtype/size: reallocated
        assert c.dtype == torch.float64 and c.shape == (5, 3)
    assert buf._buffer is None  # freed on exit
    assert buf.get(4, 3, torch.float32, "cpu") is None


def test_featurizer_buffer_reuse_gives_identical_features():
    from dattri.algorithm.features.gradients import GradientFeaturizer
    from dattri.algorithm.store.in_memory import collect_features
    from dattri.params.projection import TracInProjectionParams

    p = cached_random_mlp()
    task = AttributionTask(p.loss_sample, p.model, [p.model.state_dict()])
    proj = TracInProjectionParams(proj_dim=16)
    feat = GradientFeaturizer(task, None, proj, "cpu", scale=0.5)
    loader = p.train_loader(batch_size=7)  # several batches, a partial last one
    store = collect_features(feat, loader, 1, verbose=False)
    assert feat._buffer._buffer is None  # released after the loop
    fresh = torch.cat([feat(0, batch) for batch in loader])  # no reuse outside the block
    torch.testing.assert_close(store.features[0], fresh, rtol=0, atol=0)
    # scaling after the projection equals projecting scaled gradients
    g = task.per_sample_grads((p.x_train, p.y_train))
    proj_fn = feat._projector(g.dtype)
    torch.testing.assert_close(store.features[0], proj_fn(0.5 * g, ensemble_id=0))
