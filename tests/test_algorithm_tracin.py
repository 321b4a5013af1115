"""Tests for TracInAttributor (TracInCP, Grad-Dot, Grad-Cos) against hand computations."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dattri.algorithm.tracin import TracInAttributor
from dattri.func.projection import random_project
from dattri.params.projection import RandomProjectionParams, TracInProjectionParams
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

IDENTITY = TracInProjectionParams(proj_type="identity")


def _unpack(data):
    if isinstance(data, dict):
        return data["x"], data["y"]
    return data


def _make_loss(model):
    def loss(params, data):
        x, y = _unpack(data)
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    return loss


def _make_margin(model):
    """A target different from the loss: the logit of the correct class."""

    def target(params, data):
        x, y = _unpack(data)
        return functional_call(model, params, (x.unsqueeze(0),))[0, y]

    return target


def _setup(n_ckpt=3):
    """A fresh model copy (so the cached problem is never modified) and checkpoints."""
    p = cached_random_mlp(train=False)
    model = copy.deepcopy(p.model)
    gen = torch.Generator().manual_seed(1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = [base] + [
        {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
        for _ in range(n_ckpt - 1)
    ]
    return p, model, ckpts


def _loop_grads(model, ckpt, func, x, y, names=None):
    """Exact per-sample gradients by a Python loop of torch.autograd.grad, (n, p)."""
    m = copy.deepcopy(model)
    m.load_state_dict(ckpt)
    params = dict(m.named_parameters())
    names = list(params) if names is None else names
    rows = []
    for i in range(len(x)):
        val = func(params, (x[i], y[i]))
        grads = torch.autograd.grad(val, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _loaders(p, train_bs=16, test_bs=4):
    return p.train_loader(batch_size=train_bs), p.test_loader(batch_size=test_bs)


def test_tracin_identity_equals_weighted_sum_of_dot_products():
    p, model, ckpts = _setup(3)
    loss = _make_loss(model)
    task = AttributionTask(loss, model, ckpts)
    weights = torch.tensor([0.1, 0.2, 0.3])
    attr = TracInAttributor(
        task, weights, normalized_grad=False, proj_params=IDENTITY, verbose=False
    )
    train, test = _loaders(p)
    scores = attr.attribute(train, test)
    g_tr = [_loop_grads(model, c, loss, p.x_train, p.y_train) for c in ckpts]
    g_te = [_loop_grads(model, c, loss, p.x_test, p.y_test) for c in ckpts]
    expected = sum(w * a @ b.T for w, a, b in zip(weights.tolist(), g_tr, g_te))
    assert scores.shape == (len(p.x_train), len(p.x_test))
    assert scores.device.type == "cpu"
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    # streamed top-k (checkpoint-inner path) agrees with the full matrix
    res = attr.attribute_topk(train, test, k=4)
    top = torch.topk(expected.T, 4)
    assert torch.equal(res.helpful_indices, top.indices)
    torch.testing.assert_close(res.helpful_scores, top.values, rtol=1e-9, atol=1e-12)
    # self-influence = diagonal of the train x train scores = sum_k w_k ||g_k||^2,
    # for several batches
    self_scores = attr.self_attribute(train)
    g_sq = sum(w * a.square().sum(1) for w, a in zip(weights.tolist(), g_tr))
    torch.testing.assert_close(self_scores, g_sq, rtol=1e-9, atol=1e-12)


def test_grad_cos_equals_cosine_similarity():
    p, model, ckpts = _setup(1)
    loss = _make_loss(model)
    task = AttributionTask(loss, model, ckpts)
    attr = TracInAttributor(
        task, torch.ones(1), normalized_grad=True, proj_params=IDENTITY, verbose=False
    )
    train, test = _loaders(p)
    g_tr = _loop_grads(model, ckpts[0], loss, p.x_train, p.y_train)
    g_te = _loop_grads(model, ckpts[0], loss, p.x_test, p.y_test)
    expected = nn.functional.cosine_similarity(g_tr[:, None, :], g_te[None, :, :], dim=2)
    torch.testing.assert_close(attr.attribute(train, test), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        attr.self_attribute(train), torch.ones(len(p.x_train), dtype=torch.float64)
    )


def test_dense_projection_equals_hand_computation_with_same_projector():
    p, model, ckpts = _setup(2)
    loss = _make_loss(model)
    target = _make_margin(model)
    task = AttributionTask(loss, model, ckpts, target_func=target)
    params = TracInProjectionParams(proj_dim=64, proj_seed=3)
    weights = [0.5, 2.0]
    attr = TracInAttributor(task, weights, normalized_grad=False, proj_params=params, verbose=False)
    train, test = _loaders(p)
    scores = attr.attribute(train, test)
    n_param = sum(v.numel() for v in model.parameters())
    proj = random_project(
        torch.zeros(1, n_param, dtype=torch.float64),
        RandomProjectionParams(feature_batch_size=1, device="cpu", **params.model_dump()),
    )
    expected = 0
    projected = []
    for k, (w, c) in enumerate(zip(weights, ckpts)):
        a = proj(_loop_grads(model, c, loss, p.x_train, p.y_train), ensemble_id=k)
        b = proj(_loop_grads(model, c, target, p.x_test, p.y_test), ensemble_id=k)
        projected.append(a)
        expected = expected + w * a @ b.T
    assert projected[0].shape == (len(p.x_train), 64)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)
    # The per-checkpoint projections differ (ensemble_id = checkpoint index).
    g0 = _loop_grads(model, ckpts[0], loss, p.x_train, p.y_train)
    assert not torch.allclose(proj(g0, ensemble_id=0), proj(g0, ensemble_id=1))
    # projector_kwargs (older dict form) gives the same result
    old = TracInAttributor(
        task,
        weights,
        normalized_grad=False,
        verbose=False,
        projector_kwargs={
            "proj_dim": 64,
            "proj_seed": 3,
            "proj_max_batch_size": 32,
            "device": "cpu",
        },
    )
    torch.testing.assert_close(old.attribute(train, test), scores, rtol=0, atol=0)
    # any params object with the projection fields is accepted
    rp = RandomProjectionParams(
        proj_dim=64, proj_seed=3, proj_max_batch_size=8, feature_batch_size=5, device="cpu"
    )
    other = TracInAttributor(task, weights, normalized_grad=False, proj_params=rp, verbose=False)
    torch.testing.assert_close(other.attribute(train, test), scores, rtol=0, atol=0)
    # a different target: the diagonal uses loss x target gradients
    torch.testing.assert_close(
        attr.self_attribute(train),
        attr.attribute(train, train).diagonal(),
        rtol=1e-9,
        atol=1e-12,
    )


def test_default_projection_is_512_normal_and_deterministic():
    p, model, ckpts = _setup(1)
    task = AttributionTask(_make_loss(model), model, ckpts)
    a = TracInAttributor(task, [1.0], normalized_grad=False, verbose=False)
    assert a.proj_params.model_dump()["proj_dim"] == 512
    assert a.featurizer.out_dim == 512
    b = TracInAttributor(task, [1.0], normalized_grad=False, verbose=False)
    train, test = _loaders(p)
    s1 = a.attribute(train, test)
    assert torch.equal(s1, b.attribute(train, test))
    assert torch.equal(s1, a.attribute(train, test))
    # JL projection keeps the scores close to the exact ones
    exact = TracInAttributor(task, [1.0], False, proj_params=IDENTITY, verbose=False)
    e = exact.attribute(train, test)
    corr = torch.corrcoef(torch.stack([s1.flatten(), e.flatten()]))[0, 1]
    assert corr > 0.95


def test_cache_reuses_stored_train_gradients(monkeypatch):
    p, model, ckpts = _setup(2)
    task = AttributionTask(_make_loss(model), model, ckpts)
    attr = TracInAttributor(
        task,
        [1.0, 0.5],
        normalized_grad=False,
        proj_params=TracInProjectionParams(proj_dim=32),
        verbose=False,
    )
    train, test = _loaders(p)
    uncached = attr.attribute(train, test)
    attr.cache()  # upstream form: no argument, no-op
    attr.cache(train)
    calls = []
    original = task.per_sample_grads

    def counting(data, *args, **kwargs):
        calls.append(kwargs.get("target", args[2] if len(args) > 2 else False))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(task, "per_sample_grads", counting)
    cached = attr.attribute(train, test)
    # only the 3 test batches x 2 checkpoints were differentiated, all target-side
    assert len(calls) == 3 * 2
    assert all(calls)
    torch.testing.assert_close(cached, uncached, rtol=1e-12, atol=1e-12)
    calls.clear()
    self_cached = attr.self_attribute(train)
    assert calls == []
    # another loader (not the cached object) is recomputed
    other = p.train_loader(batch_size=7)
    torch.testing.assert_close(attr.attribute(other, test), uncached, rtol=1e-12, atol=1e-12)
    assert len(calls) > 0
    torch.testing.assert_close(self_cached, attr.self_attribute(other), rtol=1e-12, atol=1e-12)
    res = attr.attribute_topk(train, test, k=3)
    torch.testing.assert_close(res.harmful_scores, torch.topk(uncached.T, 3, largest=False).values)


class _DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_dict_batches_equal_tuple_batches_and_layer_name():
    p, model, ckpts = _setup(2)
    loss = _make_loss(model)
    task = AttributionTask(loss, model, ckpts)
    attr = TracInAttributor(
        task,
        [1.0, 1.0],
        normalized_grad=False,
        proj_params=TracInProjectionParams(proj_dim=48),
        verbose=False,
    )
    train, test = _loaders(p)
    dict_train = DataLoader(_DictDataset(p.x_train, p.y_train), batch_size=9)
    dict_test = DataLoader(_DictDataset(p.x_test, p.y_test), batch_size=3)
    torch.testing.assert_close(attr.attribute(dict_train, dict_test), attr.attribute(train, test))
    # layer selection: exact gradients of the last layer only
    names = ["2.weight", "2.bias"]
    sel = TracInAttributor(
        task, [1.0, 1.0], False, proj_params=IDENTITY, layer_name=names, verbose=False
    )
    expected = sum(
        _loop_grads(model, c, loss, p.x_train, p.y_train, names)
        @ _loop_grads(model, c, loss, p.x_test, p.y_test, names).T
        for c in ckpts
    )
    torch.testing.assert_close(sel.attribute(train, test), expected, rtol=1e-9, atol=1e-12)


def test_errors():
    p, model, ckpts = _setup(2)
    task = AttributionTask(_make_loss(model), model, ckpts)
    with pytest.raises(ValueError, match="weight_list has 3 entries"):
        TracInAttributor(task, torch.ones(3), normalized_grad=False)
    with pytest.raises(TypeError, match="proj_params"):
        TracInAttributor(task, torch.ones(2), normalized_grad=False, proj_params="normal")
    with pytest.raises(ValueError, match="not both"):
        TracInAttributor(
            task, torch.ones(2), False, proj_params=IDENTITY, projector_kwargs={"proj_dim": 8}
        )
    with pytest.raises(ValueError, match="unknown keys"):
        TracInAttributor(task, torch.ones(2), False, projector_kwargs={"dim": 8})
    with pytest.raises(TypeError, match="normalized_grad"):
        TracInAttributor(task, torch.ones(2), normalized_grad="yes")
    with pytest.raises(ValueError, match="layer_name"):
        TracInAttributor(task, torch.ones(2), False, layer_name=["nope.weight"])
    attr = TracInAttributor(task, torch.ones(2), False, verbose=False)
    with pytest.raises(TypeError, match="test_dataloader"):
        attr.attribute(p.train_loader(), None)
    with pytest.warns(UserWarning, match="shuffles"):
        attr.self_attribute(DataLoader(TensorDataset(p.x_train, p.y_train), shuffle=True))


def test_nan_gradients_raise():
    p, model, ckpts = _setup(1)

    def bad_loss(params, data):
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0)) * torch.sqrt(x[0] - x[0] - 1)

    task = AttributionTask(bad_loss, model, ckpts)
    attr = TracInAttributor(task, [1.0], False, proj_params=IDENTITY, verbose=False)
    with pytest.raises(ValueError, match="(?i)non-finite"):
        attr.attribute(p.train_loader(), p.test_loader())


@pytest.mark.parametrize("proj_type", ["normal", "sjlt", "random_mask"])
def test_nan_gradient_of_one_sample_is_named_under_projection(proj_type):
    """Projected features are checked instead of (B, p) gradients for dense/sjlt types."""
    p, model, ckpts = _setup(1)

    def loss(params, data):
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0),))
        # sample 3 only: a factor sqrt(-1) = NaN -> NaN gradients
        factor = torch.sqrt(torch.where(x[0] == p.x_train[3, 0], -1.0, 1.0))
        return nn.functional.cross_entropy(out, y.unsqueeze(0)) * factor

    task = AttributionTask(loss, model, ckpts)
    proj = TracInProjectionParams(proj_dim=8, proj_type=proj_type)
    attr = TracInAttributor(task, [1.0], False, proj_params=proj, verbose=False)
    with pytest.raises(ValueError, match=r"(?i)non-finite .*samples \[3\]"):
        attr.cache(p.train_loader(batch_size=8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    p, model, ckpts = _setup(2)
    train, test = _loaders(p)
    results = {}
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(dev)
        task = AttributionTask(
            _make_loss(m), m, [{k: v.to(dev) for k, v in c.items()} for c in ckpts]
        )
        attr = TracInAttributor(task, [1.0, 0.5], normalized_grad=False, device=dev, verbose=False)
        attr.cache(train)
        results[dev] = (attr.attribute(train, test), attr.self_attribute(train))
    assert results["cuda"][0].device.type == "cpu"  # upstream returns CPU scores
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-5, atol=1e-8)
