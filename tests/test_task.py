"""Tests for AttributionTask and dattri.func.utils."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dattri.func.utils import (
    _vectorize,
    flatten_func,
    flatten_params,
    get_parameter_chunk_sizes,
    partial_param,
)
from dattri.task import AttributionTask, _default_load


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def _loss(model):
    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def test_flatten_params_and_func_roundtrip():
    model = _model()
    params = dict(model.named_parameters())
    flat = flatten_params(params)
    assert flat.shape == (4 * 3 + 4 + 2 * 4 + 2,)
    seen = {}

    @flatten_func(model)
    def f(p, scale):
        seen.update(p)
        return sum((v * scale).sum() for v in p.values())

    out = f(flat, 2.0)
    assert torch.allclose(out, 2 * flat.sum())
    for name, value in params.items():
        assert torch.equal(seen[name], value)
    # tuple of per-parameter flats also accepted
    out2 = f(tuple(v.reshape(-1) for v in params.values()), 2.0)
    assert torch.allclose(out2, out)
    with pytest.raises(ValueError, match="size"):
        f(flat[:-1], 1.0)


def test_partial_param_does_not_mutate_and_matches_full():
    model = _model()
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: v.clone() for n, v in full.items()}
    loss = flatten_func(model)(_loss(model))
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1])
    wrapped = partial_param(full, ["2.weight", "0.bias"])(loss)
    part = torch.cat([full["2.weight"].reshape(-1), full["0.bias"].reshape(-1)])
    assert torch.allclose(wrapped(part, (x, y)), loss(flatten_params(full), (x, y)))
    g_part = torch.func.grad(wrapped)(part, (x, y))
    g_full = dict(
        zip(
            full,
            torch.split(
                torch.func.grad(loss)(flatten_params(full), (x, y)),
                [v.numel() for v in full.values()],
            ),
        )
    )
    expected = torch.cat([g_full["2.weight"], g_full["0.bias"]])
    assert torch.allclose(g_part, expected)
    for n in full:
        assert torch.equal(full[n], before[n])
    # a single string names one parameter (not its characters)
    single = partial_param(full, "2.bias")(loss)
    assert single(full["2.bias"].clone(), (x, y)).shape == ()
    with pytest.raises(ValueError, match="Valid names"):
        partial_param(full, ["nope.weight"])


def test_chunk_sizes_and_vectorize():
    max_chunk, chunks = get_parameter_chunk_sizes([(10, 10), (5,), (3, 3)], batch_size=4)
    assert chunks == [114] and max_chunk == 114
    cap = (2**32 - 1) // (2 * 2**20)
    max_chunk, chunks = get_parameter_chunk_sizes([cap - 1, 5, cap + 3], batch_size=2**20)
    assert chunks == [cap - 1, 5, cap + 3] and max_chunk == cap + 3
    g = {"a": torch.ones(2, 3), "b": torch.zeros(2, 2, 2)}
    v = _vectorize(g)
    assert v.shape == (2, 7) and v[:, :3].sum() == 6 and v[:, 3:].sum() == 0
    with pytest.raises(ValueError, match="batch_size"):
        get_parameter_chunk_sizes([(2,)], 0)


def test_task_checkpoints_lazy_loading_and_paths(tmp_path):
    model = _model()
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    sd1 = {k: v + 1.0 for k, v in sd0.items()}
    path = tmp_path / "ckpt1.pt"
    torch.save(sd1, path)
    task = AttributionTask(_loss(model), model, [sd0, str(path)])
    assert task.current_checkpoint_idx is None
    p0, _ = task.get_param(0)
    p1, _ = task.get_param(1)
    assert torch.allclose(p1, p0 + 1.0)
    assert task.current_checkpoint_idx == 1
    assert len(task.get_checkpoints()) == 2 and task.get_model() is model
    parts, layer_map = task.get_param(0, layer_split=True)
    assert layer_map == [0, 0, 1, 1] and len(parts) == 4
    sel, _ = task.get_param(0, layer_name="2.bias")
    assert torch.equal(sel, sd0["2.bias"])
    with pytest.raises(ValueError, match="Valid names"):
        task.get_param(0, layer_name=["fc9.weight"])
    with pytest.raises(IndexError, match="out of range"):
        task.get_param(5)
    with pytest.raises(ValueError, match="param_layer_map"):
        task.get_param(0, layer_split=True, param_layer_map=[0])


def test_task_rejects_mismatched_checkpoint():
    model = _model()
    bad = {"weight": torch.zeros(2, 2)}
    task = AttributionTask(_loss(model), model, bad)
    with pytest.raises(ValueError, match="does not match the model"):
        task.get_param(0)
    with pytest.raises(ValueError, match="empty"):
        AttributionTask(_loss(model), model, [])
    with pytest.raises(TypeError, match="nn.Module"):
        AttributionTask(_loss(model), "model", model.state_dict())


def test_task_grad_funcs_match_autograd_loop():
    model = _model()
    task = AttributionTask(_loss(model), model, model.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    flat, _ = task.get_param()
    grads = task.get_grad_loss_func()(flat, (x.unsqueeze(0), y.unsqueeze(0)))
    sub = task.get_grad_loss_func(layer_name=["2.weight"], ckpt_idx=0)(
        task.get_param(0, layer_name=["2.weight"])[0], (x.unsqueeze(0), y.unsqueeze(0))
    )
    ps = task.per_sample_grads((x, y), keep_batch_dim=True)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(grads[i], ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(ps[i], ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(sub[i], model[2].weight.grad.reshape(-1))
    loss = task.get_loss_func()
    assert torch.allclose(loss(flat, (x, y)), nn.functional.cross_entropy(model(x), y))
    assert task.get_loss_func(flatten=False) is task.original_loss_func
    assert task.get_target_func(flatten=False) is task.original_loss_func
    assert task.num_params() == flat.numel()
    with pytest.raises(NotImplementedError, match="register hooks"):
        task.register_forward_hook("0")


def test_task_buffers_come_from_loaded_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    model.eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["1.running_mean"] = torch.full((4,), 3.0, dtype=torch.float64)
    task = AttributionTask(_loss(model), model, sd)
    task.get_param(0)
    assert torch.equal(model[1].running_mean, sd["1.running_mean"])
    assert "1.running_mean" not in task.param_names


def test_grad_layout_matches_per_sample_grads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()

    def loss(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    task = AttributionTask(loss, model, [model.state_dict()])
    data = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))
    for layer in (None, "1.weight", ["0.bias", "1.weight"]):
        cols, dtype, device = task.grad_layout(layer)
        g = task.per_sample_grads(data, layer_name=layer, keep_batch_dim=False)
        assert g.shape == (5, cols) and g.dtype == dtype and g.device == device
        assert cols == task.num_params(layer)
    with pytest.raises(ValueError, match="nope"):
        task.grad_layout("nope")


def test_public_load_checkpoint_by_index_path_or_state_dict(tmp_path):
    model = _model()
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    sd1 = {k: v + 1.0 for k, v in sd0.items()}
    sd2 = {k: v - 2.0 for k, v in sd0.items()}
    path = tmp_path / "ckpt1.pt"
    torch.save(sd1, path)
    extra = tmp_path / "extra.pt"
    torch.save(sd2, extra)
    task = AttributionTask(_loss(model), model, [sd0, str(path)])
    loads = []

    def counting_load(m, ckpt):
        loads.append(ckpt)
        return _default_load(m, ckpt)

    task.checkpoints_load_func = counting_load
    assert task.load_checkpoint(1) is task.get_model()
    assert task.current_checkpoint_idx == 1
    assert torch.equal(task.get_model()[0].weight, sd1["0.weight"])
    task.load_checkpoint(-1)  # same checkpoint: not reloaded
    task.load_checkpoint(path)  # a path equal to entry 1 counts as index 1
    assert len(loads) == 1
    task.load_checkpoint(sd0)  # the entry's own state_dict object is index 0
    assert task.current_checkpoint_idx == 0 and len(loads) == 2
    # a checkpoint outside the list: loaded, and the next indexed load reloads
    task.load_checkpoint(extra)
    assert task.current_checkpoint_idx is None
    assert torch.equal(task.get_model()[2].bias, sd2["2.bias"])
    p0, _ = task.get_param(0)
    assert task.current_checkpoint_idx == 0 and len(loads) == 4
    assert torch.equal(p0[:12], sd0["0.weight"].reshape(-1))
    task.load_checkpoint({k: v.clone() for k, v in sd2.items()})
    assert task.current_checkpoint_idx is None
    # the upstream private name is an alias for indices
    task._load_checkpoints(1)
    assert task.current_checkpoint_idx == 1
    assert torch.equal(task.get_model()[0].weight, sd1["0.weight"])
    with pytest.raises(IndexError, match="out of range"):
        task.load_checkpoint(2)
    with pytest.raises(IndexError, match="not a checkpoint index"):
        task._load_checkpoints(str(path))
    with pytest.raises(IndexError, match="not a checkpoint index"):
        task.get_param("0")
    with pytest.raises(TypeError, match="index_or_ckpt"):
        task.load_checkpoint(1.0)
    with pytest.raises(TypeError, match="index_or_ckpt"):
        task.load_checkpoint(True)
