"""MAGICAttributor: exact metagradients vs finite differences of retraining, vs IF at
convergence, memory budget, resumable cache, same training as the ground truth."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dattri.algorithm import IFAttributorExplicit, MAGICAttributor
from dattri.model_util import SubsetTrainConfig, train_subset_models
from dattri.task import AttributionTask

D, C = 5, 3


def _data(n=24, n_test=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    xt = torch.randn(n_test, D, generator=g, dtype=torch.float64)
    yt = torch.randint(0, C, (n_test,), generator=g)
    return x, y, xt, yt


def mlp():
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))


def logreg():
    return nn.Linear(D, C)


def _task(factory, state_dict):
    model = factory().double()
    model.load_state_dict(state_dict)

    def loss(params, data):
        xx, yy = data
        return nn.functional.cross_entropy(functional_call(model, params, (xx,)), yy)

    return AttributionTask(loss_func=loss, model=model, checkpoints=state_dict)


def _train(factory, x, y, cfg, seed):
    """The full model, trained by the ground-truth trainer."""
    mask = torch.ones(1, x.shape[0], dtype=torch.bool)
    (sd,) = train_subset_models(
        factory, (x, y), mask, cfg, init_seeds=[seed], vectorized=False, verbose=False
    )
    return sd


def _test_losses(att, weights, xt, yt):
    """Retrain with per-sample weights (MAGIC's replay = train_step) and evaluate."""
    from dattri.model_util.train_step import init_optimizer_state

    att._weights = weights
    state = (att._init_params, init_optimizer_state(att._init_params, att.config))
    for t in range(att._T):
        state = att._step(state, t)
    att._weights = torch.ones_like(weights)
    return torch.stack([att._test_loss(state[0], xt[j], yt[j]) for j in range(len(xt))])


@pytest.mark.parametrize(
    ("factory", "kw"),
    [
        (mlp, {"optimizer": "sgd", "momentum": 0.9, "lr_schedule": "linear"}),
        (mlp, {"optimizer": "adam", "lr": 0.02, "lr_schedule": "cosine", "warmup_steps": 2}),
        (logreg, {"optimizer": "sgd", "momentum": 0.0, "batch_size": 5}),
    ],
)
@pytest.mark.parametrize("block", [3, 1])  # vectorised pullbacks / one-cotangent autograd
def test_magic_equals_finite_differences_of_retraining(factory, kw, block):
    x, y, xt, yt = _data()
    base = {"epochs": 3, "lr": 0.3, "weight_decay": 1e-2, "batch_size": 8, "seed": 1}
    cfg = SubsetTrainConfig(**{**base, **kw, "dtype": torch.float64})
    sd = _train(factory, x, y, cfg, seed=1)
    att = MAGICAttributor(
        _task(factory, sd), factory, cfg, init_seed=1, test_block_size=block, verbose=False
    )
    att.cache((x, y))
    scores = att.attribute((x, y), (xt, yt))
    assert scores.shape == (24, 4) and scores.dtype == torch.float64
    eps = 1e-5
    for i in (0, 7, 23):
        wp = torch.ones(24, dtype=torch.float64)
        wm = wp.clone()
        wp[i] += eps
        wm[i] -= eps
        fd = -(_test_losses(att, wp, xt, yt) - _test_losses(att, wm, xt, yt)) / (2 * eps)
        # central differences: O(eps^2) truncation, O(1e-16 / eps) rounding
        torch.testing.assert_close(scores[i], fd, rtol=1e-4, atol=1e-8 * fd.abs().max())
    assert scores.abs().max() > 1e-3


def test_replay_is_the_ground_truth_training():
    """MAGIC's replay ends at the model train_subset_models trains (no warning)."""
    x, y, _, _ = _data()
    cfg = SubsetTrainConfig(epochs=2, lr=0.2, batch_size=8, seed=4, dtype=torch.float64)
    sd = _train(mlp, x, y, cfg, seed=4)
    att = MAGICAttributor(_task(mlp, sd), mlp, cfg, verbose=False)
    att.cache((x, y))  # init_seed defaults to cfg.seed
    for name, p in zip(att._names, att._final[0], strict=True):
        torch.testing.assert_close(p, sd[name], rtol=1e-12, atol=1e-12)
    other = _train(mlp, x, y, cfg, seed=5)
    att = MAGICAttributor(_task(mlp, other), mlp, cfg, verbose=False)
    with pytest.warns(UserWarning, match="differs from the replayed"):
        att.cache((x, y))


def test_magic_equals_if_explicit_at_convergence():
    """Full-batch GD on L2-regularised LR to convergence: n * MAGIC = IF - mean_i IF."""
    x, y, xt, yt = _data(n=30, n_test=5, seed=2)
    wd = 0.1
    cfg = SubsetTrainConfig(
        epochs=300, lr=1.0, momentum=0.5, weight_decay=wd, batch_size=None, dtype=torch.float64
    )
    sd = _train(logreg, x, y, cfg, seed=0)
    task = _task(logreg, sd)
    # converged: the gradient of the regularised mean loss vanishes
    params = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    obj = task.original_loss_func(params, (x, y)) + 0.5 * wd * sum(
        (p**2).sum() for p in params.values()
    )
    gnorm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, list(params.values()))])
    assert gnorm.norm() < 1e-10
    magic = MAGICAttributor(task, logreg, cfg, test_block_size=5, verbose=False)
    magic.cache((x, y))
    got = magic.attribute((x, y), (xt, yt))
    loader = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)]
    test_loader = [(xt, yt)]
    ifx = IFAttributorExplicit(task, regularization=wd, verbose=False)
    ifx.cache(loader)
    ref = ifx.attribute(loader, test_loader)
    torch.testing.assert_close(30 * got, ref - ref.mean(0), rtol=1e-7, atol=1e-9)


def test_memory_budget_and_same_scores():
    x, y, xt, yt = _data(n=20)
    cfg = SubsetTrainConfig(
        epochs=5, lr=0.2, momentum=0.9, batch_size=4, seed=0, dtype=torch.float64
    )  # T = 25 steps
    sd = _train(mlp, x, y, cfg, seed=0)
    task = _task(mlp, sd)
    ref_att = MAGICAttributor(task, mlp, cfg, test_block_size=4, verbose=False)
    ref_att.cache((x, y))
    ref = ref_att.attribute((x, y), (xt, yt))
    assert ref_att.peak_states <= 2 * 5 + 2  # O(sqrt(T)) states by default
    state_bytes = ref_att._state_bytes
    adjoint = 3 * 4 * state_bytes
    for n_states in (3, 4, 6, 9):
        budget = adjoint + n_states * state_bytes
        att = MAGICAttributor(task, mlp, cfg, max_memory=budget, test_block_size=4, verbose=False)
        att.cache((x, y))
        got = att.attribute((x, y), (xt, yt))
        assert att.peak_memory <= budget
        assert att.peak_states <= n_states
        assert att.reverse_steps == 25
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="max_memory"):
        MAGICAttributor(task, mlp, cfg, max_memory=adjoint, test_block_size=4).cache((x, y))


def test_resumable_cache_and_errors(tmp_path):
    x, y, xt, yt = _data()
    cfg = SubsetTrainConfig(epochs=2, lr=0.2, batch_size=8, seed=0, dtype=torch.float64)
    sd = _train(mlp, x, y, cfg, seed=0)
    task = _task(mlp, sd)
    att = MAGICAttributor(task, mlp, cfg, cache_dir=tmp_path, test_block_size=2, verbose=False)
    with pytest.raises(ValueError, match="call cache"):
        att.attribute((x, y), (xt, yt))
    att.cache((x, y))
    first = att.attribute((x, y), (xt, yt))
    again = MAGICAttributor(task, mlp, cfg, cache_dir=tmp_path, test_block_size=2, verbose=False)
    again.cache((x, y))
    assert again.forward_steps == 0  # checkpoints loaded, not replayed
    torch.testing.assert_close(again.attribute((x, y), (xt, yt)), first, rtol=0, atol=0)
    assert again.reverse_steps == 0  # every block loaded
    with pytest.raises(ValueError, match="train_dataloader must yield"):
        again.attribute((x[:10], y[:10]), (xt, yt))
    other = SubsetTrainConfig(epochs=2, lr=0.3, batch_size=8, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="different run"):
        MAGICAttributor(task, mlp, other, cache_dir=tmp_path, verbose=False).cache((x, y))
    with pytest.raises(ValueError, match="trainable parameters"):
        MAGICAttributor(task, logreg, cfg, verbose=False).cache((x, y))
    # self-influence = the diagonal of attribute(train, train)
    full = att.attribute((x, y), (x, y))
    torch.testing.assert_close(att.self_attribute((x, y)), full.diagonal())
    # a DataLoader-style list of batches gives the same scores
    loader = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 24, 5)]
    torch.testing.assert_close(att.attribute(loader, [(xt[:2], yt[:2]), (xt[2:], yt[2:])]), first)


def test_secant_check_converges_to_the_metagradient():
    """Secants of the replayed run approach the scores as d -> 0 (O(d) on a smooth run)."""
    x, y, xt, yt = _data()
    cfg = SubsetTrainConfig(
        epochs=2, lr=0.3, momentum=0.9, batch_size=8, seed=1, dtype=torch.float64
    )
    sd = _train(mlp, x, y, cfg, seed=1)
    att = MAGICAttributor(_task(mlp, sd), mlp, cfg, init_seed=1, verbose=False)
    with pytest.raises(ValueError, match=r"before secant_check"):
        att.secant_check((xt, yt), [0])
    att.cache((x, y))
    out = att.secant_check((xt, yt), [0, 5], deltas=(1e-2, 1e-4))
    assert out["secants"].shape == (2, 2, 4) and out["scores"].shape == (2, 4)
    torch.testing.assert_close(out["scores"], att.attribute((x, y), (xt, yt))[[0, 5]])
    # a one-sided difference: error ~ d * |F''| / 2, so 100x smaller d -> ~100x smaller
    err = out["relative_error"]
    assert err[1] < 1e-3 and err[1] < err[0] / 20
    # the secant is the replay itself: sample 5 at weight 1 - d
    w = torch.ones(24, dtype=torch.float64)
    w[5] -= 1e-2
    base = _test_losses(att, torch.ones(24, dtype=torch.float64), xt, yt)
    torch.testing.assert_close(
        out["secants"][0, 1], (_test_losses(att, w, xt, yt) - base) / 1e-2, rtol=1e-10, atol=0
    )
    with pytest.raises(ValueError, match="deltas must lie in"):
        att.secant_check((xt, yt), [0], deltas=(0.0,))
    with pytest.raises(ValueError, match="train_indices"):
        att.secant_check((xt, yt), [24])


def test_bad_loaders_name_the_argument():
    x, y, xt, yt = _data()
    cfg = SubsetTrainConfig(epochs=1, lr=0.1, batch_size=8, seed=1, dtype=torch.float64)
    att = MAGICAttributor(_task(mlp, _train(mlp, x, y, cfg, seed=1)), mlp, cfg, verbose=False)
    with pytest.raises(TypeError, match=r"full_train_dataloader: needs \(inputs, targets\)"):
        att.cache([{"x": x, "y": y}])
    with pytest.raises(ValueError, match="full_train_dataloader is empty"):
        att.cache([])
    att.cache((x, y))
    with pytest.raises(ValueError, match="test_dataloader: every batch must be"):
        att.attribute((x, y), [(xt, yt), (xt,)])
