"""Tests of the Fisher-based IF attributors (DataInf, EK-FAC) against brute force.

References: per-sample gradients and layer factors from a Python loop of
``torch.autograd.grad`` (one sample at a time, seen as ``(1, ...)``), explicit
``(p_l, p_l)`` inverses for DataInf and the explicit EK-FAC matrix
``K diag(Λ) Kᵀ`` (``K = Q_S ⊗ Q_A``) for EK-FAC.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.influence_function import (
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
)
from dattri.task import AttributionTask
from tests.problems import cached_digits_lr, cached_random_mlp

pytestmark = pytest.mark.filterwarnings("ignore:Layer-hook gradients:UserWarning")


def exact_grads(model, loss, x, y, names=None):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(
            loss(params, (x[i : i + 1], y[i : i + 1])), [params[n] for n in names]
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# --------------------------------------------------------------------------- DataInf
def datainf_reference(g_train, g_test, layer_sizes, regs):
    """(1/n) Σ_i (g_il g_ilᵀ + r_l I)^{-1} v_l by explicit per-sample inverses."""
    out = []
    for g, v, r in zip(g_train.split(layer_sizes, 1), g_test.split(layer_sizes, 1), regs):
        eye = torch.eye(g.shape[1], dtype=g.dtype)
        inv = sum(torch.linalg.inv(torch.outer(gi, gi) + r * eye) for gi in g) / len(g)
        out.append(v @ inv.T)
    return torch.cat(out, 1)


def test_datainf_matches_brute_force_with_default_regularization():
    pm = cached_random_mlp()
    task = AttributionTask(pm.loss_if, pm.model, pm.model.state_dict())
    attr = IFAttributorDataInf(task, verbose=False)  # regularization 0.0 -> automatic
    train = pm.train_loader(16)
    attr.cache(train)
    scores = attr.attribute(train, pm.test_loader(5))
    g_tr = exact_grads(pm.model, pm.loss_if, pm.x_train, pm.y_train)
    g_te = exact_grads(pm.model, pm.loss_if, pm.x_test, pm.y_test)
    sizes = [8 * 16 + 16, 16 * 3 + 3]  # layers "0" (weight + bias) and "2"
    assert attr.layer_sizes == sizes
    regs = [0.1 * float((g * g).sum(1).mean()) / g.shape[1] for g in g_tr.split(sizes, 1)]
    assert attr.layer_regularization[0] == pytest.approx(regs, rel=1e-10)
    ref = g_tr @ datainf_reference(g_tr, g_te, sizes, regs).T
    assert bool(torch.isfinite(scores).all())
    torch.testing.assert_close(scores, ref, rtol=1e-8, atol=1e-10)


def test_datainf_layer_name_ratio_and_fixed_regularization():
    pm = cached_random_mlp()
    names = ["2.weight"]
    task = AttributionTask(pm.loss_if, pm.model, pm.model.state_dict())
    attr = IFAttributorDataInf(
        task, layer_name=names, regularization=0.1, fim_estimate_data_ratio=0.5, verbose=False
    )
    attr.cache(pm.train_loader(16))  # 3 batches -> the first ceil(1.5) = 2 batches (32 rows)
    assert attr.n_cached == 32 and attr.layer_sizes == [48]
    scores = attr.attribute(pm.train_loader(16), pm.test_loader(5))
    g_tr = exact_grads(pm.model, pm.loss_if, pm.x_train, pm.y_train, names)
    g_te = exact_grads(pm.model, pm.loss_if, pm.x_test, pm.y_test, names)
    ref = g_tr @ datainf_reference(g_tr[:32], g_te, [48], [0.1]).T
    torch.testing.assert_close(scores, ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="fim_estimate_data_ratio"):
        IFAttributorDataInf(task, fim_estimate_data_ratio=1.5)
    with pytest.raises(ValueError, match="regularization"):
        IFAttributorDataInf(task, regularization=-0.1)


def test_datainf_correlates_with_explicit():
    # DataInf swaps the inverse of an average, (F + rI)^{-1}, for the average of
    # rank-one inverses; the two differ at O(||g||^2 / r) and the Fisher is not the
    # Hessian, so only a moderate agreement is expected (measured 0.49 on this problem,
    # for any r in [auto, 0.1]); 0.35 still catches a wrong layer split or sign.
    pb = cached_digits_lr(n_train=100)
    task = AttributionTask(pb.loss_if, pb.model, pb.model.state_dict())
    train, test = pb.train_loader(50), pb.test_loader(20)
    ref = IFAttributorExplicit(task, verbose=False)
    ref.cache(train)
    attr = IFAttributorDataInf(task, verbose=False)
    attr.cache(train)
    assert attr.layer_sizes == [650]  # root "weight" and "bias" form one layer
    assert corr(attr.attribute(train, test), ref.attribute(train, test)) > 0.35


# --------------------------------------------------------------------------- EK-FAC
class SeqModel(nn.Module):
    """Two Linear layers on (B, T, d) sequences, mean-pooled logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))).mean(dim=-2)


@pytest.fixture(scope="module")
def seq_problem():
    torch.manual_seed(0)
    model = SeqModel().double().eval()
    x = torch.randn(36, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (36,))

    def loss(params, data):
        xb, yb = data
        return nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    return model, x, y, loss


def ekfac_reference(model, module_names, loss, x, y, damping=None):
    """Explicit EK-FAC inverse matrices per module by a per-sample loop.

    Returns ``{name: (M, has_bias, damping)}`` with ``M = K diag(1 / (Λ + d)) Kᵀ`` acting on the
    row-major ``vec`` of ``[grad_W | grad_b]``.
    """
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    stats = {n: {"A": 0, "S": 0, "G": []} for n in module_names}
    captured = {}
    hooks = [
        mods[n].register_forward_hook(
            lambda m, inp, out, n=n: captured.__setitem__(n, (inp[0], out))
        )
        for n in module_names
    ]
    try:
        for i in range(len(x)):
            val = loss(params, (x[i : i + 1], y[i : i + 1]))
            outs = [captured[n][1] for n in module_names]
            ds_all = torch.autograd.grad(val, outs)
            for n, ds in zip(module_names, ds_all):
                a = captured[n][0].detach().reshape(-1, mods[n].in_features)
                if mods[n].bias is not None:
                    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
                ds = ds.reshape(-1, mods[n].out_features)
                stats[n]["A"] = stats[n]["A"] + a.T @ a
                stats[n]["S"] = stats[n]["S"] + ds.T @ ds
                stats[n]["G"].append(ds.T @ a)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in module_names:
        q_a = torch.linalg.eigh(stats[n]["A"] / len(x))[1]
        q_s = torch.linalg.eigh(stats[n]["S"] / len(x))[1]
        lam = torch.stack([(q_s.T @ g @ q_a) ** 2 for g in stats[n]["G"]]).mean(0)
        d = 0.1 * float(lam.mean()) if damping is None else damping
        k = torch.kron(q_s, q_a)
        out[n] = (k @ torch.diag(1.0 / (lam.reshape(-1) + d)) @ k.T, mods[n].bias is not None, d)
    return out


def ekfac_apply(ref, shapes, v):
    """Apply the reference per-module inverses to flat ``[W, b]`` gradient rows."""
    outs, off = [], 0
    for n, (d_out, d_in) in shapes.items():
        mat, bias, _ = ref[n]
        w = v[:, off : off + d_out * d_in].reshape(-1, d_out, d_in)
        off += d_out * d_in
        if bias:
            w = torch.cat([w, v[:, off : off + d_out, None]], 2)
            off += d_out
        res = (w.reshape(len(v), -1) @ mat.T).reshape(w.shape)
        outs.append(res[..., :d_in].reshape(len(v), -1))
        if bias:
            outs.append(res[..., d_in])
    return torch.cat(outs, 1)


def test_ekfac_sequence_inputs_match_brute_force(seq_problem):
    model, x, y, loss = seq_problem
    task = AttributionTask(loss, model, model.state_dict())
    train = DataLoader(TensorDataset(x[:30], y[:30]), batch_size=8)  # 8, 8, 8, 6
    attr = IFAttributorEKFAC(task, verbose=False)  # all Linear modules, auto damping
    assert attr.module_name == ["fc1", "fc2"]
    attr.cache(train)
    ref = ekfac_reference(model, ["fc1", "fc2"], loss, x[:30], y[:30])
    for n in ("fc1", "fc2"):
        assert attr.factors[0][n][3] == pytest.approx(ref[n][2], rel=1e-10)
    names = ["fc1.weight", "fc1.bias", "fc2.weight"]
    g_te = exact_grads(model, loss, x[30:], y[30:], names)
    got = attr.transform_test_rep(0, g_te)
    want = ekfac_apply(ref, {"fc1": (6, 4), "fc2": (3, 6)}, g_te)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    test = DataLoader(TensorDataset(x[30:], y[30:]), batch_size=4)
    scores = attr.attribute(train, test)
    g_tr = exact_grads(model, loss, x[:30], y[:30], names)
    torch.testing.assert_close(scores, g_tr @ want.T, rtol=1e-8, atol=1e-10)
    # one module, fixed damping
    sub = IFAttributorEKFAC(task, module_name="fc2", damping=0.05, verbose=False)
    sub.cache(train)
    ref2 = ekfac_reference(model, ["fc2"], loss, x[:30], y[:30], damping=0.05)
    g2 = exact_grads(model, loss, x[30:], y[30:], ["fc2.weight"])
    torch.testing.assert_close(
        sub.transform_test_rep(0, g2), ekfac_apply(ref2, {"fc2": (3, 6)}, g2), rtol=1e-8, atol=1e-10
    )


def test_ekfac_max_iter_and_checkpoint_mean(seq_problem):
    model, x, y, loss = seq_problem
    train = DataLoader(TensorDataset(x[:30], y[:30]), batch_size=8)
    test = DataLoader(TensorDataset(x[30:], y[30:]), batch_size=6)
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    sd2 = {k: 1.2 * v for k, v in sd1.items()}

    def run(ckpts, loader=train, max_iter=None):
        attr = IFAttributorEKFAC(AttributionTask(loss, model, ckpts), verbose=False)
        attr.cache(loader, max_iter=max_iter)
        return attr.attribute(train, test)

    first = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    torch.testing.assert_close(run(sd1, max_iter=1), run(sd1, loader=first))
    torch.testing.assert_close(run([sd1, sd2]), 0.5 * (run(sd1) + run(sd2)))
    model.load_state_dict(sd1)


def test_ekfac_single_linear_agrees_with_explicit():
    # EK-FAC approximates the (damped) empirical Fisher, which at the optimum of a
    # regularised LR differs from the Hessian (squared residuals vs p(1 - p)); measured
    # correlation 0.93 with the automatic damping, so 0.85 guards against a wrong
    # rotation convention or bias layout (those drop it below 0.5).
    pb = cached_digits_lr(n_train=100)
    task = AttributionTask(pb.loss_if_nowd, pb.model, pb.model.state_dict())
    train, test = pb.train_loader(32), pb.test_loader(20)
    ref = IFAttributorExplicit(task, regularization=pb.weight_decay, verbose=False)
    ref.cache(train)
    attr = IFAttributorEKFAC(task, verbose=False)
    attr.cache(train)
    assert attr.module_name == [""]
    scores = attr.attribute(train, test)
    assert corr(scores, ref.attribute(train, test)) > 0.85
    # exact against the brute-force EK-FAC matrix for a 2-D-input layer too
    brute = ekfac_reference(pb.model, [""], pb.loss_if_nowd, pb.x_train, pb.y_train)
    g_te = exact_grads(pb.model, pb.loss_if_nowd, pb.x_test, pb.y_test)
    got = attr.transform_test_rep(0, g_te)
    want = ekfac_apply(brute, {"": (10, 64)}, g_te)
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_ekfac_errors(seq_problem):
    model, x, y, loss = seq_problem
    task = AttributionTask(loss, model, model.state_dict())
    with pytest.raises(ValueError, match="nn.Linear"):
        IFAttributorEKFAC(task, module_name="act")
    with pytest.raises(ValueError, match="damping"):
        IFAttributorEKFAC(task, damping=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        IFAttributorEKFAC(task).cache(DataLoader(TensorDataset(x, y)), max_iter=0)

    def l2_loss(params, data):  # an L2 penalty reaches the weights outside the layer
        return loss(params, data) + 0.01 * sum((p**2).sum() for p in params.values())

    attr = IFAttributorEKFAC(AttributionTask(l2_loss, model, model.state_dict()), verbose=False)
    with pytest.raises(ValueError, match="(?i)factor|outside"):
        attr.cache(DataLoader(TensorDataset(x, y), batch_size=8))
