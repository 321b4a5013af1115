"""DataInf streams the training gradients: same result as the dense closed form.

Reference: exact per-sample gradients from a Python loop of ``torch.autograd.grad``
and :func:`dattri.func.fisher.ifvp_datainf` on the full dense ``(n, p)`` matrix (the
pre-streaming implementation), in float64.
"""

import functools

import pytest
import torch
from torch import Tensor

from dattri.algorithm.if_datainf import IFAttributorDataInf, _rows_of
from dattri.func.fisher import datainf_regularization, ifvp_datainf
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

pytestmark = pytest.mark.filterwarnings("ignore:Layer-hook gradients:UserWarning")
SIZES = [8 * 16 + 16, 16 * 3 + 3]  # layers "0" (weight + bias) and "2" of random_mlp


def exact_grads(model, loss, x, y):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(
            loss(params, (x[i : i + 1], y[i : i + 1])), list(params.values())
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@functools.lru_cache(maxsize=1)
def dense_grads():
    pm = cached_random_mlp()
    g_tr = exact_grads(pm.model, pm.loss_if, pm.x_train, pm.y_train)
    g_te = exact_grads(pm.model, pm.loss_if, pm.x_test, pm.y_test)
    return g_tr, g_te


@pytest.mark.parametrize(
    ("regularization", "chunk_rows", "check_self"),
    [(0.0, 3, False), (0.05, 7, True), (0.0, 1000, True)],
)
def test_streamed_equals_dense_closed_form(regularization, chunk_rows, check_self):
    pm = cached_random_mlp()
    task = AttributionTask(pm.loss_if, pm.model, pm.model.state_dict())
    attr = IFAttributorDataInf(task, regularization=regularization, verbose=False)
    attr.grad_chunk_elements = chunk_rows * sum(SIZES)  # chunks of `chunk_rows` rows
    train = pm.train_loader(16)  # 40 rows: batches 16, 16, 8 (split into chunks)
    attr.cache(train)
    g_tr, g_te = dense_grads()
    layers = list(g_tr.split(SIZES, dim=1))
    regs = [datainf_regularization(g) for g in layers] if not regularization else [0.05] * 2
    assert attr.layer_regularization[0] == pytest.approx(regs, rel=1e-10)
    ref = g_tr @ ifvp_datainf(layers, g_te, regs).T  # dense (n, p): the old implementation
    scores = attr.attribute(train, pm.test_loader(3))  # 4 test batches, one streamed pass
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-12)
    if check_self:
        full = g_tr @ ifvp_datainf(layers, g_tr, regs).T
        torch.testing.assert_close(
            attr.self_attribute(train), full.diagonal(), rtol=1e-10, atol=1e-12
        )
    # nothing of size n * p is kept by the attributor
    held = [v for v in vars(attr).values() if isinstance(v, Tensor)]
    assert all(t.numel() < g_tr.numel() for t in held)


def test_transform_matches_explicit_formula_float32():
    pm = cached_random_mlp()
    model = pm.model.float()
    try:
        task = AttributionTask(pm.loss_if, model, model.state_dict())
        attr = IFAttributorDataInf(task, regularization=0.1, verbose=False)
        attr.grad_chunk_elements = 5 * 195
        x, y = pm.x_train.float(), pm.y_train
        attr.cache([(x[:16], y[:16]), (x[16:], y[16:])])
        v = torch.randn(6, 195, generator=torch.Generator().manual_seed(1))
        g = exact_grads(model, pm.loss_if, x, y).double()
        out = attr.transform_test_rep(0, v)
        assert out.dtype == torch.float32
        # v -> (1/r)(v - (1/n) sum_i g_i (g_i . v) / (r + ||g_i||^2)), per layer
        ref = []
        for gl, vl in zip(g.split([144, 51], 1), v.double().split([144, 51], 1)):
            coef = (vl @ gl.T) / (0.1 + (gl * gl).sum(1))
            ref.append((vl - coef @ gl / len(gl)) / 0.1)
        torch.testing.assert_close(out.double(), torch.cat(ref, 1), rtol=2e-5, atol=1e-5)
    finally:
        pm.model.double()


def test_rows_of_keeps_structure():
    batch = {"x": torch.arange(10).reshape(5, 2), "y": torch.arange(5)}
    part = _rows_of(batch, 1, 3)
    assert set(part) == {"x", "y"} and part["y"].tolist() == [1, 2]
    assert _rows_of((torch.arange(4), torch.arange(4)), 2, 9)[1].tolist() == [2, 3]
