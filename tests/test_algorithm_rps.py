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


# ---------------------------------------------------------------- tolerances
# The fitted layer theta comes from an iterative solver, so the representer identity
# holds exactly only up to the solver's stationarity residual: with
# J(theta) = (1/n) sum_i l(theta f_i, t_i) + lam ||theta||^2 and alpha as in RPS,
#     F^T alpha = theta^T - grad J(theta)^T / (2 lam)        (exact algebra).
# The tests below therefore (a) check this identity with the *measured* gradient to
# rounding accuracy (Higham's bound for the sums involved), and (b) check that the
# solver reached the stationarity a line-search method can reach in that dtype.
# Neither tolerance depends on how far a particular scipy/BLAS build converges.


def _gamma(k, dtype):
    """Higham's gamma_k = k u / (1 - k u), u the unit roundoff of ``dtype``."""
    u = torch.finfo(dtype).eps / 2
    return k * u / (1 - k * u)


def _matmul_err(a, b):
    """Rounding bound of ``a @ b``: gamma_k |a| @ |b| with k the inner dimension."""
    return _gamma(a.shape[-1], a.dtype) * (a.abs() @ b.abs())


def _objective_grad(theta, f, outputs, loss, lam):
    """``(J, grad J, |terms|)`` of the RPS fit at ``theta``, by plain autograd.

    ``|terms|`` bounds the magnitude of everything summed in J (the rounding scale).
    """
    targets = torch.sigmoid(outputs) if outputs.shape[1] == 1 else torch.softmax(outputs, 1)
    th = theta.detach().clone().requires_grad_(True)
    phi = f @ th.T
    per = torch.stack([loss(phi[i : i + 1], targets[i : i + 1]) for i in range(len(f))])
    val = per.mean() + lam * (th * th).sum()
    (g,) = torch.autograd.grad(val, th)
    scale = per.abs().mean() + phi.abs().max() + lam * (th * th).sum()
    return val.detach(), g, scale.detach()


def _attainable_grad(f, lam, scale, dtype, n_classes):
    """Largest stationarity residual ``||grad J||_2`` a line-search solver may stop at.

    Near the minimum a (quasi-)Newton step lowers J by at least ``||g||^2 / (2 L)``,
    L the largest Hessian eigenvalue: ``L <= 2 lam + h lambda_max(F^T F) / n`` with
    h = 1/2 for softmax cross-entropy (1/4 for the logistic loss). Once that decrease
    is below the rounding error ``delta_J = gamma_m * scale`` of the computed
    objective (m = d + C + n terms accumulated), no line search can see progress,
    so a correct solver stops at ``||g|| <= sqrt(2 L delta_J)`` at the latest.
    """
    n, d = f.shape
    h = 0.25 if n_classes == 1 else 0.5
    lmax = torch.linalg.eigvalsh(f.T.double() @ f.double())[-1].item()
    big_l = 2 * lam + h * lmax / n
    delta_j = _gamma(d + n_classes + n, dtype) * float(scale)
    return (2 * big_l * delta_j) ** 0.5


def _float32_score_bound(model64, x_tr, x_te, theta, alpha, lam, ref):
    """First-order bound of ``|scores_float32 - ref_float64|`` for the ``Net`` model.

    Propagates float32 rounding (u = 2^-24) through the feature map the attributor
    evaluates in float32: the first layer's sums (gamma_{d+2}, input rounding
    included), tanh (2 ulp), the normalisation, the model output (gamma_h), then
    alpha_i = -(sigmoid(theta f_i) - sigmoid(o_i)) / (2 lam n) (sigmoid' <= 1/4) and
    the score <f_i, f_t> alpha_i, and the final cast to float32.
    """
    u = torch.finfo(torch.float32).eps / 2
    lin1, w2 = model64.body[0], model64.head.fc.weight.detach()

    def feats(x):
        with torch.no_grad():
            z_abs = x.abs() @ lin1.weight.abs().T + lin1.bias.abs()
            h = model64.body(x)
            dh = _gamma(x.shape[1] + 2, torch.float32) * z_abs + 2 * u * h.abs()
            hn = h.norm(dim=1, keepdim=True)
            f = h / hn
            df = (dh + f.abs() * dh.norm(dim=1, keepdim=True)) / hn
            df = df + _gamma(h.shape[1] + 2, torch.float32) * f.abs()
            dout = dh @ w2.abs().T + _gamma(h.shape[1], torch.float32) * (h.abs() @ w2.abs().T)
        return f, df, dout[:, 0]

    f_tr, df_tr, dout_tr = feats(x_tr)
    f_te, df_te, _ = feats(x_te)
    n = len(x_tr)
    dalpha = (df_tr @ theta.abs().T)[:, 0] / 4 + dout_tr / 4
    dalpha = dalpha / (2 * lam * n)
    return (
        (df_tr @ f_te.abs().T + f_tr.abs() @ df_te.T) * alpha.abs()
        + (f_tr @ f_te.T).abs() * dalpha.unsqueeze(1)
        + u * ref.abs()
    )


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
    # the solver reached the stationarity a float64 line search can reach
    _, grad, scale = _objective_grad(theta, f_tr, out_tr, _ce, lam)
    assert grad.norm() <= _attainable_grad(f_tr, lam, scale, torch.float64, 3)
    # representer theorem: sum_i f_i alpha_i^T = theta^T - grad J^T / (2 lam), exactly
    # up to rounding (the sum over i, and alpha's own sum inside grad J)
    theta_rep = theta.T - grad.T / (2 * lam)
    rounding = 2 * _matmul_err(f_tr.T, alpha)
    assert ((f_tr.T @ alpha - theta_rep).abs() <= rounding).all()
    logits_ft = f_te @ theta.T
    logits_rep = f_te @ theta_rep
    for c in range(3):  # every class: sum over train of scores = fitted logit of class c
        test = DataLoader(TensorDataset(x_te, torch.full_like(y_te, c)), batch_size=3)
        scores = attr.attribute(train, test)
        assert scores.shape == (24, 7)
        # scores[i, t] = <f_i, f_t> alpha_ic: n products of d-term sums, then n summands
        kern = f_tr @ f_te.T
        bound = (
            _gamma(f_tr.shape[1] + len(f_tr) + 1, torch.float64)
            * (kern.abs() * alpha[:, c : c + 1].abs()).sum(0)
            + _matmul_err(f_te, theta_rep)[:, c]
            + f_te.abs() @ rounding[:, c]
        )
        assert ((scores.sum(0) - logits_rep[:, c]).abs() <= bound).all()
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=4)
    scores = attr.attribute(train, test)
    ref = (f_tr @ f_te.T) * alpha[:, y_te]
    # same products, computed in another order: a d-term sum times one factor each
    bound = 2 * _gamma(f_tr.shape[1] + 1, torch.float64) * (f_tr.abs() @ f_te.abs().T)
    assert ((scores - ref).abs() <= bound * alpha[:, y_te].abs()).all()
    # the fitted layer is close to the trained one's predictions (sanity, not exact)
    assert torch.corrcoef(torch.stack([logits_ft.flatten(), model(x_te).flatten()]))[0, 1] > 0.5
    # self-attribution is the diagonal of attribute(train, train)
    full = attr.attribute(train, train)
    torch.testing.assert_close(attr.self_attribute(train), full.diagonal())
    assert attr.attribute_topk(train, test, 2).helpful_indices.shape == (7, 2)
    l1, corr = rps_corr_check(alpha, f_tr, f_tr @ theta_rep, verbose=False)
    # (F F^T) alpha vs F theta_rep: F (F^T alpha - theta_rep) plus the two products' rounding
    elem_bound = f_tr.abs() @ rounding + _gamma(f_tr.shape[1] + len(f_tr), torch.float64) * (
        (f_tr.abs() @ f_tr.abs().T) @ alpha.abs() + f_tr.abs() @ theta_rep.abs()
    )
    assert (l1 <= elem_bound.mean(0)).all()
    # ||a - b|| <= delta moves the unit vectors by <= 2 delta / ||b||, so
    # corr >= 1 - 2 (delta / ||b||)^2, less the rounding of the correlation itself
    ref = f_tr @ theta_rep
    rel = elem_bound.norm(dim=0) / (ref - ref.mean(0)).norm(dim=0)
    assert (corr >= 1 - 2 * rel**2 - _gamma(3 * len(f_tr), torch.float64)).all()


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
    ref = (f_tr @ f_te.T) * alpha
    # the library ran the model in float32; the reference in float64 on the same weights
    bound = _float32_score_bound(model.double(), x_tr, x_te, theta, alpha, lam, ref)
    model.float()
    assert ((scores.double() - ref).abs() <= bound).all()
    # summed over the training set: the fitted logit, up to the fit's residual (exact)
    _, grad, scale = _objective_grad(theta, f_tr, out_tr, bce, lam)
    assert grad.norm() <= _attainable_grad(f_tr, lam, scale, torch.float64, 1)
    theta_rep = theta.T - grad.T / (2 * lam)
    rep_rounding = f_te.abs() @ (2 * _matmul_err(f_tr.T, alpha)) + _matmul_err(f_te, theta_rep)
    assert (
        (scores.double().sum(0) - (f_te @ theta_rep)[:, 0]).abs()
        <= bound.sum(0) + rep_rounding[:, 0]
    ).all()
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
    # J is 2 lam-strongly convex, so ||theta - theta*|| <= ||grad J(theta)|| / (2 lam):
    # both solutions lie within their measured stationarity residuals of the optimum
    _, g_lbfgs, scale = _objective_grad(th_lbfgs, x, y, _ce, lam)
    _, g_gd, _ = _objective_grad(th_gd, x, y, _ce, lam)
    attainable = _attainable_grad(x, lam, scale, torch.float64, 3)
    assert g_lbfgs.norm() <= attainable
    assert g_gd.norm() <= attainable
    assert (th_gd - th_lbfgs).norm() <= (g_gd.norm() + g_lbfgs.norm()) / (2 * lam)
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
    # representer identity with the measured residual (see the tolerances note above)
    theta_rep = th_lbfgs.T - g_lbfgs.T / (2 * lam)
    assert ((x.T @ alpha - theta_rep).abs() <= 2 * _matmul_err(x.T, alpha)).all()
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
