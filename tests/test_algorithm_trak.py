"""Tests for TRAKAttributor against the closed form computed directly in the test."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dattri.algorithm.trak import TRAKAttributor, factor_kernel
from dattri.func.projection import random_project
from dattri.params.projection import RandomProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

IDENTITY = TRAKProjectionParams(proj_type="identity")
REG = 1e-3


def _unpack(data):
    if isinstance(data, dict):
        return data["x"], data["y"]
    return data


def _make_funcs(model):
    """Upstream-style TRAK loss (log-odds margin) and correct-class probability."""

    def margin(params, data):
        x, y = _unpack(data)
        logits = functional_call(model, params, (x.unsqueeze(0),))
        logp = -nn.functional.cross_entropy(logits, y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def prob(params, data):
        x, y = _unpack(data)
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-nn.functional.cross_entropy(logits, y.unsqueeze(0)))

    return margin, prob


def _setup(n_ckpt=1, **kwargs):
    p = cached_random_mlp(train=False, **kwargs)
    model = copy.deepcopy(p.model)
    gen = torch.Generator().manual_seed(2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = [base] + [
        {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
        for _ in range(n_ckpt - 1)
    ]
    margin, prob = _make_funcs(model)
    task = AttributionTask(margin, model, ckpts)
    return p, model, ckpts, task, prob


def _loop_grads(model, ckpt, func, x, y, names=None):
    """Exact per-sample gradients by a Python loop of torch.autograd.grad, (n, p)."""
    m = copy.deepcopy(model)
    m.load_state_dict(ckpt)
    params = dict(m.named_parameters())
    names = list(params) if names is None else names
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(func(params, (x[i], y[i])), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _q(model, ckpt, x, y):
    """1 - softmax probability of the correct class, computed directly."""
    m = copy.deepcopy(model)
    m.load_state_dict(ckpt)
    with torch.no_grad():
        prob = torch.softmax(m(x), dim=1).gather(1, y[:, None])[:, 0]
    return 1 - prob


def _closed_form(model, ckpts, p, reg, names=None, proj=None):
    """Hand formula: (scores (n_train, n_test), self-scores (n_train,)).

    scores = mean_k Phi_k (Phi_k^T Phi_k + reg I)^-1 phi_k^T * mean_k Q (rows),
    self-scores = its train x train diagonal.
    """
    margin, _ = _make_funcs(model)
    n_sel = sum(v.numel() for k, v in model.named_parameters() if names is None or k in names)
    kern, diag = 0, 0
    for k, c in enumerate(ckpts):
        big = _loop_grads(model, c, margin, p.x_train, p.y_train, names) / n_sel**0.5
        small = _loop_grads(model, c, margin, p.x_test, p.y_test, names) / n_sel**0.5
        if proj is not None:
            big, small = proj(big, ensemble_id=k), proj(small, ensemble_id=k)
        inv = torch.linalg.inv(big.T @ big + reg * torch.eye(big.shape[1], dtype=big.dtype))
        kern = kern + big @ inv @ small.T / len(ckpts)
        diag = diag + (big @ inv @ big.T).diagonal() / len(ckpts)
    q = sum(_q(model, c, p.x_train, p.y_train) for c in ckpts) / len(ckpts)
    return q[:, None] * kern, q * diag


def test_identity_single_checkpoint_equals_closed_form_and_self_attribute():
    p, model, ckpts, task, prob = _setup(1)
    attr = TRAKAttributor(task, prob, proj_params=IDENTITY, regularization=REG, verbose=False)
    train, test = p.train_loader(batch_size=16), p.test_loader(batch_size=4)
    expected, diag = _closed_form(model, ckpts, p, REG)
    with pytest.raises(ValueError, match="cache"):
        attr.attribute(test)
    with pytest.raises(ValueError, match="cache"):
        attr.self_attribute()
    before = attr.attribute(test, train)  # no cache: the train loader defines the kernel
    assert before.shape == (len(p.x_train), len(p.x_test))
    torch.testing.assert_close(before, expected, rtol=1e-7, atol=1e-10)
    self_before = attr.self_attribute(train)
    assert self_before.shape == (len(p.x_train), 1)
    torch.testing.assert_close(self_before.squeeze(), diag, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(
        self_before.squeeze(), attr.attribute(train, train).diagonal(), rtol=1e-9, atol=1e-12
    )
    attr.cache(train)
    torch.testing.assert_close(attr.attribute(test), expected, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(attr.attribute(test, train), expected, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(attr.self_attribute().squeeze(), diag, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(attr.self_attribute(train).squeeze(), diag, rtol=1e-7, atol=1e-10)
    # streamed top-k with train=None after cache
    res = attr.attribute_topk(None, test, k=5)
    top = torch.topk(expected.T, 5)
    assert torch.equal(res.helpful_indices, top.indices)


def test_multi_checkpoint_ensemble_equals_hand_formula_and_subset_rows():
    p, model, ckpts, task, prob = _setup(2)
    attr = TRAKAttributor(task, prob, proj_params=IDENTITY, regularization=REG, verbose=False)
    train, test = p.train_loader(batch_size=16), p.test_loader(batch_size=3)
    attr.cache(train)
    expected, diag = _closed_form(model, ckpts, p, REG)
    scores = attr.attribute(test)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(
        attr.self_attribute().squeeze(),
        diag,
        rtol=1e-7,
        atol=1e-10,
    )
    # after cache, another train loader scores its rows against the cached kernel
    subset = DataLoader(TensorDataset(p.x_train[5:17], p.y_train[5:17]), batch_size=5)
    torch.testing.assert_close(attr.attribute(test, subset), scores[5:17], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        attr.self_attribute(subset).squeeze(),
        attr.attribute(subset, subset).diagonal(),
        rtol=1e-9,
        atol=1e-12,
    )
    full_tt = attr.attribute(train, None)
    torch.testing.assert_close(
        attr.self_attribute(subset).squeeze(), full_tt.diagonal()[5:17], rtol=1e-9, atol=1e-12
    )


def test_layer_name_scales_by_selected_parameter_count():
    p, model, ckpts, task, prob = _setup(1)
    names = ["2.weight", "2.bias"]
    attr = TRAKAttributor(
        task, prob, proj_params=IDENTITY, layer_name=names, regularization=REG, verbose=False
    )
    scores = attr.attribute(p.test_loader(), p.train_loader())
    expected, _ = _closed_form(model, ckpts, p, REG, names=names)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-10)


def test_dense_projection_equals_hand_formula_with_same_projector():
    p, model, ckpts, task, prob = _setup(2)
    params = TRAKProjectionParams(proj_dim=24, proj_seed=5)
    attr = TRAKAttributor(task, prob, proj_params=params, regularization=REG, verbose=False)
    n_param = sum(v.numel() for v in model.parameters())
    proj = random_project(
        torch.zeros(1, n_param, dtype=torch.float64),
        RandomProjectionParams(feature_batch_size=1, device="cpu", **params.model_dump()),
    )
    expected, _ = _closed_form(model, ckpts, p, REG, proj=proj)
    scores = attr.attribute(p.test_loader(), p.train_loader())
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-10)
    again = TRAKAttributor(task, prob, proj_params=params, regularization=REG, verbose=False)
    assert torch.equal(again.attribute(p.test_loader(), p.train_loader()), scores)


def test_projection_4096_correlates_with_unprojected():
    # 80 training samples, 67 parameters: the unprojected kernel is well-conditioned
    # (with a small ridge for the softmax null directions); k=4096 JL projection.
    p, _, _, task, prob = _setup(1, n_train=80, n_test=10, d_in=6, hidden=6)
    train, test = p.train_loader(batch_size=40), p.test_loader()
    reg = 1e-2
    exact = TRAKAttributor(task, prob, proj_params=IDENTITY, regularization=reg, verbose=False)
    projected = TRAKAttributor(
        task,
        prob,
        proj_params=TRAKProjectionParams(proj_dim=4096),
        regularization=reg,
        verbose=False,
    )
    a = exact.attribute(test, train)
    b = projected.attribute(test, train)
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert corr > 0.9


class _DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_dict_batches_defaults_and_errors():
    p, _, _, task, prob = _setup(1)
    attr = TRAKAttributor(task, prob, regularization=REG, verbose=False)
    assert attr.proj_params.model_dump()["proj_dim"] == 512
    assert attr.proj_params.model_dump()["proj_max_batch_size"] == 32
    tup = attr.attribute(p.test_loader(), p.train_loader())
    d_train = DataLoader(_DictDataset(p.x_train, p.y_train), batch_size=11)
    d_test = DataLoader(_DictDataset(p.x_test, p.y_test), batch_size=4)
    torch.testing.assert_close(attr.attribute(d_test, d_train), tup)
    old = TRAKAttributor(
        task,
        prob,
        regularization=REG,
        verbose=False,
        projector_kwargs={
            "proj_dim": 512,
            "proj_max_batch_size": 32,
            "proj_seed": 0,
            "device": "cpu",
        },
    )
    torch.testing.assert_close(old.attribute(p.test_loader(), p.train_loader()), tup)
    with pytest.raises(ValueError, match="regularization"):
        TRAKAttributor(task, prob, regularization=-1.0)
    with pytest.raises(TypeError, match="correct_probability_func"):
        TRAKAttributor(task, None)
    with pytest.raises(TypeError, match="proj_params"):
        TRAKAttributor(task, prob, proj_params={"proj_dim": 3})

    def two_probs(params, data):
        return torch.ones(2)

    bad = TRAKAttributor(task, two_probs, proj_params=IDENTITY, regularization=REG, verbose=False)
    with pytest.raises(ValueError, match="one probability per sample"):
        bad.cache(p.train_loader())


def test_singular_kernel_warns_and_approaches_pseudo_inverse():
    p, model, ckpts, task, prob = _setup(1)
    attr = TRAKAttributor(task, prob, proj_params=IDENTITY, regularization=0.0, verbose=False)
    with pytest.warns(UserWarning, match="singular"):
        scores = attr.attribute(p.test_loader(), p.train_loader())
    # 40 samples < 195 parameters: the limit lambda -> 0 is Phi (Phi^T Phi)^+ phi^T =
    # (Phi Phi^T)^-1 Phi phi^T (Phi has full row rank).
    margin, _ = _make_funcs(model)
    n_param = sum(v.numel() for v in model.parameters())
    big = _loop_grads(model, ckpts[0], margin, p.x_train, p.y_train) / n_param**0.5
    small = _loop_grads(model, ckpts[0], margin, p.x_test, p.y_test) / n_param**0.5
    limit = torch.linalg.solve(big @ big.T, big @ small.T)
    limit = _q(model, ckpts[0], p.x_train, p.y_train)[:, None] * limit
    torch.testing.assert_close(scores, limit, rtol=1e-6, atol=1e-9 * limit.abs().max().item())
    # factor_kernel: exact inverse when regular, pseudo-inverse when singular
    phi = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kern = phi.T @ phi + 0.5 * torch.eye(8, dtype=phi.dtype)
    inv = factor_kernel(phi, 0.5)
    assert inv.chol is not None
    torch.testing.assert_close(inv.matrix(), torch.linalg.inv(kern))
    torch.testing.assert_close(inv.apply(phi[:3]), phi[:3] @ torch.linalg.inv(kern))
    with pytest.warns(UserWarning, match="rank 5"):
        pinv = factor_kernel(phi[:5], 0.0)
    torch.testing.assert_close(pinv.matrix(), torch.linalg.pinv(phi[:5].T @ phi[:5]))


def test_default_regularization_is_automatic_per_checkpoint():
    """regularization=None: lambda_k = 0.1 * tr(Phi_k^T Phi_k) / min(n, d, p) per checkpoint."""
    p, model, ckpts, task, prob = _setup(2)
    attr = TRAKAttributor(task, prob, proj_params=IDENTITY, verbose=False)
    assert attr.regularization is None
    train, test = p.train_loader(batch_size=16), p.test_loader(batch_size=4)
    attr.cache(train)
    margin, _ = _make_funcs(model)
    n_param = sum(v.numel() for v in model.parameters())
    n = len(p.x_train)
    assert n < n_param  # the rank bound is the sample count here
    kern, lams = 0, []
    for c in ckpts:
        big = _loop_grads(model, c, margin, p.x_train, p.y_train) / n_param**0.5
        small = _loop_grads(model, c, margin, p.x_test, p.y_test) / n_param**0.5
        lam = 0.1 * (big * big).sum() / min(n, n_param)
        lams.append(float(lam))
        inv = torch.linalg.inv(big.T @ big + lam * torch.eye(n_param, dtype=big.dtype))
        kern = kern + big @ inv @ small.T / len(ckpts)
    q = sum(_q(model, c, p.x_train, p.y_train) for c in ckpts) / len(ckpts)
    expected = q[:, None] * kern
    used = [inv.regularization for inv in attr._store.state["inverse"]]
    torch.testing.assert_close(torch.tensor(used), torch.tensor(lams), rtol=1e-9, atol=0)
    torch.testing.assert_close(attr.attribute(test), expected, rtol=1e-6, atol=1e-10)
    # the automatic value is scale-free: scaling the features leaves the scores unchanged
    phi = torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, b = factor_kernel(phi, None), factor_kernel(7.0 * phi, None)
    assert a.regularization == pytest.approx(0.1 * float((phi * phi).sum()) / 8)
    torch.testing.assert_close(7.0 * b.apply(7.0 * phi[:2]), a.apply(phi[:2]))
    # max_rank bounds the averaging rank (e.g. fewer parameters than features)
    c = factor_kernel(phi, None, max_rank=4)
    assert c.regularization == pytest.approx(0.1 * float((phi * phi).sum()) / 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    p, model, ckpts, _, _ = _setup(2)
    results = {}
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(dev)
        margin, prob = _make_funcs(m)
        task = AttributionTask(margin, m, [{k: v.to(dev) for k, v in c.items()} for c in ckpts])
        attr = TRAKAttributor(task, prob, regularization=REG, device=dev, verbose=False)
        attr.cache(p.train_loader())
        results[dev] = (attr.attribute(p.test_loader()), attr.self_attribute())
    assert results["cuda"][0].device.type == "cuda"
    torch.testing.assert_close(results["cuda"][0].cpu(), results["cpu"][0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(results["cuda"][1].cpu(), results["cpu"][1], rtol=1e-5, atol=1e-8)
