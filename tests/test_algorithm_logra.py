"""LoGra / FactGraSS / BlockProjectedIF against brute-force references.

References are built from exact per-sample gradients (a Python loop of
``torch.autograd.grad``), reshaped to the layer matrix ``[grad_W | grad_b]`` and
compressed with the attributor's own projection matrices.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dattri.algorithm.block_projected_if import BlockProjectedIFAttributor, stable_inverse
from dattri.algorithm.factgrass import FactGraSSAttributor
from dattri.algorithm.logra import LoGraAttributor
from dattri.algorithm.store.host_rows import HostRows
from dattri.algorithm.store.memmap_store import StoredRows
from dattri.task import AttributionTask
from tests.problems import cached_random_mlp

IDENTITY = {"proj_type": "identity"}


# --------------------------------------------------------------------------- helpers


def _mlp_problem():
    return cached_random_mlp(n_train=24, n_test=6, d_in=5, hidden=6, n_classes=3, train=False)


def _functional_loss(model):
    def loss(params, data):
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _eager_loss(model, batch, device):
    x, y = batch
    return F.cross_entropy(model(x.to(device)), y.to(device))


def _task(model, loss=None, target=None, checkpoints=None):
    loss = loss if loss is not None else _functional_loss(model)
    ckpt = checkpoints if checkpoints is not None else model.state_dict()
    return AttributionTask(loss_func=loss, model=model, checkpoints=ckpt, target_func=target)


def _loaders(pb, bs_train=10, bs_test=4):
    return pb.train_loader(bs_train), pb.test_loader(bs_test)


def _layer_grad_mats(model, layer, x, y, loss_one=None):
    """Exact per-sample layer gradient matrices [grad_W | grad_b], (n, d_out, d_in')."""
    module = dict(model.named_modules())[layer]
    bias = getattr(module, "bias", None)
    params = [module.weight] + ([bias] if bias is not None else [])
    out = []
    for i in range(len(x)):
        if loss_one is None:
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        else:
            loss = loss_one(model, x[i : i + 1], y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        w = grads[0].reshape(grads[0].shape[0], -1)
        if len(grads) > 1:
            w = torch.cat([w, grads[1].reshape(-1, 1)], dim=1)
        out.append(w)
    return torch.stack(out)


def _compressed(att, model, x, y, loss_one=None, stage2=True):
    """Per-layer compressed gradients from exact gradients and the attributor's factors."""
    reps = []
    for comp in att.compressors:
        g = _layer_grad_mats(model, comp.name, x, y, loss_one)
        c = torch.einsum("ko,nod,ld->nkl", comp.proj_out, g, comp.proj_in).reshape(len(x), -1)
        if comp.projector is not None and stage2:
            c = comp.projector(c)
        reps.append(c)
    return reps


def _reference_scores(train_reps, test_reps, hessian, damping, ranks=None):
    """Explicit solves; the shift is ``damping * tr(F) / r`` (``r = d`` unless given)."""
    total = 0
    for i, (ctr, cte) in enumerate(zip(train_reps, test_reps)):
        if hessian == "eFIM":
            fisher = ctr.T @ ctr / ctr.shape[0]
            d = fisher.shape[0]
            r = d if ranks is None else ranks[i]
            mat = fisher + damping * torch.trace(fisher) / r * torch.eye(d, dtype=fisher.dtype)
            total = total + ctr @ torch.linalg.solve(mat, cte.T)
        else:
            total = total + ctr @ cte.T
    return total


# ------------------------------------------------------------------------ LoGra math


@pytest.mark.parametrize("layer_names", [None, ["2"]])
def test_logra_identity_compression_equals_grad_dot(layer_names):
    pb = _mlp_problem()
    att = LoGraAttributor(
        _task(pb.model),
        layer_names=layer_names,
        hessian="Identity",
        proj_params=IDENTITY,
        verbose=False,
    )
    train, test = _loaders(pb)
    att.cache(train)
    scores = att.attribute(train, test)
    layers = ["0", "2"] if layer_names is None else layer_names
    assert att.layer_names == layers
    # Grad-Dot over the same layers, from a loop of autograd.grad
    params = [p for n, p in pb.model.named_parameters() if n.split(".")[0] in layers]

    def grads(x, y):
        rows = []
        for i in range(len(x)):
            loss = F.cross_entropy(pb.model(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    ref = grads(pb.x_train, pb.y_train) @ grads(pb.x_test, pb.y_test).T
    assert scores.shape == (24, 6)
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-12)
    assert att.layer_dims == [
        sum(p.numel() for n, p in pb.model.named_parameters() if n.startswith(f"{layer}."))
        for layer in layers
    ]


@pytest.mark.parametrize("damping", [None, 0.3])
def test_logra_efim_identity_compression_equals_inverse_fisher(damping):
    pb = _mlp_problem()
    att = LoGraAttributor(
        _task(pb.model), hessian="eFIM", damping=damping, proj_params=IDENTITY, verbose=False
    )
    train, test = _loaders(pb)
    att.cache(train)
    scores = att.attribute(train, test)
    tr = [
        g.reshape(24, -1)
        for g in (_layer_grad_mats(pb.model, n, pb.x_train, pb.y_train) for n in ("0", "2"))
    ]
    te = [
        g.reshape(6, -1)
        for g in (_layer_grad_mats(pb.model, n, pb.x_test, pb.y_test) for n in ("0", "2"))
    ]
    if damping is None:
        # automatic: 1.0 x mean non-zero eigenvalue; layer "0" has 36 coordinates but
        # only 24 samples (rank <= 24), layer "2" has 21 coordinates
        ranks = [24, 21]
        ref = _reference_scores(tr, te, "eFIM", 1.0, ranks)
        assert att._damping_used.startswith("auto")
    else:
        ref = _reference_scores(tr, te, "eFIM", damping)
    torch.testing.assert_close(scores, ref, rtol=1e-7, atol=1e-9)
    # damping really matters (the test would catch a wrong convention)
    other = _reference_scores(tr, te, "eFIM", 1.0)
    assert (other - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("hessian", ["Identity", "eFIM"])
def test_logra_compressed_equals_hand_formula(hessian):
    pb = _mlp_problem()
    att = LoGraAttributor(
        _task(pb.model),
        hessian=hessian,
        damping=0.05,
        proj_params={"proj_dim_per_layer": 9, "proj_seed": 3},
        verbose=False,
    )
    assert att.layer_dims == [9, 9]
    assert all(c.proj_in.shape[0] == 3 and c.proj_out.shape[0] == 3 for c in att.compressors)
    train, test = _loaders(pb)
    att.cache(train)
    scores = att.attribute(train, test)
    tr = _compressed(att, pb.model, pb.x_train, pb.y_train)
    te = _compressed(att, pb.model, pb.x_test, pb.y_test)
    ref = _reference_scores(tr, te, hessian, 0.05)
    torch.testing.assert_close(scores, ref, rtol=1e-7, atol=1e-9)
    # new damping: IFVPs are refreshed before the next attribute
    att.compute_preconditioners(damping=0.4)
    ref = _reference_scores(tr, te, hessian, 0.4)
    torch.testing.assert_close(att.attribute(train, test), ref, rtol=1e-7, atol=1e-9)
    att.compute_ifvp()
    torch.testing.assert_close(
        att.compute_self_attribution(),
        _reference_scores(tr, tr, hessian, 0.4).diagonal(),
        rtol=1e-7,
        atol=1e-9,
    )


def test_logra_factors_are_gaussian_and_seeded():
    pb = cached_random_mlp(n_train=24, n_test=6, d_in=40, hidden=50, n_classes=3, train=False)
    kw = {"proj_params": {"proj_dim_per_layer": 256, "proj_seed": 1}, "verbose": False}
    a = LoGraAttributor(_task(pb.model), **kw)
    b = LoGraAttributor(_task(pb.model), **kw)
    c = LoGraAttributor(_task(pb.model), proj_params={"proj_dim_per_layer": 256, "proj_seed": 2})
    p = a.compressors[0].proj_in  # (16, 41)
    assert p.shape == (16, 41)
    assert torch.equal(p, b.compressors[0].proj_in)
    assert not torch.allclose(p, c.compressors[0].proj_in)
    # N(0, 1/k) entries: E[P^T P] = I
    assert abs(float((p**2).sum(0).mean()) - 1.0) < 0.15
    assert abs(float(p.mean())) < 0.05


def test_logra_not_perfect_square():
    pb = _mlp_problem()
    with pytest.raises(ValueError, match="perfect square"):
        LoGraAttributor(_task(pb.model), proj_params={"proj_dim_per_layer": 10})
    with pytest.raises(ValueError, match="proj_type"):
        LoGraAttributor(_task(pb.model), proj_params={"proj_type": "sjlt"})


# ------------------------------------------------------------------------- FactGraSS


def _factgrass(pb, seed=0, **kw):
    return FactGraSSAttributor(
        _task(pb.model),
        proj_params={"proj_dim_per_layer": 8, "proj_seed": seed},
        blowup_factor=2,
        damping=0.05,
        verbose=False,
        **kw,
    )


def test_factgrass_shapes_formula_and_determinism():
    pb = cached_random_mlp(n_train=24, n_test=6, d_in=7, hidden=12, n_classes=3, train=False)
    att = _factgrass(pb)
    # masks of sqrt(16) = 4 coordinates per side (capped at 3 outputs), SJLT -> 8
    assert att.layer_dims == [8, 8]
    shapes = [(c.proj_out.shape, c.proj_in.shape) for c in att.compressors]
    assert shapes == [((4, 12), (4, 8)), ((3, 3), (4, 13))]
    for comp in att.compressors:
        for p in (comp.proj_in, comp.proj_out):  # random masks: unscaled 0/1 rows
            assert torch.equal(p.sum(1), torch.ones(len(p), dtype=p.dtype))
            assert torch.equal(p.sum(0).max(), torch.tensor(1.0, dtype=p.dtype))
            assert set(p.unique().tolist()) <= {0.0, 1.0}
    # second stage is an SJLT: one +-1 per input coordinate
    sjlt = [
        c.projector(torch.eye(c.proj_out.shape[0] * c.proj_in.shape[0]).double())
        for c in att.compressors
    ]
    for mat in sjlt:
        assert torch.equal((mat != 0).sum(1), torch.ones(len(mat), dtype=torch.long))
        assert set(mat.unique().tolist()) == {-1.0, 0.0, 1.0}
    train, test = _loaders(pb)
    att.cache(train)
    scores = att.attribute(train, test)
    tr = [
        c @ m
        for c, m in zip(_compressed(att, pb.model, pb.x_train, pb.y_train, stage2=False), sjlt)
    ]
    te = [
        c @ m for c, m in zip(_compressed(att, pb.model, pb.x_test, pb.y_test, stage2=False), sjlt)
    ]
    torch.testing.assert_close(scores, _reference_scores(tr, te, "eFIM", 0.05))
    # same seed -> identical, other seed -> different
    again = _factgrass(pb)
    again.cache(train)
    assert torch.equal(again.attribute(train, test), scores)
    other = _factgrass(pb, seed=5)
    other.cache(train)
    assert not torch.allclose(other.attribute(train, test), scores)


def test_factgrass_intermediate_dim_must_be_square():
    pb = _mlp_problem()
    with pytest.raises(ValueError, match=r"intermediate_dim .* must be a perfect square"):
        FactGraSSAttributor(_task(pb.model), proj_params={"proj_dim_per_layer": 8})
    with pytest.raises(ValueError, match="blowup_factor"):
        FactGraSSAttributor(_task(pb.model), blowup_factor=0)


def test_block_projected_generic_two_stage():
    pb = _mlp_problem()
    att = BlockProjectedIFAttributor(
        _task(pb.model),
        hessian="Identity",
        sparsifier_params={"proj_dim": 3, "proj_type": "rademacher", "proj_seed": 1},
        projector_params={"proj_dim": 5, "proj_type": "normal", "proj_seed": 2},
        verbose=False,
    )
    assert att.layer_dims == [5, 5]
    train, test = _loaders(pb)
    att.cache(train)
    tr = _compressed(att, pb.model, pb.x_train, pb.y_train)
    te = _compressed(att, pb.model, pb.x_test, pb.y_test)
    torch.testing.assert_close(att.attribute(train, test), _reference_scores(tr, te, "x", 0))


# ----------------------------------------------------------------- API behaviours


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_offload_modes_identical_and_disk_only_in_cache_dir(offload, tmp_path, monkeypatch):
    """offload="none"/"cpu" keep the rows in (host) memory; "disk" is the memmap store."""
    pb = _mlp_problem()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cache_dir = tmp_path / "cache"
    kw = {"proj_params": {"proj_dim_per_layer": 9}, "damping": 0.05, "verbose": False}
    ref = LoGraAttributor(_task(pb.model), offload="none", chunk_size=1, **kw)
    train, test = _loaders(pb, bs_train=7)  # uneven batches
    ref.cache(train)
    expected = ref.attribute(train, test)
    folder = cache_dir if offload == "disk" else None
    att = LoGraAttributor(_task(pb.model), offload=offload, cache_dir=folder, chunk_size=1, **kw)
    att.cache(train)
    torch.testing.assert_close(att.attribute(train, test), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        att.compute_self_attribution(), torch.diagonal(ref.attribute(train, train))
    )
    assert list(cwd.iterdir()) == []
    rows = att._store.features[0]
    if offload == "disk":
        names = sorted(p.name for p in cache_dir.iterdir())
        assert "manifest.json" in names and "features_0.npy" in names
        stored = np.load(cache_dir / "features_0.npy", mmap_mode="r")
        assert stored.shape == (24, 18) and stored.dtype == np.float64
        assert isinstance(rows, StoredRows)
    else:
        assert not cache_dir.exists()
        assert isinstance(rows, HostRows if offload == "cpu" else torch.Tensor)


def test_disk_requires_cache_dir_and_bad_args():
    pb = _mlp_problem()
    task = _task(pb.model)
    with pytest.raises(ValueError, match="cache_dir"):
        LoGraAttributor(task, offload="disk")
    with pytest.raises(ValueError, match="offload"):
        LoGraAttributor(task, offload="gpu")
    with pytest.raises(ValueError, match="hessian"):
        LoGraAttributor(task, hessian="GGN")
    with pytest.raises(ValueError, match="damping"):
        LoGraAttributor(task, damping=-1.0)
    with pytest.raises(ValueError, match="Valid names"):
        LoGraAttributor(task, layer_names=["1"])  # Tanh
    with pytest.raises(ValueError, match="Wrong loss function format"):
        LoGraAttributor(_task(pb.model, loss=lambda a, b, c, d: a))
    att = LoGraAttributor(task, proj_params=IDENTITY, verbose=False)
    with pytest.raises(ValueError, match="cache"):
        att.compute_self_attribution()


class _DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def test_dict_batches_eager_and_functional_losses_agree():
    pb = _mlp_problem()
    model = pb.model
    kw = {"proj_params": {"proj_dim_per_layer": 9}, "damping": 0.05, "verbose": False}
    train, test = _loaders(pb)
    ref = LoGraAttributor(_task(model), **kw)
    ref.cache(train)
    expected = ref.attribute(train, test)
    # eager upstream-style loss on tuple batches
    eager = LoGraAttributor(_task(model, loss=_eager_loss), **kw)
    eager.cache(train)
    torch.testing.assert_close(eager.attribute(train, test), expected, rtol=1e-10, atol=1e-12)

    # an eager loss whose device argument has a default is still recognised as eager
    def eager_with_default(model_, batch, device="cpu"):
        return _eager_loss(model_, batch, device)

    eager_d = LoGraAttributor(_task(model, loss=eager_with_default), **kw)
    eager_d.cache(train)
    torch.testing.assert_close(eager_d.attribute(train, test), expected, rtol=1e-10, atol=1e-12)

    # dict batches, functional and eager
    def dict_functional(params, batch):
        logits = functional_call(model, params, (batch["inputs"],))
        return F.cross_entropy(logits, batch["labels"])

    def dict_eager(model_, batch, device):
        return F.cross_entropy(model_(batch["inputs"].to(device)), batch["labels"].to(device))

    dtrain = DataLoader(_DictData(pb.x_train, pb.y_train), batch_size=10)
    dtest = DataLoader(_DictData(pb.x_test, pb.y_test), batch_size=4)
    for loss in (dict_functional, dict_eager):
        att = LoGraAttributor(_task(model, loss=loss), **kw)
        att.cache(dtrain)
        torch.testing.assert_close(att.attribute(dtrain, dtest), expected, rtol=1e-10, atol=1e-12)


def test_self_attribution_equals_diagonal_and_no_grad():
    pb = _mlp_problem()
    att = LoGraAttributor(
        _task(pb.model), proj_params={"proj_dim_per_layer": 9}, damping=0.05, verbose=False
    )
    train, _ = _loaders(pb, bs_train=7)
    with torch.no_grad():
        att.cache(train)
        full = att.attribute(train, train)
        diag = torch.diagonal(full)
        torch.testing.assert_close(att.compute_self_attribution(), diag, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(att.self_attribute(train), diag, rtol=1e-10, atol=1e-12)
        # a different loader object: recomputed, same numbers
        other = DataLoader(TensorDataset(pb.x_train, pb.y_train), batch_size=5)
        torch.testing.assert_close(att.self_attribute(other), diag, rtol=1e-10, atol=1e-12)
    assert (diag > 0).all()


def test_other_train_loader_uses_its_rows_and_cached_fisher():
    pb = _mlp_problem()
    att = LoGraAttributor(
        _task(pb.model), proj_params={"proj_dim_per_layer": 9}, damping=0.05, verbose=False
    )
    train, test = _loaders(pb)
    att.cache(train)
    full = att.attribute(train, test)
    subset = DataLoader(TensorDataset(pb.x_train[5:12], pb.y_train[5:12]), batch_size=3)
    torch.testing.assert_close(att.attribute(subset, test), full[5:12], rtol=1e-10, atol=1e-12)
    topk = att.attribute_topk(train, test, k=3)
    assert torch.equal(topk.helpful_indices, full.topk(3, dim=0).indices.T)


def test_attribute_before_cache_warns_and_caches():
    pb = _mlp_problem()
    att = LoGraAttributor(_task(pb.model), proj_params=IDENTITY, hessian="Identity", verbose=False)
    train, test = _loaders(pb)
    with pytest.warns(UserWarning, match="cache"):
        scores = att.attribute(train, test)
    assert scores.shape == (24, 6)
    assert att.full_train_dataloader is train


def test_target_function_used_on_test_side():
    pb = _mlp_problem()
    model = pb.model

    def target(params, data):  # log-probability of the true class (not a CE copy)
        x, y = data
        logits = functional_call(model, params, (x,))
        return logits.log_softmax(-1).gather(1, y[:, None]).sum() * 2.0

    att = LoGraAttributor(
        _task(model, target=target), hessian="Identity", proj_params=IDENTITY, verbose=False
    )
    train, test = _loaders(pb)
    att.cache(train)
    scores = att.attribute(train, test)

    def tgt_one(m, x, y):
        return m(x).log_softmax(-1).gather(1, y[:, None]).sum() * 2.0

    tr = [
        g.reshape(24, -1)
        for g in (_layer_grad_mats(model, n, pb.x_train, pb.y_train) for n in ("0", "2"))
    ]
    te = [
        g.reshape(6, -1)
        for g in (_layer_grad_mats(model, n, pb.x_test, pb.y_test, tgt_one) for n in ("0", "2"))
    ]
    torch.testing.assert_close(scores, _reference_scores(tr, te, "Identity", 0))
    diag = torch.diagonal(att.attribute(train, train))
    torch.testing.assert_close(att.self_attribute(train), diag)


def test_multiple_checkpoints_warns_and_uses_first():
    pb = _mlp_problem()
    sd = {k: v.clone() for k, v in pb.model.state_dict().items()}
    sd2 = {k: v * 2 for k, v in sd.items()}
    model = copy.deepcopy(pb.model)
    with pytest.warns(UserWarning, match="checkpoint 0"):
        att = LoGraAttributor(
            _task(model, checkpoints=[sd, sd2]), proj_params=IDENTITY, verbose=False
        )
    train, test = _loaders(pb)
    att.cache(train)
    ref = LoGraAttributor(_task(model, checkpoints=sd), proj_params=IDENTITY, verbose=False)
    ref.cache(train)
    torch.testing.assert_close(att.attribute(train, test), ref.attribute(train, test))


# ---------------------------------------------------------------- Conv2d / Embedding


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_conv2d_layer_identity_and_compressed():
    torch.manual_seed(0)
    model = _SmallCNN().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(14, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (14,), generator=g)
    train = DataLoader(TensorDataset(x[:10], y[:10]), batch_size=4)
    test = DataLoader(TensorDataset(x[10:], y[10:]), batch_size=4)
    task = _task(model)
    exact = LoGraAttributor(
        task, layer_names="conv", hessian="Identity", proj_params=IDENTITY, verbose=False
    )
    exact.cache(train)
    gtr = _layer_grad_mats(model, "conv", x[:10], y[:10])  # (n, 3, 2*3*3 + 1)
    gte = _layer_grad_mats(model, "conv", x[10:], y[10:])
    assert exact.layer_dims == [3 * 19]
    ref = gtr.reshape(10, -1) @ gte.reshape(4, -1).T
    torch.testing.assert_close(exact.attribute(train, test), ref, rtol=1e-10, atol=1e-12)
    att = LoGraAttributor(
        task,
        layer_names=["conv", "fc"],
        proj_params={"proj_dim_per_layer": 4},
        damping=0.1,
        verbose=False,
    )
    att.cache(train)
    tr = _compressed(att, model, x[:10], y[:10])
    te = _compressed(att, model, x[10:], y[10:])
    torch.testing.assert_close(
        att.attribute(train, test), _reference_scores(tr, te, "eFIM", 0.1), rtol=1e-7, atol=1e-9
    )


def test_embedding_layer_identity_equals_grad_dot():
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3, padding_idx=0).double()
            self.head = nn.Linear(3, 2).double()

        def forward(self, tok):
            return self.head(self.emb(tok).mean(1))

    model = Bag().eval()
    g = torch.Generator().manual_seed(2)
    tok = torch.randint(0, 7, (9, 4), generator=g)
    y = torch.randint(0, 2, (9,), generator=g)
    train = DataLoader(TensorDataset(tok[:6], y[:6]), batch_size=4)
    test = DataLoader(TensorDataset(tok[6:], y[6:]), batch_size=4)
    att = LoGraAttributor(
        _task(model), layer_names=["emb"], hessian="Identity", proj_params=IDENTITY, verbose=False
    )
    att.cache(train)
    gtr = _layer_grad_mats(model, "emb", tok[:6], y[:6])
    gte = _layer_grad_mats(model, "emb", tok[6:], y[6:])
    ref = gtr.reshape(6, -1) @ gte.reshape(3, -1).T
    torch.testing.assert_close(att.attribute(train, test), ref, rtol=1e-10, atol=1e-12)


def test_stable_inverse_relative_damping_and_fallback():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    fisher = a @ a.T  # rank 3
    inv = stable_inverse(fisher, 0.2)
    ref = torch.linalg.inv(fisher + 0.2 * torch.trace(fisher) / 5 * torch.eye(5, dtype=a.dtype))
    torch.testing.assert_close(inv, ref)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pinv = stable_inverse(fisher, 0.0)
    assert any("pseudo-inverse" in str(w.message) for w in rec)
    torch.testing.assert_close(pinv, torch.linalg.pinv(fisher), rtol=1e-6, atol=1e-8)
    # damping relative to the mean of the eigenvalues over a given rank
    inv3 = stable_inverse(fisher, 0.5, rank=3)
    ref3 = torch.linalg.inv(fisher + 0.5 * torch.trace(fisher) / 3 * torch.eye(5, dtype=a.dtype))
    torch.testing.assert_close(inv3, ref3)
    with pytest.raises(ValueError, match="rank"):
        stable_inverse(fisher, 0.5, rank=0)


def test_auto_damping_uses_attainable_rank_of_the_compression():
    """Default damping = mean eigenvalue over min(k, n, rank of the factor map).

    LoGra with 4x4 factors on layer "2" (d_out=3, d_in'=7): the compressed Fisher is
    16x16 but its rank is at most min(4, 3) * min(4, 7) = 12; layer "0" (6 x 6)
    has rank <= min(4, 6) * min(4, 6) = 16 = k.
    """
    pb = _mlp_problem()
    att = LoGraAttributor(_task(pb.model), proj_params={"proj_dim_per_layer": 16}, verbose=False)
    train, test = _loaders(pb)
    att.cache(train)
    assert att._attainable_ranks(24) == [16, 12]
    assert att._attainable_ranks(10) == [10, 10]
    tr = _compressed(att, pb.model, pb.x_train, pb.y_train)
    te = _compressed(att, pb.model, pb.x_test, pb.y_test)
    ref = _reference_scores(tr, te, "eFIM", 1.0, [16, 12])
    torch.testing.assert_close(att.attribute(train, test), ref, rtol=1e-6, atol=1e-9)
    # an explicit damping keeps upstream's meaning (trace / k)
    att.compute_preconditioners(damping=1.0)
    torch.testing.assert_close(
        att.attribute(train, test), _reference_scores(tr, te, "eFIM", 1.0), rtol=1e-6, atol=1e-9
    )


def test_cache_dir_of_other_settings_is_refused(tmp_path):
    """One store format: a cache_dir written for other layers is refused, not reused."""
    pb = _mlp_problem()
    train, test = _loaders(pb)

    def make(layers, folder):
        return LoGraAttributor(
            _task(pb.model),
            layer_names=layers,
            offload="disk",
            cache_dir=folder,
            proj_params=IDENTITY,
            verbose=False,
        )

    make(["0"], tmp_path / "a").cache(train)
    with pytest.raises(ValueError, match="other settings"):
        make(["2"], tmp_path / "a").cache(train)
    b = make(["2"], tmp_path / "b")
    b.cache(train)
    assert b.layer_dims == [21]
    assert b.attribute(train, test).shape == (24, 6)
    assert (tmp_path / "b" / "manifest.json").exists()


def test_default_and_object_params():
    from dattri.params.projection import FactGrassProjectionParams, LoGraProjectionParams

    pb = _mlp_problem()
    task = _task(pb.model)
    assert LoGraAttributor(task, verbose=False).layer_dims == [4096, 4096]
    fg = FactGraSSAttributor(task, verbose=False)
    assert fg.layer_dims == [4096, 4096]
    assert fg.compressors[0].proj_in.shape == (6, 6)  # mask of 128 capped at d_in + 1
    train, test = _loaders(pb)
    by_obj = LoGraAttributor(
        task, proj_params=LoGraProjectionParams(proj_dim_per_layer=4, proj_seed=7), verbose=False
    )
    by_dict = LoGraAttributor(
        task, proj_params={"proj_dim_per_layer": 4, "proj_seed": 7}, verbose=False
    )
    for att in (by_obj, by_dict):
        att.cache(train)
    torch.testing.assert_close(by_obj.attribute(train, test), by_dict.attribute(train, test))
    fg_obj = FactGraSSAttributor(
        task,
        proj_params=FactGrassProjectionParams(proj_dim_per_layer=8, proj_seed=2),
        blowup_factor=2,
        verbose=False,
    )
    assert fg_obj.layer_dims == [8, 8]


def test_loss_with_parameter_penalty_is_rejected_clearly():
    pb = _mlp_problem()
    att = LoGraAttributor(_task(pb.model, loss=pb.loss_if), proj_params=IDENTITY, verbose=False)
    with pytest.raises(ValueError, match="outside"):
        att.cache(pb.train_loader(10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with -m gpu on a GPU)")
@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_cuda_matches_cpu(offload, tmp_path):
    pb = _mlp_problem()
    train, test = _loaders(pb, bs_train=7)
    out = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(pb.model)
        for cls, kw in (
            (LoGraAttributor, {"proj_params": {"proj_dim_per_layer": 9}}),
            (FactGraSSAttributor, {"proj_params": {"proj_dim_per_layer": 8}, "blowup_factor": 2}),
        ):
            att = cls(
                _task(model, loss=_eager_loss),
                device=device,
                damping=0.05,
                offload=offload,
                cache_dir=tmp_path / device / cls.__name__ if offload == "disk" else None,
                verbose=False,
                **kw,
            )
            att.cache(train)
            scores = att.attribute(train, test)
            assert scores.device.type == device
            self_inf = att.self_attribute(train)
            out[device, cls.__name__] = (scores.cpu(), self_inf.cpu())
    for name in ("LoGraAttributor", "FactGraSSAttributor"):
        for a, b in zip(out["cpu", name], out["cuda", name]):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
