"""Vectorised subset training == sequential == plain torch training; LDS layout + resume."""

import pytest
import torch
import yaml
from sklearn.datasets import load_digits
from torch import nn

from dattri.model_util import (
    SubsetTrainConfig,
    retrain_lds,
    retrain_lds_vectorized,
    train_subset_models,
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:60] / 16.0, dtype=torch.float32), torch.tensor(y[:60])


def mlp():
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))


def logreg():
    return nn.Linear(64, 10)


def _masks(n_models, n, seed=0, p=0.5):
    return torch.rand(n_models, n, generator=torch.Generator().manual_seed(seed)) < p


def _max_diff(a, b):
    return max((sa[k] - sb[k]).abs().max().item() for sa, sb in zip(a, b, strict=True) for k in sa)


@pytest.mark.parametrize(("factory", "batch_size"), [(mlp, 16), (logreg, None)])
def test_vectorized_equals_sequential(digits, factory, batch_size):
    cfg = SubsetTrainConfig(
        epochs=6, lr=0.2, momentum=0.9, weight_decay=1e-2, batch_size=batch_size, seed=3
    )
    masks = _masks(5, 60)
    masks[4] = False
    masks[4, 7] = True  # one sample: most batches hold none of it (zero-gradient steps)
    vec = train_subset_models(factory, digits, masks, cfg, verbose=False)
    seq = train_subset_models(factory, digits, masks, cfg, vectorized=False, verbose=False)
    assert len(vec) == 5 and set(vec[0]) == set(factory().state_dict())
    assert _max_diff(vec, seq) < 1e-5
    # the models really differ from each other and from their initialisation
    assert _max_diff(vec[:1], vec[1:2]) > 1e-2
    init = train_subset_models(
        factory, digits, masks[:1], SubsetTrainConfig(epochs=1, lr=1e-12, seed=3), verbose=False
    )
    assert _max_diff(vec[:1], init) > 1e-2
    # chunked vmap and float64 give the same models
    chunked = train_subset_models(
        factory,
        digits,
        masks,
        SubsetTrainConfig(**{**cfg.__dict__, "model_chunk_size": 2}),
        verbose=False,
    )
    assert _max_diff(vec, chunked) < 1e-5


def test_full_batch_matches_plain_torch_training_on_subset(digits):
    x, y = digits
    mask = _masks(1, 60, seed=1)[0]
    cfg = SubsetTrainConfig(
        epochs=15,
        lr=0.3,
        momentum=0.5,
        weight_decay=1e-3,
        batch_size=None,
        seed=0,
        dtype=torch.float64,
    )
    (vec,) = train_subset_models(mlp, (x, y), mask[None], cfg, init_seeds=[42], verbose=False)
    torch.manual_seed(42)
    ref = mlp().double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.5, weight_decay=1e-3)
    for _ in range(15):
        opt.zero_grad()
        nn.CrossEntropyLoss()(ref(x[mask].double()), y[mask]).backward()
        opt.step()
    for k, v in ref.state_dict().items():
        assert torch.allclose(vec[k], v, atol=1e-10), k


def test_mse_loss_and_determinism(digits):
    x, _ = digits
    t = x[:, :3] * 2 - 1  # regression targets (60, 3)
    cfg = SubsetTrainConfig(epochs=4, lr=0.05, batch_size=20, loss="mse")
    a = train_subset_models(lambda: nn.Linear(64, 3), (x, t), _masks(3, 60), cfg, verbose=False)
    b = train_subset_models(
        lambda: nn.Linear(64, 3), (x, t), _masks(3, 60), cfg, vectorized=False, verbose=False
    )
    c = train_subset_models(lambda: nn.Linear(64, 3), (x, t), _masks(3, 60), cfg, verbose=False)
    assert _max_diff(a, b) < 1e-5
    assert _max_diff(a, c) == 0.0


def test_retrain_lds_vectorized_layout_matches_retrain_lds_and_resumes(digits, tmp_path):
    x, y = digits
    cfg = SubsetTrainConfig(epochs=3, lr=0.1, batch_size=30)
    calls = []

    def factory():
        calls.append(1)
        return logreg()

    lds_args = dict(num_subsets=4, subset_ratio=0.5, num_runs_per_subset=2, seed=5, verbose=False)

    def run_vectorized():
        retrain_lds_vectorized(factory, (x, y), tmp_path / "vec", config=cfg, **lds_args)

    run_vectorized()
    assert len(calls) == 8
    meta = yaml.safe_load((tmp_path / "vec" / "metadata.yml").read_text())
    assert meta["mode"] == "lds" and meta["num_subsets"] == 4 and meta["data_length"] == 60
    assert meta["subset_dir_map"] == {i: str(i) for i in range(4)}
    assert meta["trainer"]["batch_size"] == 30

    # same subsets as the generic retrainer with the same seed
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    retrain_lds(lambda ld, seed: logreg(), loader, tmp_path / "gen", **lds_args)
    for i in range(4):
        a = (tmp_path / "vec" / str(i) / "indices.txt").read_text()
        assert a == (tmp_path / "gen" / str(i) / "indices.txt").read_text()

    # stored weights = train_subset_models with run seeds seed + i * runs + j
    pos = [int(t) for t in (tmp_path / "vec" / "2" / "indices.txt").read_text().split()]
    mask = torch.zeros(1, 60, dtype=torch.bool)
    mask[0, pos] = True
    (ref,) = train_subset_models(
        logreg, (x, y), mask, cfg, init_seeds=[5 + 2 * 2 + 1], verbose=False
    )
    stored = torch.load(tmp_path / "vec" / "2" / "model_weights_1.pt", weights_only=True)
    assert _max_diff([stored], [ref]) < 1e-6

    # resume: nothing retrained; a deleted file is retrained identically
    calls.clear()
    run_vectorized()
    assert calls == []
    (tmp_path / "vec" / "2" / "model_weights_1.pt").unlink()
    run_vectorized()
    assert len(calls) == 1
    again = torch.load(tmp_path / "vec" / "2" / "model_weights_1.pt", weights_only=True)
    assert _max_diff([again], [stored]) < 1e-6


def test_train_subset_models_errors(digits):
    x, y = digits
    with pytest.raises(ValueError, match="masks"):
        train_subset_models(logreg, (x, y), torch.ones(2, 59), verbose=False)
    with pytest.raises(ValueError, match="0/1"):
        train_subset_models(logreg, (x, y), torch.full((2, 60), 0.5), verbose=False)
    with pytest.raises(ValueError, match="differ in length"):
        train_subset_models(logreg, (x, y[:50]), torch.ones(2, 60), verbose=False)
    with pytest.raises(ValueError, match="init_seeds"):
        train_subset_models(logreg, (x, y), torch.ones(2, 60), init_seeds=[1], verbose=False)
    with pytest.raises(NotImplementedError, match="Dropout"):
        train_subset_models(
            lambda: nn.Sequential(nn.Linear(64, 10), nn.Dropout()),
            (x, y),
            torch.ones(1, 60),
            verbose=False,
        )
    with pytest.raises(ValueError, match="epochs"):
        SubsetTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="loss"):
        SubsetTrainConfig(loss="hinge")
    with pytest.raises(TypeError, match="nn.Module"):
        train_subset_models(lambda: 3, (x, y), torch.ones(1, 60), verbose=False)


def test_lds_from_vectorized_ground_truth_with_influence_scores(digits, tmp_path):
    """End to end: vectorised LR retraining -> ground truth -> lds.

    Scores are exact influence g_test^T H^-1 g_train at the full-data optimum
    (explicit Hessian of the L2-regularised objective), so LDS must be high; a
    random score must not be.
    """
    from torch.func import functional_call, grad, hessian, vmap

    from dattri.metric import calculate_lds_ground_truth, lds

    x, y = digits
    x_tr, y_tr, x_te, y_te = x[:40], y[:40], x[40:45], y[40:45]
    wd = 1e-2
    cfg = SubsetTrainConfig(epochs=50, lr=1.0, batch_size=None, weight_decay=wd)
    retrain_lds_vectorized(
        logreg,
        (x_tr, y_tr),
        tmp_path,
        num_subsets=30,
        subset_ratio=0.5,
        seed=0,
        config=cfg,
        verbose=False,
    )
    test_loader = [(x_te, y_te)]

    def target(ckpt, loader):
        model = logreg()
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        xb, yb = loader[0]
        with torch.no_grad():
            return nn.functional.cross_entropy(model(xb), yb, reduction="none")

    gt, idx = calculate_lds_ground_truth(target, tmp_path, test_loader)
    assert gt.shape == (30, 5) and idx.shape == (30, 20)

    (full,) = train_subset_models(logreg, (x_tr, y_tr), torch.ones(1, 40), cfg, verbose=False)
    model = logreg()
    theta = torch.cat([full["weight"].flatten(), full["bias"]]).double()

    def loss(th, xb, yb):
        out = functional_call(
            model, {"weight": th[:640].view(10, 64), "bias": th[640:]}, (xb.double(),)
        )
        return nn.functional.cross_entropy(out, yb)

    h = hessian(lambda th: loss(th, x_tr, y_tr) + 0.5 * wd * th.pow(2).sum())(theta)
    per_grad = vmap(grad(lambda th, xi, yi: loss(th, xi[None], yi[None])), in_dims=(None, 0, 0))
    g_tr, g_te = per_grad(theta, x_tr, y_tr), per_grad(theta, x_te, y_te)
    score = g_tr @ torch.linalg.solve(h, g_te.T)  # (40, 5)
    corr, _ = lds(score, (gt, idx))
    rand, _ = lds(torch.randn(40, 5, generator=torch.Generator().manual_seed(0)), (gt, idx))
    assert corr.min() > 0.85  # measured ~0.94-0.99
    assert rand.abs().mean() < 0.4
