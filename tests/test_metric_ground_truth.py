"""LOO ground truth end to end (retrain_loo -> calculate_loo_ground_truth -> loo_corr),
and brittleness / check_if_flip against a brute-force count."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import DataLoader, Sampler, TensorDataset

from dattri.metric import brittleness, calculate_loo_ground_truth, check_if_flip, loo_corr
from dattri.model_util import retrain_loo

WD = 1e-2


def _train_lr_lbfgs(loader, seed=None):
    """Full-batch L-BFGS on mean CE + WD/2 |theta|^2 in float64 (deterministic optimum)."""
    x = torch.cat([b[0] for b in loader]).double()
    y = torch.cat([b[1] for b in loader])
    model = nn.Linear(64, 10).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def test_loo_ground_truth_end_to_end_correlates_with_exact_influence(tmp_path):
    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs[:45] / 16.0)
    y = torch.tensor(ys[:45])
    train = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=16)
    test = DataLoader(TensorDataset(x[40:43], y[40:43]), batch_size=3)
    removed = list(range(0, 40, 4))
    retrain_loo(_train_lr_lbfgs, train, tmp_path, indices=removed, verbose=False)

    def target(ckpt, loader):
        model = nn.Linear(64, 10).double()
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        xb, yb = next(iter(loader))
        with torch.no_grad():
            return nn.functional.cross_entropy(model(xb.double()), yb, reduction="none")

    gt, rem = calculate_loo_ground_truth(target, tmp_path, test)
    assert rem.tolist() == removed and gt.shape == (len(removed), 3)

    # exact influence at the full-data optimum: loss change when removing i
    # ~ (1/n) g_test^T H^-1 g_i, so it correlates with the raw LOO test loss.
    full = _train_lr_lbfgs(train)
    theta = torch.cat([full.weight.detach().flatten(), full.bias.detach()])
    base = nn.Linear(64, 10).double()

    def loss(th, xb, yb):
        out = functional_call(base, {"weight": th[:640].view(10, 64), "bias": th[640:]}, (xb,))
        return nn.functional.cross_entropy(out, yb)

    h = hessian(lambda th: loss(th, x[:40], y[:40]) + 0.5 * WD * th.pow(2).sum())(theta)
    per_grad = vmap(grad(lambda th, xi, yi: loss(th, xi[None], yi[None])), in_dims=(None, 0, 0))
    score = per_grad(theta, x[:40], y[:40]) @ torch.linalg.solve(
        h, per_grad(theta, x[40:43], y[40:43]).T
    )
    corr, pval = loo_corr(score, (gt, rem))  # score has all 40 rows; rows selected by rem
    assert corr.min() > 0.95
    assert (pval < 1e-4).all()


# --------------------------------------------------------------------------- brittleness


class MajorityModel(nn.Module):
    """Predicts the majority training label (ties -> smaller label)."""

    def __init__(self, labels):
        super().__init__()
        self.pred = torch.bincount(labels, minlength=2).argmax()

    def forward(self, x):
        return self.pred.expand(x.shape[0])


def _train_majority(loader):
    return MajorityModel(torch.cat([b[1] for b in loader]))


def _eval(model, loader):
    x, _ = next(iter(loader))
    return model(x)


class ReversedSampler(Sampler):
    """Deterministic sampler without an ``indices`` attribute."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


def _brute_force(train_labels, test_label, column, space):
    order = torch.argsort(column, descending=True, stable=True)
    for k in space:
        keep = torch.ones(len(train_labels), dtype=torch.bool)
        keep[order[:k]] = False
        if torch.bincount(train_labels[keep], minlength=2).argmax().item() != test_label:
            return k
    return None


def test_brittleness_single_and_multi_test_vs_brute_force():
    # dataset: 10 of class 0 then 6 of class 1; loader order is reversed
    labels = torch.tensor([0] * 10 + [1] * 6)
    train_ds = TensorDataset(torch.zeros(16, 1), labels)
    train = DataLoader(train_ds, batch_size=4, sampler=ReversedSampler(16))
    pos_labels = labels.flip(0)  # labels in loader (position) order
    scores0 = (pos_labels == 0).double() + torch.linspace(0, 0.1, 16, dtype=torch.float64)
    test_single = DataLoader(TensorDataset(torch.zeros(1, 1), torch.tensor([0])), batch_size=1)
    space = list(range(0, 12))
    k = brittleness(train, test_single, scores0, _train_majority, _eval, search_space=space)
    assert k == _brute_force(pos_labels, 0, scores0, space) == 5  # 5 vs 6 flips; 6 vs 6 ties
    # scores that point at the wrong class never flip the prediction
    assert (
        brittleness(train, test_single, -scores0, _train_majority, _eval, search_space=space)
        is None
    )

    # several test samples, 2-D scores, one column each
    test_multi = DataLoader(TensorDataset(torch.zeros(3, 1), torch.tensor([0, 1, 0])), batch_size=2)
    scores = torch.stack([scores0, scores0, -scores0], dim=1)
    ks = brittleness(train, test_multi, scores, _train_majority, _eval, search_space=space)
    expected = [_brute_force(pos_labels, t, scores[:, j], space) for j, t in enumerate([0, 1, 0])]
    assert ks == expected == [5, 0, None]  # test 1 (label 1) is already misclassified

    assert check_if_flip(train, test_single, torch.arange(5), _train_majority, _eval) is False
    assert check_if_flip(train, test_single, list(range(6, 10)), _train_majority, _eval) is False
    assert check_if_flip(train, test_single, list(range(6, 11)), _train_majority, _eval) is True


def test_brittleness_errors():
    train = DataLoader(TensorDataset(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1])), batch_size=2)
    test = DataLoader(TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1])), batch_size=2)
    with pytest.raises(ValueError, match="n_train, n_test"):
        brittleness(train, test, torch.zeros(4, 3), _train_majority, _eval)
    with pytest.raises(ValueError, match="search_space"):
        brittleness(train, test, torch.zeros(4, 2), _train_majority, _eval, search_space=[0, 9])
    with pytest.raises(ValueError, match="increasing"):
        brittleness(train, test, torch.zeros(4, 2), _train_majority, _eval, search_space=[2, 1])
    with pytest.raises(ValueError, match="exactly one"):
        check_if_flip(train, test, [0], _train_majority, _eval)
