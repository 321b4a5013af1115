"""Regression tests: behaviours that must match upstream dattri 0.3 (issue #15, item 4).

One test (or a small group) per difference found between our package and the upstream
reference (``shared/reference/upstream-api.md`` sections 1-9 and 14). Every numeric check
is against a brute-force reference on a tiny problem.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import DVEmbAttributor, IFAttributorDataInf
from dattri.func.projection import ArnoldiProjector, arnoldi_project
from dattri.metric import lds, loo_corr, mislabel_detection_auc
from dattri.model_util import retrain_lds, retrain_loo
from dattri.params.projection import DVEmbProjectionParams
from dattri.task import AttributionTask

# --------------------------------------------------------------------------- metrics dtypes


def _lds_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    score = rng.normal(size=(12, 3))
    idx = np.stack([rng.choice(12, 6, replace=False) for _ in range(8)])
    gt = rng.normal(size=(8, 3))
    return score, idx, gt


@pytest.mark.parametrize(
    ("score_dtype", "gt_dtype", "out_dtype"),
    [
        (torch.float32, torch.float64, torch.float32),
        (torch.float64, torch.float32, torch.float64),
        (torch.float32, torch.float32, torch.float32),
        (torch.float16, torch.float64, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
    ],
)
def test_lds_mixed_dtypes_in_score_dtype(score_dtype, gt_dtype, out_dtype):
    """Mixed float dtypes are accepted; results come back in the score's dtype (upstream)."""
    score, idx, gt = _lds_problem()
    s = torch.tensor(score).to(score_dtype)
    g = torch.tensor(gt).to(gt_dtype)
    corr, pval = lds(s, (g, torch.tensor(idx)))
    assert corr.dtype == pval.dtype == out_dtype
    # upstream-style comparison against a tensor of the score's dtype must not raise
    assert torch.allclose(corr, corr.clone())
    # values: scipy on the float64 view of the (possibly rounded) inputs
    s64, g64 = s.double().numpy(), g.double().numpy()
    for j in range(3):
        pred = np.array([s64[row, j].sum() for row in idx])
        ref = stats.spearmanr(pred, g64[:, j])
        assert corr[j].item() == pytest.approx(ref.statistic, abs=1e-6)
        assert pval[j].item() == pytest.approx(ref.pvalue, rel=1e-5, abs=1e-7)


def test_lds_float32_against_upstream_expected_tensors():
    """Upstream's own unit test: float32 scores compared with float32 expectations."""
    score = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.4]], dtype=torch.float32)
    gt_values = torch.tensor([[0.3, 0.3], [0.4, 0.4], [0.5, 0.3]], dtype=torch.float64)
    indices = torch.tensor([[0, 1], [0, 2], [1, 2]])
    corr, pval = lds(score.T, (gt_values, indices))
    assert torch.allclose(corr, torch.tensor([1.0, 0.8660254037844387], dtype=torch.float32))
    assert torch.allclose(pval, torch.tensor([0.0, 0.3333333333333332], dtype=torch.float32))


def test_loo_corr_mixed_dtypes_against_upstream_expected_tensors():
    score = torch.tensor([[0.1, 0.4], [0.2, 0.3], [0.3, 0.2], [0.4, 0.1]], dtype=torch.float32)
    gt_values = torch.tensor([[1, 1], [2, 3], [3, 2], [4, 4]], dtype=torch.float64)
    corr, pval = loo_corr(score, (gt_values, torch.tensor([0, 1, 2, 3])))
    assert corr.dtype == torch.float32
    assert torch.allclose(corr, torch.tensor([1.0, -0.8]))
    assert torch.allclose(pval, torch.tensor([4.4409e-16, 2.0000e-01]))
    corr64, _ = loo_corr(score.double(), (gt_values.float(), None))
    ref = stats.pearsonr(score[:, 1].double().numpy(), gt_values[:, 1].numpy())
    assert corr64.dtype == torch.float64
    assert corr64[1].item() == pytest.approx(ref.statistic, abs=1e-12)


@pytest.mark.parametrize("score_dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.bool, torch.int64, torch.float32, torch.float64])
def test_mislabel_auc_mixed_dtypes(score_dtype, label_dtype):
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.normal(size=40)).to(score_dtype)
    y = torch.tensor(rng.integers(0, 2, size=40)).to(label_dtype)
    auc, (fpr, tpr, _) = mislabel_detection_auc(s, y)
    ref = roc_auc_score(y.double().numpy(), s.double().numpy())
    assert auc.item() == pytest.approx(ref, abs=1e-12)
    assert fpr[0] == 0 and tpr[-1] == 1


# --------------------------------------------------------------------------- Arnoldi projector


def _quadratic(p: int, seed: int, sign: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    h = sign * (a @ a.T + p * torch.eye(p, dtype=torch.float64))

    def f(x):
        return 0.5 * x @ h @ x

    return f, h


def test_arnoldi_proj_dim_above_feature_dim_gives_all_directions():
    """Upstream: proj_dim is capped by what Arnoldi finds (with a warning), never empty."""
    p = 5
    f, h = _quadratic(p, seed=0)
    proj = ArnoldiProjector(p, 12, f, torch.zeros(p, dtype=torch.float64), verbose=False)
    g = torch.randn(4, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="reduced to 5"):
        z = proj.project(g)
    assert z.shape == (4, p) and proj.proj_dim == p
    # full eigenspace: projected inner products are exactly g1^T H^-1 g2
    torch.testing.assert_close(z @ z.T, g @ torch.linalg.solve(h, g.T), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("proj_dim", [1, 3, 20])
def test_arnoldi_no_positive_eigenvalue_raises_instead_of_empty(proj_dim):
    p = 4
    f, _ = _quadratic(p, seed=2, sign=-1.0)  # negative definite Hessian
    proj = ArnoldiProjector(p, proj_dim, f, torch.zeros(p, dtype=torch.float64), verbose=False)
    with pytest.raises(ValueError, match="empty.*regularization"):
        proj.project(torch.ones(2, p, dtype=torch.float64))
    fn = arnoldi_project(p, f, torch.zeros(p, dtype=torch.float64), proj_dim=proj_dim)
    with pytest.raises(ValueError, match="0 columns"):
        fn(torch.ones(2, p, dtype=torch.float64))
    # a regularization that makes H + lambda I positive definite fixes it
    _, h = _quadratic(p, seed=2, sign=-1.0)
    lam = float(-torch.linalg.eigvalsh(h).min()) + 1.0
    ok = ArnoldiProjector(
        p, proj_dim, f, torch.zeros(p, dtype=torch.float64), regularization=lam, verbose=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert ok.project(torch.ones(2, p, dtype=torch.float64)).shape == (2, min(proj_dim, p))


# --------------------------------------------------------------------------- retraining


class _Trainer:
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, loader, seed=None):
        model = nn.Linear(2, 1)
        with torch.no_grad():
            model.weight.fill_(self.scale)
            model.bias.fill_(float(seed or 0) % 97)
        return model


def train_linear(loader, seed=None):
    return _Trainer()(loader, seed)


def other_train_linear(loader, seed=None):
    return _Trainer(2.0)(loader, seed)


class _Holder:
    @staticmethod
    def nested_train(loader, seed=None):
        return _Trainer()(loader, seed)


def _loader(n: int = 10):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=3)


@pytest.mark.parametrize(
    ("func", "name"),
    [
        (train_linear, "train_linear"),
        (_Holder.nested_train, "nested_train"),  # __name__, not the qualified name
        (functools.partial(train_linear), "train_linear"),
        (_Trainer(), "_Trainer"),
    ],
)
def test_retrain_metadata_records_train_func_name_as_upstream(tmp_path, func, name):
    retrain_lds(func, _loader(), tmp_path / "lds", num_subsets=2, seed=0, verbose=False)
    meta = yaml.safe_load((tmp_path / "lds" / "metadata.yml").read_text())
    assert meta["train_func"] == name
    assert set(meta) >= {"mode", "data_length", "train_func", "subset_dir_map"}
    assert len(meta["subset_dir_map"]) == meta["num_subsets"] == 2
    retrain_loo(func, _loader(4), tmp_path / "loo", indices=[0, 1], verbose=False)
    meta = yaml.safe_load((tmp_path / "loo" / "metadata.yml").read_text())
    assert meta["train_func"] == name


def test_retrain_lds_second_call_other_arguments_names_fields(tmp_path):
    path = tmp_path / "run"
    retrain_lds(train_linear, _loader(), path, num_subsets=2, seed=3, verbose=False)
    with pytest.raises(ValueError, match="different retraining") as err:
        retrain_lds(
            train_linear,
            _loader(),
            path,
            num_subsets=2,
            subset_ratio=0.3,
            num_runs_per_subset=2,
            seed=4,
            verbose=False,
        )
    msg = str(err.value)
    for field in ("subset_ratio: 0.5 recorded, 0.3", "num_runs_per_subset: 1 recorded, 2", "seed"):
        assert field in msg
    assert "Fix" in msg and "new `path`" in msg
    with pytest.raises(ValueError, match="train_func: 'train_linear' recorded"):
        retrain_lds(other_train_linear, _loader(), path, num_subsets=2, seed=3, verbose=False)
    with pytest.raises(
        ValueError, match=r"data_length: 10 recorded, 12.*len\(dataloader.sampler\)"
    ):
        retrain_lds(train_linear, _loader(12), path, num_subsets=2, seed=3, verbose=False)
    # the same arguments resume / extend the run without error
    retrain_lds(train_linear, _loader(), path, num_subsets=3, seed=3, verbose=False)
    meta = yaml.safe_load((path / "metadata.yml").read_text())
    assert meta["num_subsets"] == 3 and len(meta["subset_dir_map"]) == 3


def test_retrain_loo_second_call_other_arguments_names_fields(tmp_path):
    path = tmp_path / "loo"
    retrain_loo(train_linear, _loader(4), path, indices=[0], verbose=False)
    with pytest.raises(ValueError, match="data_length: 4 recorded, 5"):
        retrain_loo(train_linear, _loader(5), path, indices=[1], verbose=False)
    with pytest.raises(ValueError, match="train_func"):
        retrain_loo(other_train_linear, _loader(4), path, indices=[1], verbose=False)
    retrain_lds(train_linear, _loader(4), tmp_path / "lds", num_subsets=2, seed=0, verbose=False)
    with pytest.raises(ValueError, match="mode: 'lds' recorded"):
        retrain_loo(train_linear, _loader(4), tmp_path / "lds", indices=[1], verbose=False)


# --------------------------------------------------------------------------- DVEmb attributes


def _dvemb_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(8, 5)
    y = torch.randint(0, 3, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)

    def functional_loss(params, data):
        xi, yi = data
        out = functional_call(model, params, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    def eager_loss(model_, batch, device):
        xb, yb = batch
        return nn.functional.cross_entropy(model_(xb.to(device)), yb.to(device))

    ckpt = [model.state_dict()]
    task = AttributionTask(loss_func=functional_loss, model=model, checkpoints=ckpt)
    task_eager = AttributionTask(loss_func=eager_loss, model=model, checkpoints=ckpt)
    return model, loader, task, task_eager


def _record(attributor, loader, epochs: int = 2, lr: float = 0.05):
    for epoch in range(epochs):
        for i, (xb, yb) in enumerate(loader):
            idx = torch.arange(i * 4, i * 4 + len(xb))
            attributor.cache_gradients(epoch, (xb, yb), idx, lr)


def _exact_grads(model, x, y):
    rows = []
    for xi, yi in zip(x, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def test_dvemb_default_proj_params_and_projector_as_upstream():
    _, loader, task, _ = _dvemb_setup()
    attr = DVEmbAttributor(task=task, verbose=False)
    assert attr.proj_params.proj_dim_per_layer is None
    assert attr.proj_params.proj_max_batch_size == 64
    assert attr.projector is None and attr.random_projectors is None
    assert attr.projection_dim_per_layer is None and attr.projection_dim is None
    k = 6
    attr = DVEmbAttributor(
        task=task,
        proj_params=DVEmbProjectionParams(proj_dim_per_layer=k, proj_type="normal"),
        verbose=False,
    )
    _record(attr, loader)
    attr.cache(memory_saving=False)
    assert attr.projector is not None
    assert attr.cached_gradients[0][0].shape == (4, k)
    # the projector maps the exact per-sample gradients to the cached rows
    xb, yb = next(iter(loader))
    exact = _exact_grads(attr.model, xb, yb)
    torch.testing.assert_close(attr.projector(exact), attr.cached_gradients[0][0])


def test_dvemb_cached_factors_reconstruct_exact_gradients():
    model, loader, _, task_eager = _dvemb_setup()
    attr = DVEmbAttributor(task=task_eager, factorization_type="kronecker", verbose=False)
    assert [id(m) for m in attr._linear_layers] == [id(model[0]), id(model[2])]
    _record(attr, loader)
    attr.cache(memory_saving=False)
    assert sorted(attr.cached_factors) == [0, 1]
    assert len(attr.cached_factors[0]) == 2  # steps of epoch 0
    step = attr.cached_factors[0][0]
    assert len(step) == 2  # one entry per Linear layer
    assert step[0]["A"].shape == (4, 5) and step[0]["B"].shape == (4, 4)
    assert step[1]["A"].shape == (4, 4) and step[1]["B"].shape == (4, 3)
    assert step[0]["has_bias"] and step[1]["has_bias"]
    # upstream's reconstruction [B A^T flattened, B] per layer = exact per-sample gradients
    parts = []
    for layer in step:
        parts += [(layer["B"].unsqueeze(2) @ layer["A"].unsqueeze(1)).flatten(1), layer["B"]]
    xb, yb = next(iter(loader))
    exact = _exact_grads(model, xb, yb)
    torch.testing.assert_close(torch.cat(parts, 1), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attr.cached_gradients[0][0], exact, rtol=1e-5, atol=1e-6)
    attr.clear_cache()
    assert attr.cached_factors == {}


def test_dvemb_random_projectors_reproduce_cached_gradients():
    model, loader, _, task_eager = _dvemb_setup()
    k = 9
    params = DVEmbProjectionParams(proj_dim_per_layer=k, proj_type="normal")
    attr = DVEmbAttributor(
        task=task_eager, proj_params=params, factorization_type="kronecker", verbose=False
    )
    assert attr.projection_dim == attr.projection_dim_per_layer == math.isqrt(k)
    _record(attr, loader)
    attr.cache(memory_saving=False)
    assert attr.cached_factors == {}  # projected modes keep projected gradients only
    projs = attr.random_projectors
    assert len(projs) == 2
    xb, yb = next(iter(loader))
    # layer 2's input and output gradient of each sample, from autograd
    h = torch.tanh(model[0](xb))
    logits = model[2](h)
    ds = torch.softmax(logits, 1) - nn.functional.one_hot(yb, 3).to(logits)
    proj_in, proj_out = projs[1]
    assert proj_in(h.detach()).shape == (4, 3) and proj_out(ds.detach()).shape == (4, 3)
    expected = (proj_out(ds.detach()).unsqueeze(2) @ proj_in(h.detach()).unsqueeze(1)).flatten(1)
    torch.testing.assert_close(attr.cached_gradients[0][0][:, 9:], expected, rtol=1e-5, atol=1e-6)

    elem = DVEmbAttributor(
        task=task_eager, proj_params=params, factorization_type="elementwise", verbose=False
    )
    assert elem.projection_dim == k
    _record(elem, loader, epochs=1)
    assert elem.cached_gradients[0][0].shape == (4, 2 * k)


# --------------------------------------------------------------------------- DataInf


def test_datainf_cached_train_reps_upstream_shape_and_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=[model.state_dict()])
    x = torch.randn(20, 3)
    y = torch.randint(0, 2, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    reg = 0.3
    attr = IFAttributorDataInf(task, regularization=reg, fim_estimate_data_ratio=0.5, verbose=False)
    with pytest.raises(ValueError, match="call cache"):
        _ = attr._cached_train_reps
    attr.cache(loader)
    reps = attr._cached_train_reps
    assert list(reps) == [0] and len(reps) == 1
    g = reps[0]
    assert g.shape == (12, 26)  # first ceil(5 * 0.5) = 3 batches of 4
    torch.testing.assert_close(g, _exact_grads(model, x[:12], y[:12]), rtol=1e-5, atol=1e-6)
    # the transform equals upstream's closed form computed from these reps
    v = torch.randn(3, 26)
    expected = []
    for lo, hi in ((0, 16), (16, 26)):  # layers: Linear(3, 4), Linear(4, 2)
        gl, vl = g[:, lo:hi], v[:, lo:hi]
        coef = (vl @ gl.T) / (reg + (gl**2).sum(1))
        expected.append(((vl[:, None, :] - coef[..., None] * gl[None]) / reg).mean(1))
    torch.testing.assert_close(
        attr.transform_test_rep(0, v), torch.cat(expected, 1), rtol=1e-4, atol=1e-5
    )


# --------------------------------------------------------------------------- module names


def test_supported_ihvp_solver_table_solves_a_quadratic():
    from dattri.algorithm.influence_function import SUPPORTED_IHVP_SOLVER, _lissa_collate_fn

    assert set(SUPPORTED_IHVP_SOLVER) == {"explicit", "cg", "arnoldi", "lissa"}
    p = 4
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    h = a @ a.T / p + torch.eye(p, dtype=torch.float64)
    v = torch.randn(2, p, generator=gen, dtype=torch.float64)

    def f(x):
        return 0.5 * x @ h @ x

    exact = torch.linalg.solve(h, v.T).T
    x0 = (torch.zeros(p, dtype=torch.float64),)
    torch.testing.assert_close(SUPPORTED_IHVP_SOLVER["explicit"](f)(x0, v), exact)
    torch.testing.assert_close(SUPPORTED_IHVP_SOLVER["cg"](f, max_iter=p)(x0, v), exact)
    arn = SUPPORTED_IHVP_SOLVER["arnoldi"](f, max_iter=p)
    torch.testing.assert_close(arn(x0, v), exact)
    params = torch.zeros(p, dtype=torch.float64)
    xs, ys = torch.ones(3, 2), torch.tensor([0, 1, 1])
    got = _lissa_collate_fn((params, xs, ys))
    assert got[0] is params and got[1][0] is xs and got[1][1].dtype == torch.int64


def test_unflatten_params_helpers_accept_upstream_call_forms():
    from dattri.func.utils import _unflatten_params, _unflatten_params_layerwise

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    by_model = _unflatten_params(flat, model)
    parts = tuple(q.detach().flatten() for q in model.parameters())
    layerwise = _unflatten_params_layerwise(parts, model)
    for name, q in model.named_parameters():
        assert torch.equal(by_model[name], q.detach())
        assert torch.equal(layerwise[name], q.detach())


def test_model_util_ensemble_module_importable():
    importlib.import_module("dattri.model_util.ensemble")


def test_task_flatten_false_with_layer_name_raises_not_implemented():
    model = nn.Linear(2, 1)
    task = AttributionTask(
        loss_func=lambda params, data: functional_call(model, params, (data,)).sum(),
        model=model,
        checkpoints=[model.state_dict()],
    )
    with pytest.raises(NotImplementedError):
        task.get_loss_func(flatten=False, layer_name=["weight"])
    with pytest.raises(ValueError, match="layer_name"):  # also a ValueError (ours)
        task.get_target_func(flatten=False, layer_name=["weight"])


# --------------------------------------------------------------------------- signatures

#: Upstream signatures (reference sections 2-9): ``module:qualname -> parameters``.
UPSTREAM_SIGNATURES = {
    "dattri.task:AttributionTask": (
        "loss_func, model, checkpoints, target_func=None, checkpoints_load_func=None"
    ),
    "dattri.task:AttributionTask.get_param": (
        "self, ckpt_idx=0, layer_name=None, layer_split=False, param_layer_map=None"
    ),
    "dattri.task:AttributionTask.get_grad_loss_func": (
        "self, in_dims=(None, 1), layer_name=None, ckpt_idx=None"
    ),
    "dattri.task:AttributionTask.get_grad_target_func": (
        "self, in_dims=(None, 1), layer_name=None, ckpt_idx=None"
    ),
    "dattri.task:AttributionTask.get_loss_func": (
        "self, flatten=True, layer_name=None, ckpt_idx=None"
    ),
    "dattri.task:AttributionTask.get_target_func": (
        "self, flatten=True, layer_name=None, ckpt_idx=None"
    ),
    "dattri.algorithm.base:BaseInnerProductAttributor": "task, layer_name=None, device='cpu'",
    "dattri.algorithm.base:BaseInnerProductAttributor.attribute": (
        "self, train_dataloader, test_dataloader, relatif_method=None"
    ),
    "dattri.algorithm.base:BaseInnerProductAttributor.self_attribute": (
        "self, train_dataloader, relatif_method=None"
    ),
    "dattri.algorithm:IFAttributorExplicit": (
        "task, layer_name=None, device='cpu', regularization=0.0"
    ),
    "dattri.algorithm:IFAttributorCG": (
        "task, layer_name=None, device='cpu', max_iter=10, tol=1e-07, mode='rev-rev', "
        "regularization=0.0"
    ),
    "dattri.algorithm:IFAttributorArnoldi": (
        "task, layer_name=None, device='cpu', precompute_data_ratio=1.0, proj_dim=100, "
        "max_iter=100, norm_constant=1.0, tol=1e-07, regularization=0.0, seed=0"
    ),
    "dattri.algorithm:IFAttributorLiSSA": (
        "task, layer_name=None, device='cpu', batch_size=1, num_repeat=1, "
        "recursion_depth=5000, damping=0.0, scaling=50.0, mode='rev-rev'"
    ),
    "dattri.algorithm:IFAttributorDataInf": (
        "task, layer_name=None, device='cpu', regularization=0.0, fim_estimate_data_ratio=1.0"
    ),
    "dattri.algorithm:IFAttributorEKFAC": "task, module_name=None, device='cpu', damping=0.0",
    "dattri.algorithm:IFAttributorEKFAC.cache": "self, full_train_dataloader, max_iter=None",
    "dattri.algorithm:TracInAttributor": (
        "task, weight_list, normalized_grad, proj_params=None, layer_name=None, device='cpu'"
    ),
    "dattri.algorithm:TracInAttributor.attribute": "self, train_dataloader, test_dataloader",
    "dattri.algorithm:TracInAttributor.self_attribute": "self, train_dataloader",
    # regularization: upstream default 0.0, ours None (automatic damping), see below
    "dattri.algorithm:TRAKAttributor": (
        "task, correct_probability_func, proj_params=None, layer_name=None, device='cpu'"
    ),
    "dattri.algorithm:TRAKAttributor.cache": "self, full_train_dataloader",
    "dattri.algorithm:TRAKAttributor.attribute": "self, test_dataloader, train_dataloader=None",
    "dattri.algorithm:TRAKAttributor.self_attribute": "self, train_dataloader=None",
    "dattri.algorithm:RPSAttributor": (
        "task, final_linear_layer_name, normalize_preactivate=False, l2_strength=0.003, "
        "epoch=3000, device='cpu'"
    ),
    "dattri.algorithm:KNNShapleyAttributor": "k_neighbors, task=None, distance_func=None",
    "dattri.algorithm:KNNShapleyAttributor.attribute": (
        "self, train_dataloader, test_dataloader, train_labels=None, test_labels=None"
    ),
    "dattri.algorithm.data_shapley:default_dist_func": "batch_x, batch_y",
    "dattri.algorithm:BlockProjectedIFAttributor": (
        "task, layer_names=None, hessian='eFIM', damping=None, device='cpu', "
        "sparsifier_params=None, projector_params=None, offload='cpu', cache_dir=None, "
        "chunk_size=16"
    ),
    "dattri.algorithm:LoGraAttributor": (
        "task, layer_names=None, hessian='eFIM', damping=None, device='cpu', proj_params=None, "
        "offload='cpu', cache_dir=None, chunk_size=16"
    ),
    "dattri.algorithm:FactGraSSAttributor": (
        "task, layer_names=None, hessian='eFIM', damping=None, device='cpu', proj_params=None, "
        "blowup_factor=4, offload='cpu', cache_dir=None, chunk_size=16"
    ),
    "dattri.algorithm:BlockProjectedIFAttributor.compute_preconditioners": "self, damping=None",
    "dattri.algorithm:DVEmbAttributor": (
        "task, proj_params=None, factorization_type='none', layer_names=None"
    ),
    "dattri.algorithm:DVEmbAttributor.cache_gradients": (
        "self, epoch, batch_data, indices, learning_rate"
    ),
    "dattri.algorithm:DVEmbAttributor.cache_gradients_context": (
        "self, epoch, indices, learning_rate"
    ),
    "dattri.algorithm:DVEmbAttributor.cache": (
        "self, gradients=None, learning_rates=None, memory_saving=True"
    ),
    "dattri.algorithm:DVEmbAttributor.attribute": (
        "self, test_dataloader, epoch=None, train_data_indices=None"
    ),
    "dattri.algorithm.utils:backtracking_line_search": (
        "theta, grad_theta, loss_func, x, y, val, lambda_l2"
    ),
    "dattri.algorithm.utils:rps_finetune_theta": (
        "x, y, init_theta, loss_func, lambda_l2, num_epoch, device='cpu'"
    ),
    "dattri.algorithm.utils:get_rps_weight": (
        "finetuned_theta, loss_func, x_train, y_pred_train, y_test, lambda_l2"
    ),
    "dattri.func.hessian:hvp": "func, argnums=0, mode='rev-rev', regularization=0.0",
    "dattri.func.hessian:hvp_at_x": "func, x, argnums=0, mode='rev-rev', regularization=0.0",
    "dattri.func.hessian:ihvp_explicit": "func, argnums=0, regularization=0.0",
    "dattri.func.hessian:ihvp_at_x_explicit": "func, *x, argnums=0, regularization=0.0",
    "dattri.func.hessian:ihvp_cg": (
        "func, argnums=0, max_iter=10, tol=1e-07, mode='rev-rev', regularization=0.0"
    ),
    "dattri.func.hessian:ihvp_at_x_cg": (
        "func, *x, argnums=0, max_iter=10, tol=1e-07, mode='rev-rev', regularization=0.0"
    ),
    "dattri.func.hessian:ihvp_arnoldi": (
        "func, argnums=0, max_iter=100, tol=1e-07, mode='rev-fwd', regularization=0.0"
    ),
    "dattri.func.hessian:ihvp_at_x_arnoldi": (
        "func, *x, argnums=0, max_iter=100, top_k=100, norm_constant=1.0, tol=1e-07, "
        "mode='rev-fwd', regularization=0.0"
    ),
    "dattri.func.hessian:ihvp_lissa": (
        "func, argnums=0, batch_size=1, num_repeat=1, recursion_depth=5000, damping=0.0, "
        "scaling=50.0, collate_fn=None, mode='rev-rev'"
    ),
    "dattri.func.hessian:ihvp_at_x_lissa": (
        "func, *x, in_dims=None, argnums=0, batch_size=1, num_repeat=1, recursion_depth=5000, "
        "damping=0.0, scaling=50.0, collate_fn=None, mode='rev-rev'"
    ),
    "dattri.func.fisher:ifvp_explicit": "func, argnums=0, regularization=0.0",
    "dattri.func.fisher:ifvp_at_x_explicit": "func, *x, argnums=0, regularization=0.0",
    "dattri.func.fisher:estimate_covariance": (
        "func, dataloader, layer_cache, max_iter=None, device='cpu'"
    ),
    "dattri.func.fisher:estimate_eigenvector": "covariances",
    "dattri.func.fisher:estimate_lambda": (
        "func, dataloader, eigenvectors, layer_cache, max_iter=None, device='cpu'"
    ),
    "dattri.func.projection:BasicProjector": (
        "feature_dim, proj_dim, seed, proj_type, device, block_size=100, "
        "dtype=torch.float32, ensemble_id=0"
    ),
    "dattri.func.projection:CudaProjector": (
        "feature_dim, proj_dim, seed, proj_type, device, dtype=torch.float32, grass_multiplier=4"
    ),
    "dattri.func.projection:ArnoldiProjector": (
        "feature_dim, proj_dim, func, x, argnums=0, max_iter=100, norm_constant=1.0, "
        "tol=1e-07, mode='rev-fwd', regularization=0.0, seed=0, device='cpu'"
    ),
    "dattri.func.projection:arnoldi_project": (
        "feature_dim, func, x, argnums=0, proj_dim=100, max_iter=100, norm_constant=1.0, "
        "tol=1e-07, mode='rev-fwd', regularization=0.0, seed=0, device='cpu'"
    ),
    "dattri.func.projection:random_project": "feature, proj_params",
    "dattri.func.utils:flatten_func": "model, param_num=0",
    "dattri.func.utils:partial_param": "full_param, layer_name, param_num=0",
    "dattri.func.utils:get_parameter_chunk_sizes": "param_shape_list, batch_size",
    "dattri.metric:lds": "score, ground_truth",
    "dattri.metric:loo_corr": "score, ground_truth",
    "dattri.metric:mislabel_detection_auc": "score, ground_truth",
    "dattri.metric:calculate_lds_ground_truth": "target_func, retrain_dir, test_dataloader",
    "dattri.metric:calculate_loo_ground_truth": "target_func, retrain_dir, test_dataloader",
    "dattri.metric:brittleness": (
        "train_loader, test_loader, scores, train_func, eval_func, device='cpu', search_space=None"
    ),
    "dattri.metric.britteness:check_if_flip": (
        "train_loader, test_loader, indices_to_remove, train_func, eval_func, device='cpu'"
    ),
    "dattri.model_util.retrain:retrain_loo": (
        "train_func, dataloader, path, indices=None, seed=None, **kwargs"
    ),
    "dattri.model_util.retrain:retrain_lds": (
        "train_func, dataloader, path, num_subsets=100, subset_ratio=0.5, "
        "num_runs_per_subset=1, start_id=0, total_num_subsets=0, seed=None, **kwargs"
    ),
    "dattri.model_util.dropout:activate_dropout": "model, layer_positions=None, dropout_prob=0.1",
    "dattri.model_util.hook:get_final_layer_io": (
        "model, final_linear_layer_name, dataloader, device='cpu'"
    ),
}


def _resolve(key: str):
    mod, qual = key.split(":")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _params_of(spec: str) -> list[inspect.Parameter]:
    namespace = {"torch": torch}
    exec(f"def _stub({spec}): pass", namespace)  # fixed strings of this file
    return list(inspect.signature(namespace["_stub"]).parameters.values())


@pytest.mark.parametrize("key", sorted(UPSTREAM_SIGNATURES))
def test_signature_compatible_with_upstream(key):
    """Upstream's parameters come first, in order, same kinds and defaults.

    Ours may only add parameters that cannot change an upstream call: keyword-only
    ones, or trailing positional ones with a default.
    """
    expected = _params_of(UPSTREAM_SIGNATURES[key])
    known = {p.name for p in expected}
    got = [
        p
        for p in inspect.signature(_resolve(key)).parameters.values()
        if p.kind != p.KEYWORD_ONLY or p.name in known  # our extra keyword-only options
    ]
    names = [p.name for p in got]
    assert names[: len(expected)] == [p.name for p in expected], names
    for exp, have in zip(expected, got):
        assert have.kind == exp.kind, (exp.name, have.kind)
        if exp.default is inspect.Parameter.empty:
            assert have.default is inspect.Parameter.empty, exp.name
        else:
            assert have.default == exp.default, (exp.name, have.default)
    for extra in got[len(expected) :]:
        assert extra.kind in (extra.KEYWORD_ONLY, extra.VAR_KEYWORD) or (
            extra.default is not inspect.Parameter.empty
        ), extra.name


def test_trak_regularization_default_is_automatic_damping():
    """Deliberate difference: upstream's 0.0 leaves Phi^T Phi singular for n < d."""
    from dattri.algorithm import TRAKAttributor

    default = inspect.signature(TRAKAttributor).parameters["regularization"].default
    assert default is None


# --------------------------------------------------------------------------- upstream LOO dirs


def test_loo_ground_truth_reads_upstream_metadata_with_pathlib_tags(tmp_path):
    """Upstream's retrain_loo dumped ``Path`` objects into metadata.yml (safe_load fails)."""
    import pathlib

    from dattri.metric import calculate_loo_ground_truth

    run = tmp_path / "upstream_loo"
    for k in (0, 1, 2):
        (run / f"index_{k}").mkdir(parents=True)
        model = nn.Linear(1, 1)
        with torch.no_grad():
            model.weight.fill_(float(k))
            model.bias.zero_()
        torch.save(model, run / f"index_{k}" / "model_weights.pt")  # pickled, as upstream
    meta = {
        "mode": "loo",
        "data_length": 3,
        "train_func": "train_linear",
        "indices": [0, 1, 2],
        "map_index_dir": {k: pathlib.Path(run) / f"index_{k}" for k in (0, 1, 2)},
    }
    (run / "metadata.yml").write_text(yaml.dump(meta))  # python/object tags
    assert "python/object/apply:pathlib" in (run / "metadata.yml").read_text()
    test_loader = DataLoader(TensorDataset(torch.tensor([[1.0], [2.0]])), batch_size=2)

    def target_func(ckpt_path, loader):
        model = torch.load(ckpt_path, weights_only=False)  # trusted files of this test
        return torch.cat([model(x).flatten() for (x,) in loader]).detach()

    values, removed = calculate_loo_ground_truth(target_func, run, test_loader)
    assert removed.tolist() == [0, 1, 2]
    torch.testing.assert_close(values, torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]))
    # a real code-execution tag is still refused
    (run / "metadata.yml").write_text("mode: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        calculate_loo_ground_truth(target_func, run, test_loader)


# --------------------------------------------------------------------------- params errors


def test_projection_params_errors_are_value_errors_like_pydantic():
    from dattri.params.projection import RandomProjectionParams, TRAKProjectionParams

    with pytest.raises(ValueError, match="feature_batch_size"):  # pydantic: ValidationError
        RandomProjectionParams(proj_dim=3)
    with pytest.raises(TypeError, match="proj_dim must be an int"):  # and still a TypeError
        TRAKProjectionParams(proj_dim=1.5)
    with pytest.raises(ValueError, match="proj_dim"):
        TRAKProjectionParams(proj_dim=1.5)


def test_lds_ground_truth_reads_upstream_layout_with_cwd_relative_paths(tmp_path, monkeypatch):
    """Upstream wrote ``subset_dir_map`` entries relative to the working directory."""
    from dattri.metric import calculate_lds_ground_truth

    monkeypatch.chdir(tmp_path)
    rel = "runs/lds"  # as passed to upstream's retrain_lds(path="runs/lds")
    subsets = [[0, 2], [1, 3], [2, 3]]
    for i, idx in enumerate(subsets):
        d = tmp_path / rel / str(i)
        d.mkdir(parents=True)
        (d / "indices.txt").write_text("".join(f"{k}\n" for k in idx))
        for j in range(2):
            model = nn.Linear(1, 1)
            with torch.no_grad():
                model.weight.fill_(float(i + j))
                model.bias.zero_()
            torch.save(model.state_dict(), d / f"model_weights_{j}.pt")
    meta = {
        "mode": "lds",
        "data_length": 4,
        "train_func": "train_linear",
        "num_subsets": 3,
        "subset_ratio": 0.5,
        "num_runs_per_subset": 2,
        "subset_dir_map": {i: f"{rel}/{i}" for i in range(3)},
    }
    (tmp_path / rel / "metadata.yml").write_text(yaml.dump(meta))
    test_loader = DataLoader(TensorDataset(torch.tensor([[1.0], [3.0]])), batch_size=1)

    def target_func(ckpt_path, loader):
        model = nn.Linear(1, 1)
        model.load_state_dict(torch.load(ckpt_path, weights_only=True))
        return torch.cat([model(x).flatten() for (x,) in loader]).detach()

    values, indices = calculate_lds_ground_truth(target_func, rel, test_loader)
    assert indices.tolist() == subsets
    # mean over the two runs (weights i and i + 1) of w * x, negated
    expected = -torch.tensor([[i + 0.5, 3 * (i + 0.5)] for i in range(3)])
    torch.testing.assert_close(values, expected)


def test_retrain_lds_before_metadata_other_ratio_is_refused(tmp_path):
    """An interrupted first run (no metadata yet) must not be resumed with another ratio."""
    path = tmp_path / "run"
    retrain_lds(train_linear, _loader(), path, num_subsets=2, seed=None, verbose=False)
    (path / "metadata.yml").unlink()  # as if the first run had stopped early
    with pytest.raises(ValueError, match=r"subset of 5 samples.*give 3.*subset_ratio"):
        retrain_lds(train_linear, _loader(), path, num_subsets=2, subset_ratio=0.3, verbose=False)
