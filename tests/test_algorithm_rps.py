"""RPS: representer decomposition reconstructs the fitted logits; explicit alpha; API."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.rps import RPSAttributor
from dattri.algorithm.utils import (
    _check_shuffle,
    backtracking_line_search,
    get_rps_weight,
    rps_corr_check,
    rps_finetune_model,
    rps_finetune_theta,
)
from dattri.task import AttributionTask


class Net(nn.Module):
    """Body + nested head, so the last layer is ``head.fc``."""

    def __init__(self, d_in=6, hidden=5, n_out=3, bias=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Module()
        self.head.fc = nn.Linear(hidden, n_out, bias=bias)

    def forward(self, x):
        return self.head.fc(self.body(x))


def _problem(n_out=3, bias=True, seed=0, n_train=24, n_test=7):
    torch.manual_seed(seed)
    model = Net(n_out=n_out, bias=bias).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(n_out, 2), (n_train + n_test,), generator=g)
    if n_out == 1:
        y = y.double().unsqueeze(1)
    return model, x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _ce(logits, targets):
    return F.cross_entropy(logits, targets)


def _features(model, x, normalize=False, bias=True):
    with torch.no_grad():
        f = model.body(x)
    if normalize:
        f = F.normalize(f, dim=1)
    if bias:
        f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    return f


def _explicit_alpha(theta, f, outputs, loss, lam):
    """alpha_i = -1/(2 lam n) d l(phi_i, t_i)/d phi_i by a per-sample autograd loop."""
    n = f.shape[0]
    targets = torch.sigmoid(outputs) if outputs.shape[1] == 1 else torch.softmax(outputs, 1)
    rows = []
    for i in range(n):
        phi = (f[i : i + 1] @ theta.T).requires_grad_(True)
        (g,) = torch.autograd.grad(loss(phi, targets[i : i + 1]), phi)
        rows.append(g[0])
    return torch.stack(rows) / (-2 * lam * n)


def test_multiclass_bias_nested_layer_reconstructs_logits():
    model, x_tr, y_tr, x_te, y_te = _problem()
    task = AttributionTask(loss_func=_ce, model=model, checkpoints=model.state_dict())
    lam = 0.01
    attr = RPSAttributor(task, "head.fc", l2_strength=lam, epoch=500, verbose=False)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=10)
    attr.cache(train)
    theta = attr.theta[0]
    assert theta.shape == (3, 6)  # 5 features + bias column
    f_tr, f_te = _features(model, x_tr), _features(model, x_te)
    with torch.no_grad():
        out_tr = model(x_tr)
    alpha = _explicit_alpha(theta, f_tr, out_tr, _ce, lam)
    # representer theorem at the fitted optimum: theta^T = sum_i f_i alpha_i^T
    torch.testing.assert_close(f_tr.T @ alpha, theta.T, atol=1e-8, rtol=1e-7)
    logits_ft = f_te @ theta.T
    for c in range(3):  # every class: sum over train of scores = fitted logit of class c
        test = DataLoader(TensorDataset(x_te, torch.full_like(y_te, c)), batch_size=3)
        scores = attr.attribute(train, test)
        assert scores.shape == (24, 7)
        torch.testing.assert_close(scores.sum(0), logits_ft[:, c], atol=1e-8, rtol=1e-7)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=4)
    scores = attr.attribute(train, test)
    ref = (f_tr @ f_te.T) * alpha[:, y_te]
    torch.testing.assert_close(scores, ref, atol=1e-10, rtol=1e-8)
    # the fitted layer is close to the trained one's predictions (sanity, not exact)
    assert torch.corrcoef(torch.stack([logits_ft.flatten(), model(x_te).flatten()]))[0, 1] > 0.5
    # self-attribution is the diagonal of attribute(train, train)
    full = attr.attribute(train, train)
    torch.testing.assert_close(attr.self_attribute(train), full.diagonal())
    assert attr.attribute_topk(train, test, 2).helpful_indices.shape == (7, 2)
    l1, corr = rps_corr_check(alpha, f_tr, f_tr @ theta.T, verbose=False)
    assert l1.max() < 1e-7
    assert corr.min() > 1 - 1e-9


def test_binary_no_bias_normalized_and_dtype():
    model, x_tr, y_tr, x_te, y_te = _problem(n_out=1, bias=False, seed=1)
    model = model.float()
    bce = F.binary_cross_entropy_with_logits
    task = AttributionTask(loss_func=bce, model=model, checkpoints=model.state_dict())
    lam = 0.05
    attr = RPSAttributor(
        task, "head.fc", normalize_preactivate=True, l2_strength=lam, epoch=500, verbose=False
    )
    train = DataLoader(TensorDataset(x_tr.float(), y_tr.float()), batch_size=8)
    test = DataLoader(TensorDataset(x_te.float(), y_te.float()), batch_size=8)
    with pytest.warns(UserWarning, match="cache\\(\\) was not called"):
        scores = attr.attribute(train, test)
    assert scores.dtype == torch.float32
    theta = attr.theta[0]
    assert theta.shape == (1, 5)
    f_tr = _features(model.double(), x_tr, normalize=True, bias=False)
    f_te = _features(model, x_te, normalize=True, bias=False)
    model.float()
    with torch.no_grad():
        out_tr = model.double()(x_tr)
    model.float()
    alpha = _explicit_alpha(theta, f_tr, out_tr, bce, lam)
    torch.testing.assert_close(scores.double(), (f_tr @ f_te.T) * alpha, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scores.double().sum(0), (f_te @ theta.T)[:, 0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(attr.self_attribute(train), attr.attribute(train, train).diagonal())


def test_dict_batches_label_key_and_checkpoint_mean():
    model, x_tr, y_tr, x_te, y_te = _problem(seed=2)
    ck1 = {k: v.clone() for k, v in model.state_dict().items()}
    ck2 = {k: v + 0.1 * torch.randn_like(v) for k, v in ck1.items()}

    class DictModel(Net):
        def forward(self, inp):
            return super().forward(inp)

    def dict_loader(x, y):
        return DataLoader([{"inp": a, "target": b} for a, b in zip(x, y)], batch_size=5)

    def make(ckpts, m):
        task = AttributionTask(loss_func=_ce, model=m, checkpoints=ckpts)
        return RPSAttributor(
            task, "head.fc", l2_strength=0.02, epoch=300, verbose=False, label_key="target"
        )

    dm = DictModel().double()
    both = make([ck1, ck2], dm)
    both.cache(dict_loader(x_tr, y_tr))
    got = both.attribute(dict_loader(x_tr, y_tr), dict_loader(x_te, y_te))
    singles = []
    for ck in (ck1, ck2):
        one = make(ck, DictModel().double())
        one.cache(dict_loader(x_tr, y_tr))
        singles.append(one.attribute(dict_loader(x_tr, y_tr), dict_loader(x_te, y_te)))
    torch.testing.assert_close(got, (singles[0] + singles[1]) / 2)
    assert not torch.allclose(singles[0], singles[1])
    # tuple batches with the same data give the same scores as dict batches
    task = AttributionTask(loss_func=_ce, model=Net().double(), checkpoints=ck1)
    tup = RPSAttributor(task, "head.fc", l2_strength=0.02, epoch=300, verbose=False)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=7)
    tup.cache(train)
    torch.testing.assert_close(
        tup.attribute(train, DataLoader(TensorDataset(x_te, y_te))), singles[0]
    )


def test_gd_solver_matches_lbfgs_and_helpers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    init = torch.zeros(3, 4, dtype=torch.float64)
    lam = 0.1
    th_lbfgs = rps_finetune_theta(x, y, init, _ce, lam, 200)
    th_gd = rps_finetune_theta(x, y, init, _ce, lam, 2000, solver="gd", tol=1e-9)
    torch.testing.assert_close(th_gd, th_lbfgs, atol=1e-7, rtol=1e-6)
    phi, l2 = rps_finetune_model(x, th_lbfgs)
    torch.testing.assert_close(phi, x @ th_lbfgs.T)
    torch.testing.assert_close(l2, (th_lbfgs**2).sum())
    # one Armijo step decreases the objective by at least t/2 ||g||^2
    targets = torch.softmax(y, 1)
    th = init.clone().requires_grad_(True)
    val = _ce(x @ th.T, targets) + lam * (th**2).sum()
    (grad,) = torch.autograd.grad(val, th)
    new = backtracking_line_search(th, grad, _ce, x, targets, val, lam)
    new_val = _ce(x @ new.T, targets) + lam * (new**2).sum()
    step = ((init - new) / grad).flatten()[0]
    assert new_val <= val - step * (grad**2).sum() / 2 + 1e-12
    # representer weights picked by test labels
    alpha = get_rps_weight(th_lbfgs, _ce, x, y, None, lam)
    picked = get_rps_weight(th_lbfgs, _ce, x, y, torch.tensor([2, 0]), lam)
    torch.testing.assert_close(picked, alpha[:, [2, 0]])
    torch.testing.assert_close(x.T @ alpha, th_lbfgs.T, atol=1e-8, rtol=1e-6)
    with pytest.warns(UserWarning, match="shuffles"):
        _check_shuffle(DataLoader(TensorDataset(x), shuffle=True))


def test_errors():
    model, x_tr, y_tr, x_te, _ = _problem()
    task = AttributionTask(loss_func=_ce, model=model, checkpoints=model.state_dict())
    with pytest.raises(TypeError, match="not nn.Linear"):
        RPSAttributor(task, "body")
    with pytest.raises(ValueError, match="not a module"):
        RPSAttributor(task, "head.nope")
    with pytest.raises(ValueError, match="l2_strength"):
        RPSAttributor(task, "head.fc", l2_strength=0.0)
    with pytest.raises(ValueError, match="solver"):
        RPSAttributor(task, "head.fc", solver="adam")
    with pytest.raises(TypeError, match="AttributionTask"):
        RPSAttributor(model, "head.fc")
    attr = RPSAttributor(task, "head.fc", epoch=50, verbose=False)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=8)
    attr.cache(train)
    bad = DataLoader(TensorDataset(x_te, torch.full((7,), 5)), batch_size=8)
    with pytest.raises(ValueError, match="labels must lie in"):
        attr.attribute(train, bad)
    with pytest.raises(ValueError, match="needs labels"):
        attr.attribute(train, DataLoader(x_te, batch_size=8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model, x_tr, y_tr, x_te, y_te = _problem(seed=5)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=10)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=4)
    out = {}
    for dev in ("cpu", "cuda"):
        m = Net().double().to(dev)
        m.load_state_dict(model.state_dict())
        task = AttributionTask(loss_func=_ce, model=m, checkpoints=m.state_dict())
        attr = RPSAttributor(task, "head.fc", l2_strength=0.01, device=dev, verbose=False)
        attr.cache(train)
        out[dev] = (attr.attribute(train, test), attr.self_attribute(train))
    assert out["cuda"][0].device.type == "cuda"
    torch.testing.assert_close(out["cuda"][0].cpu(), out["cpu"][0], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(out["cuda"][1].cpu(), out["cpu"][1], atol=1e-8, rtol=1e-6)
