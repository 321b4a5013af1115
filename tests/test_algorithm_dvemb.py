"""DVEmb: embeddings equal the explicit unrolled product formula over SGD steps."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.algorithm.utils import dense_projection_matrix, dvemb_embeddings
from dattri.params.projection import DVEmbProjectionParams
from dattri.task import AttributionTask

N_TRAIN, BATCH, LR = 8, 3, 0.5
EPOCHS = (3, 7)  # arbitrary epoch keys


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (N_TRAIN + 4,), generator=g)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _functional_loss(model):
    def loss(params, sample):
        x, y = sample
        return F.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    return loss


def _eager_loss(model, batch, device):
    x, y = batch
    return F.cross_entropy(model(x.to(device)), y.to(device))


def _explicit_grads(model, x, y, names=None):
    """Per-sample gradients by a Python loop of autograd.grad: (B, p) in named order."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _schedule():
    """Deterministic per-epoch permutations split into batches (last batch smaller)."""
    g = torch.Generator().manual_seed(1)
    steps = []
    for epoch in EPOCHS:
        perm = torch.randperm(N_TRAIN, generator=g)
        steps += [(epoch, perm[s : s + BATCH]) for s in range(0, N_TRAIN, BATCH)]
    return steps


def _train(model, record, lr_of=lambda t: LR / (1 + t)):
    """SGD on the mean CE loss; ``record(epoch, idx, lr, x, y, step_fn)`` per step."""
    x_tr, y_tr, _, _ = _data()
    for t, (epoch, idx) in enumerate(_schedule()):
        lr = lr_of(t)

        def step(x=x_tr[idx], y=y_tr[idx], lr=lr):  # plain SGD (no torch.optim import cost)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad

        record(epoch, idx, lr, x_tr[idx], y_tr[idx], step)


def _reference(project=None, names=None):
    """Unrolled DVEmb: emb_{t,i} = eta_t prod_{s>t}(I - eta_s H_s) g_{t,i}, explicit matrices."""
    model = _model()
    steps = []

    def record(epoch, idx, lr, x, y, step):
        g = _explicit_grads(model, x, y, names)
        if project is not None:
            g = project(g)
        steps.append((epoch, idx, lr / len(idx), g))
        step()

    _train(model, record)
    d = steps[0][3].shape[1]
    emb = {e: torch.zeros(N_TRAIN, d, dtype=torch.float64) for e in EPOCHS}
    for t, (epoch, idx, eta, g) in enumerate(steps):
        prod = torch.eye(d, dtype=torch.float64)
        for _, _, eta_s, g_s in steps[t + 1 :]:
            prod = (torch.eye(d, dtype=torch.float64) - eta_s * g_s.T @ g_s) @ prod
        emb[epoch][idx] += eta * g @ prod.T
    _, _, x_te, y_te = _data()
    g_test = _explicit_grads(model, x_te, y_te, names)
    if project is not None:
        g_test = project(g_test)
    return emb, g_test, model


def _run(attr_factory, use_context=False):
    model = _model()
    attr = attr_factory(model)

    def record(epoch, idx, lr, x, y, step):
        if use_context:
            with attr.cache_gradients_context(epoch, idx, lr):
                step()
        else:
            attr.cache_gradients(epoch, (x, y), idx, lr)
            step()

    _train(model, record)
    return attr


def _none_attr(model, **kw):
    task = AttributionTask(_functional_loss(model), model, checkpoints=model.state_dict())
    return DVEmbAttributor(task, verbose=False, **kw)


def _factor_attr(model, kind, **kw):
    task = AttributionTask(_eager_loss, model, checkpoints=model.state_dict())
    return DVEmbAttributor(task, factorization_type=kind, verbose=False, **kw)


def _test_loader():
    _, _, x_te, y_te = _data()
    return DataLoader(TensorDataset(x_te, y_te), batch_size=3)


def test_none_mode_equals_unrolled_reference():
    emb_ref, g_test, _ = _reference()
    attr = _run(_none_attr)
    attr.cache()
    for e in EPOCHS:
        torch.testing.assert_close(attr.embeddings[e], emb_ref[e], atol=1e-12, rtol=1e-9)
    total = emb_ref[3] + emb_ref[7]
    scores = attr.attribute(_test_loader())
    assert scores.shape == (N_TRAIN, 4)
    torch.testing.assert_close(scores, total @ g_test.T, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(
        attr.attribute(_test_loader(), epoch=7, train_data_indices=[5, 0]),
        (emb_ref[7] @ g_test.T)[[5, 0]],
    )
    # self-attribution = diagonal of attribute with the train loader as test set
    x_tr, y_tr, _, _ = _data()
    order = [6, 1, 3, 0]
    loader = DataLoader(TensorDataset(x_tr[order], y_tr[order]), batch_size=3)
    full = attr.attribute(loader, train_data_indices=order)
    torch.testing.assert_close(attr.self_attribute(loader, train_data_indices=order), full.diag())


@pytest.mark.parametrize("kind", ["kronecker", "elementwise"])
def test_factorized_without_projection_equals_none_mode(kind):
    emb_ref, g_test, _ = _reference()
    attr = _run(lambda m: _factor_attr(m, kind))
    attr.cache()
    for e in EPOCHS:
        torch.testing.assert_close(attr.embeddings[e], emb_ref[e], atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(
        attr.attribute(_test_loader()), (emb_ref[3] + emb_ref[7]) @ g_test.T, atol=1e-12, rtol=1e-9
    )
    # the context manager around the user's own step records the same steps
    ctx = _run(lambda m: _factor_attr(m, kind), use_context=True)
    ctx.cache()
    for e in EPOCHS:
        torch.testing.assert_close(ctx.embeddings[e], attr.embeddings[e], atol=1e-12, rtol=1e-9)


def test_layer_subset_factorized_equals_none_mode_on_same_layer():
    names = ["2.weight", "2.bias"]
    emb_ref, g_test, _ = _reference(names=names)
    fac = _run(lambda m: _factor_attr(m, "kronecker", layer_names=["2"]))
    none = _run(lambda m: _none_attr(m, layer_names=["2"]))
    fac.cache()
    none.cache()
    for e in EPOCHS:
        torch.testing.assert_close(fac.embeddings[e], emb_ref[e], atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(none.embeddings[e], emb_ref[e], atol=1e-12, rtol=1e-9)
    ref = (emb_ref[3] + emb_ref[7]) @ g_test.T
    torch.testing.assert_close(fac.attribute(_test_loader()), ref, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(none.attribute(_test_loader()), ref, atol=1e-12, rtol=1e-9)


def test_conv_layers_factorized_equal_none_mode():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 2)
    ).double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))

    def fl(params, s):
        return F.cross_entropy(functional_call(m, params, (s[0].unsqueeze(0),)), s[1].unsqueeze(0))

    attrs = [DVEmbAttributor(AttributionTask(fl, m, m.state_dict()), verbose=False)]
    for kind in ("kronecker", "elementwise"):
        task = AttributionTask(_eager_loss, m, m.state_dict())
        attrs.append(DVEmbAttributor(task, None, kind, ["0", "3"], verbose=False))
    for a in attrs:
        a.cache_gradients(0, (x[:4], y[:4]), torch.arange(4), 0.3)
        a.cache_gradients(1, (x[4:], y[4:]), torch.tensor([1, 5]), 0.2)
        a.cache()
    for a in attrs[1:]:
        for e in (0, 1):
            torch.testing.assert_close(a.embeddings[e], attrs[0].embeddings[e])
        torch.testing.assert_close(a.attribute([(x, y)]), attrs[0].attribute([(x, y)]))


def test_dense_and_low_rank_recursions_agree_and_external_gradients():
    g = torch.Generator().manual_seed(2)
    steps = []
    for t in range(6):
        idx = torch.randperm(10, generator=g)[:4]
        steps.append((t // 3, 0.1 * torch.randn(4, 5, generator=g, dtype=torch.float64), 0.3, idx))
    dense = dvemb_embeddings(steps, 10, method="dense")
    low = dvemb_embeddings(steps, 10, method="low_rank")
    for e in (0, 1):
        torch.testing.assert_close(dense[e], low[e], atol=1e-14, rtol=1e-12)
    # external gradients / learning rates / indices through cache()
    model = _model()
    attr = _none_attr(model)
    attr.cache(
        gradients={e: [s[1] for s in steps if s[0] == e] for e in (0, 1)},
        learning_rates={e: [s[2] for s in steps if s[0] == e] for e in (0, 1)},
        data_indices={e: [s[3] for s in steps if s[0] == e] for e in (0, 1)},
    )
    for e in (0, 1):
        torch.testing.assert_close(attr.embeddings[e], dense[e])


def test_errors_and_warnings():
    model = _model()
    with pytest.raises(ValueError, match="Wrong loss function format"):
        _factor_attr(model, "none")
    task = AttributionTask(_functional_loss(model), model, checkpoints=model.state_dict())
    with pytest.raises(ValueError, match="Wrong loss function format"):
        DVEmbAttributor(task, factorization_type="kronecker")
    with pytest.raises(ValueError, match="factorization_type"):
        _none_attr(model, factorization_type="lowrank")
    with pytest.raises(ValueError, match="layer_names"):
        _factor_attr(model, "kronecker", layer_names=["1"])
    attr = _none_attr(model)
    with (
        pytest.raises(NotImplementedError, match="factorized"),
        attr.cache_gradients_context(0, torch.arange(3), 0.1),
    ):
        pass
    with pytest.raises(ValueError, match="No gradients cached"):
        attr.cache()
    with pytest.raises(RuntimeError, match="cache\\(\\)"):
        attr.attribute(_test_loader())
    x_tr, y_tr, _, _ = _data()
    with pytest.raises(ValueError, match="indices has 2 entries"):
        attr.cache_gradients(0, (x_tr[:3], y_tr[:3]), torch.arange(2), 0.1)
    attr.cache_gradients(0, (x_tr[:3], y_tr[:3]), torch.arange(3), 0.1)
    attr.cache()
    with pytest.raises(ValueError, match="No embeddings for epoch 5"):
        attr.attribute(_test_loader(), epoch=5)
    with pytest.raises(ValueError, match="train_data_indices"):
        attr.attribute(_test_loader(), train_data_indices=[10])
    fac = _factor_attr(model, "kronecker")
    with pytest.raises(ValueError, match="External gradients"):
        fac.cache(gradients={0: [torch.zeros(1, 2)]})
    fac.cache_gradients(0, (x_tr[:3], y_tr[:3]), torch.arange(3), 0.1)
    with (
        pytest.warns(UserWarning, match="Both"),
        fac.cache_gradients_context(0, torch.arange(3, 6), 0.1),
    ):
        F.cross_entropy(model(x_tr[3:6]), y_tr[3:6]).backward()


def test_nan_detected():
    steps = [(0, torch.tensor([[float("nan"), 1.0]]), 0.1, torch.tensor([0]))]
    with pytest.raises(ValueError, match="Non-finite"):
        dvemb_embeddings(steps, 1)


def _layer_matrices(g):
    """Split explicit grads (B, 26) of the MLP into [W | b] matrices per layer."""
    w0, b0 = g[:, :12].reshape(-1, 4, 3), g[:, 12:16].reshape(-1, 4, 1)
    w2, b2 = g[:, 16:24].reshape(-1, 2, 4), g[:, 24:26].reshape(-1, 2, 1)
    return {"0": torch.cat([w0, b0], 2), "2": torch.cat([w2, b2], 2)}


@pytest.mark.parametrize(
    ("kind", "k", "ptype"), [("kronecker", 4, "normal"), ("elementwise", 3, "rademacher")]
)
def test_factorized_projection_equals_projected_reference(kind, k, ptype):
    params = DVEmbProjectionParams(proj_dim_per_layer=k, proj_type=ptype, proj_seed=3)
    attr = _run(lambda m: _factor_attr(m, kind, proj_params=params))
    attr.cache()
    mats = attr.projectors
    assert mats["0"][0].shape == (math.isqrt(k) if kind == "kronecker" else k, 4)
    assert mats["2"][1].shape[1] == 2
    if ptype == "rademacher":  # the requested type is used: entries +-1/sqrt(k)
        torch.testing.assert_close(mats["0"][0].abs(), torch.full_like(mats["0"][0], k**-0.5))

    def project(g):
        parts = []
        for name, gm in _layer_matrices(g).items():
            p_in, p_out = mats[name]
            proj = p_out @ gm @ p_in.T  # (B, k_out, k_in)
            if kind == "kronecker":
                parts.append(proj.reshape(len(g), -1))
            else:
                parts.append(math.sqrt(k) * torch.diagonal(proj, dim1=1, dim2=2))
        return torch.cat(parts, 1)

    emb_ref, g_test, _ = _reference(project=project)
    for e in EPOCHS:
        torch.testing.assert_close(attr.embeddings[e], emb_ref[e], atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(
        attr.attribute(_test_loader()), (emb_ref[3] + emb_ref[7]) @ g_test.T, atol=1e-12, rtol=1e-9
    )


def test_none_mode_projection_and_default_type_warning():
    params = DVEmbProjectionParams(proj_dim_per_layer=5, proj_type="sjlt", proj_seed=1)
    attr = _run(lambda m: _none_attr(m, proj_params=params))
    attr.cache()
    p = dense_projection_matrix(26, 5, "sjlt", 1, "cpu", torch.float64)
    emb_ref, g_test, _ = _reference(project=lambda g: g @ p.T)
    for e in EPOCHS:
        torch.testing.assert_close(attr.embeddings[e], emb_ref[e], atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(attr.attribute(_test_loader()), (emb_ref[3] + emb_ref[7]) @ g_test.T)
    # upstream default proj_type="identity" with a dimension means a normal projection
    with pytest.warns(UserWarning, match="'normal' projection"):
        fac = _factor_attr(
            _model(), "kronecker", proj_params=DVEmbProjectionParams(proj_dim_per_layer=4)
        )
    p_in, _ = fac.featurizer._factor_projectors("0", 0, fac.featurizer._modules["0"])
    assert len(torch.unique(p_in.abs())) > 2  # Gaussian, not a mask/sign matrix
    with pytest.warns(UserWarning, match="perfect square"):
        _factor_attr(
            _model(),
            "kronecker",
            proj_params=DVEmbProjectionParams(proj_dim_per_layer=5, proj_type="normal"),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["none", "kronecker", "elementwise"])
def test_cuda_matches_cpu(kind):
    params = DVEmbProjectionParams(proj_dim_per_layer=4, proj_type="normal", proj_seed=2)
    x_tr, y_tr, x_te, y_te = _data()
    out = {}
    for dev in ("cpu", "cuda"):
        model = _model().to(dev)
        if kind == "none":
            attr = _none_attr(model, proj_params=params)
        else:
            attr = _factor_attr(model, kind, proj_params=params)
        for t, (epoch, idx) in enumerate(_schedule()):
            x, y = x_tr[idx].to(dev), y_tr[idx].to(dev)
            attr.cache_gradients(epoch, (x, y), idx, LR / (1 + t))
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR / (1 + t) * p.grad
        attr.cache()
        assert attr.embeddings[3].device.type == dev
        out[dev] = attr.attribute(DataLoader(TensorDataset(x_te.to(dev), y_te.to(dev))))
    torch.testing.assert_close(out["cuda"].cpu(), out["cpu"], atol=1e-10, rtol=1e-7)
