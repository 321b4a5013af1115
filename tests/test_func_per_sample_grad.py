"""Tests for dattri.func.per_sample_grad against brute-force autograd loops."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dattri.func.batch_utils import NonFiniteGradientError
from dattri.func.per_sample_grad import (
    grad_routes,
    per_sample_grad,
    per_sample_grad_dict,
    per_sample_kron_projected,
    per_sample_layer_factors,
)

DT = torch.float64
# A demotion of hook layers to vmap must never happen silently in these tests.
pytestmark = [
    pytest.mark.filterwarnings("error:Layer-hook"),
    pytest.mark.filterwarnings("ignore:Using padding='same'"),
]
RTOL = 1e-5


def _slice(data, b, keep):
    sl = (lambda t: t[b : b + 1]) if keep else (lambda t: t[b])
    if isinstance(data, torch.Tensor):
        return sl(data)
    if isinstance(data, dict):
        return {k: sl(v) for k, v in data.items()}
    return type(data)(sl(t) for t in data)


def ref_grads(loss_func, params, data, names, keep, n):
    """Per-sample gradients by a Python loop of torch.autograd.grad."""
    rows = []
    for b in range(n):
        p = {k: v.detach().clone().requires_grad_(k in names) for k, v in params.items()}
        loss = loss_func(p, _slice(data, b, keep))
        gs = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p[k])).reshape(-1)
                    for g, k in zip(gs, names, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def assert_close(a, b, rtol=RTOL):
    assert a.shape == b.shape
    err = (a - b).norm() / b.norm().clamp_min(1e-30)
    assert err < rtol, f"relative error {err:.3e}"


def make_loss(model, keep, kind="ce"):
    def loss(p, sample):
        x, y = sample
        if not keep:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        out = functional_call(model, p, (x,))
        if kind == "seq":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    return loss


def params_of(model):
    return {k: v.detach() for k, v in model.named_parameters()}


# ------------------------------------------------------------------ models


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)
    ).to(DT)


def mlp_data(n=7):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(
            4, 6, 3, stride=2, groups=2, dilation=1, padding_mode="reflect", padding=1
        )
        self.c3 = nn.Conv2d(6, 4, (2, 3), padding="same", dilation=(1, 2), bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(-1, -2)))


def cnn():
    torch.manual_seed(0)
    m = SmallCNN().to(DT)
    with torch.no_grad():  # non-trivial running stats
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def cnn_data(n=5):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 7, 7, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


class SeqModel(nn.Module):
    """Embedding + positions + LayerNorm + shared Linear applied twice."""

    def __init__(self, vocab=11, d=6, t=5):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(t, d)
        self.ln = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        t = ids.shape[-1]
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        h = self.ln(h)
        h = h + torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.head(h)


def seq():
    torch.manual_seed(0)
    return SeqModel().to(DT)


def seq_data(n=4):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (n, 5), generator=g)
    ids[0, :2] = 0  # padding tokens
    return ids, torch.randint(0, 11, (n, 5), generator=g)


CASES = {
    "mlp": (mlp, mlp_data, "ce"),
    "cnn": (cnn, cnn_data, "ce"),
    "seq": (seq, seq_data, "seq"),
}


# ------------------------------------------------------------------ routes


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("route", ["vmap", "auto"])
def test_matches_autograd_loop(case, keep, route):
    make_model, make_data, kind = CASES[case]
    model = make_model()
    data = make_data()
    params = params_of(model)
    loss = make_loss(model, keep, kind)
    n = data[0].shape[0]
    ref = ref_grads(loss, params, data, list(params), keep, n)
    got = per_sample_grad(model, loss, params, data, keep_batch_dim=keep, route=route)
    assert got.dtype == DT
    assert_close(got, ref)


@pytest.mark.parametrize("case", list(CASES))
def test_hook_route_on_supported_params(case):
    make_model, make_data, kind = CASES[case]
    model = make_model()
    data = make_data()
    params = params_of(model)
    routes = grad_routes(model, list(params))
    names = [k for k, r in routes.items() if r == "hook"]
    loss = make_loss(model, False, kind)
    ref = ref_grads(loss, params, data, names, False, data[0].shape[0])
    got = per_sample_grad(model, loss, params, data, param_names=names, route="hook")
    assert_close(got, ref)


def test_grad_routes_cnn_batchnorm_is_vmap():
    routes = grad_routes(cnn())
    assert routes["bn.weight"] == "vmap"
    assert routes["bn.bias"] == "vmap"
    assert {k for k, r in routes.items() if r == "hook"} == {
        "c1.weight",
        "c1.bias",
        "c2.weight",
        "c2.bias",
        "c3.weight",
        "fc.weight",
        "fc.bias",
    }


def test_grad_routes_edge_cases():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.capped = nn.Embedding(5, 3, max_norm=1.0)
            self.sub = SubLinear(3, 2)  # subclass: forward may differ
            self.scale = nn.Parameter(torch.ones(2))

    class SubLinear(nn.Linear):
        pass

    routes = grad_routes(Odd(), ["capped.weight", "sub.weight", "scale", "not.in.model"])
    assert set(routes.values()) == {"vmap"}
    with pytest.raises(TypeError, match="wrap it"):
        grad_routes(Odd(), "scale")


def test_hook_route_rejects_unsupported_param():
    model = cnn()
    params = params_of(model)
    with pytest.raises(ValueError, match=r"bn\.weight.*route='auto'"):
        per_sample_grad(model, make_loss(model, False), params, cnn_data(), route="hook")


def test_param_subset_order_and_fixed_params():
    model = cnn()
    data = cnn_data()
    params = params_of(model)
    names = ["fc.bias", "bn.weight", "c2.weight"]  # mixed routes, custom order
    loss = make_loss(model, True)
    ref = ref_grads(loss, params, data, names, True, 5)
    for route in ("auto", "vmap"):
        got = per_sample_grad(model, loss, params, data, names, keep_batch_dim=True, route=route)
        assert_close(got, ref)
    d = per_sample_grad_dict(model, loss, params, data, names, keep_batch_dim=True)
    assert list(d) == names
    assert d["c2.weight"].shape == (5, *params["c2.weight"].shape)
    flat = torch.cat([d[k].reshape(5, -1) for k in names], 1)
    assert_close(flat, ref)


@pytest.mark.parametrize("route", ["vmap", "auto"])
def test_chunking_identical(route):
    model = seq()
    data = seq_data(7)
    params = params_of(model)
    loss = make_loss(model, False, "seq")
    full = per_sample_grad(model, loss, params, data, route=route)
    for cs in (1, 3, 100):
        part = per_sample_grad(model, loss, params, data, route=route, chunk_size=cs)
        torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-12)


def test_seq_routes_and_module_reuse():
    routes = grad_routes(seq())
    assert set(routes.values()) == {"hook"}


def test_float32_and_dict_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    params = params_of(model)
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(5, 4, generator=g), "y": torch.randn(5, 2, generator=g)}

    def loss(p, s):
        return ((functional_call(model, p, (s["x"],)) - s["y"]) ** 2).sum()

    ref = ref_grads(loss, params, data, list(params), False, 5)
    for route in ("vmap", "hook"):
        got = per_sample_grad(model, loss, params, data, route=route)
        assert got.dtype == torch.float32
        assert_close(got, ref, rtol=1e-5)


def test_works_under_no_grad():
    model = mlp()
    data = mlp_data()
    params = params_of(model)
    loss = make_loss(model, False)
    ref = ref_grads(loss, params, data, list(params), False, 7)
    with torch.no_grad():
        for route in ("vmap", "hook"):
            assert_close(per_sample_grad(model, loss, params, data, route=route), ref)


def test_tied_weights_go_to_vmap():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids)))

    model = Tied().to(DT)
    params = params_of(model)
    assert grad_routes(model, list(params)) == {"emb.weight": "vmap"}
    data = seq_data()
    data = (data[0] % 7, data[1] % 7)
    loss = make_loss(model, False, "seq")
    ref = ref_grads(loss, params, data, list(params), False, 4)
    assert_close(per_sample_grad(model, loss, params, data), ref)


def test_penalty_in_loss_demotes_auto_and_rejects_hook():
    model = mlp()
    data = mlp_data()
    params = params_of(model)
    base = make_loss(model, False)

    def loss(p, s):
        return base(p, s) + 0.3 * (p["4.weight"] ** 2).sum()

    ref = ref_grads(loss, params, data, list(params), False, 7)
    with pytest.warns(UserWarning, match=r"4\.weight"):
        got = per_sample_grad(model, loss, params, data)
    assert_close(got, ref)
    with pytest.raises(ValueError, match="disagree with autograd"):
        per_sample_grad(model, loss, params, data, route="hook")


def test_dropout_deterministic_given_seed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2)).to(DT).train()
    params = params_of(model)
    data = (torch.randn(6, 4, dtype=DT), torch.randint(0, 2, (6,)))
    loss = make_loss(model, False)
    for route in ("vmap", "hook"):
        torch.manual_seed(5)
        a = per_sample_grad(model, loss, params, data, route=route)
        torch.manual_seed(5)
        b = per_sample_grad(model, loss, params, data, route=route)
        assert torch.equal(a, b)


# ------------------------------------------------------------ kron / factors


def _explicit_matrix_grads(model, loss, params, data, layer, n, with_bias):
    names = [f"{layer}.weight"] + ([f"{layer}.bias"] if with_bias else [])
    g = ref_grads(loss, params, data, names, False, n)
    w = params[f"{layer}.weight"]
    gw = g[:, : w.numel()].reshape(n, w.shape[0], -1)
    if with_bias:
        gw = torch.cat([gw, g[:, w.numel() :].unsqueeze(-1)], dim=-1)
    return gw.reshape(n, -1)


@pytest.mark.parametrize(
    ("case", "layer", "with_bias"),
    [
        ("mlp", "0", True),
        ("mlp", "0", False),
        ("mlp", "2", False),
        ("cnn", "c1", True),
        ("cnn", "c2", True),  # grouped, strided, reflect padding
        ("cnn", "c3", False),  # asymmetric 'same' padding, dilation
        ("seq", "tok", False),  # padding_idx
        ("seq", "pos", False),  # input not depending on the sample
        ("seq", "mix", True),  # called twice per sample, sequence input
    ],
)
def test_kron_projection_equals_explicit(case, layer, with_bias):
    make_model, make_data, kind = CASES[case]
    model = make_model()
    data = make_data()
    params = params_of(model)
    loss = make_loss(model, False, kind)
    n = data[0].shape[0]
    g = torch.Generator().manual_seed(4)
    gm = _explicit_matrix_grads(model, loss, params, data, layer, n, with_bias)
    w = params[f"{layer}.weight"]
    d_out = w.shape[0]
    d_in = gm.shape[1] // d_out
    p_in = torch.randn(3, d_in, generator=g, dtype=DT)
    p_out = torch.randn(2, d_out, generator=g, dtype=DT)
    want = gm @ torch.kron(p_out, p_in).T
    got = per_sample_kron_projected(
        model, loss, params, data, [layer], {layer: p_in}, {layer: p_out}
    )[layer]
    assert got.shape == (n, 6)
    assert_close(got, want)
    got2 = per_sample_kron_projected(
        model, loss, params, data, [layer], {layer: p_in}, {layer: p_out}, chunk_size=2
    )[layer]
    torch.testing.assert_close(got2, got, rtol=1e-12, atol=1e-12)


def test_kron_keep_batch_dim_and_shape_errors():
    model = mlp()
    data = mlp_data()
    params = params_of(model)
    loss = make_loss(model, True)
    p_in = torch.randn(4, 7, dtype=DT)
    p_out = torch.randn(3, 8, dtype=DT)
    got = per_sample_kron_projected(
        model, loss, params, data, ["0"], {"0": p_in}, {"0": p_out}, keep_batch_dim=True
    )["0"]
    gm = _explicit_matrix_grads(model, make_loss(model, False), params, data, "0", 7, True)
    assert_close(got, gm @ torch.kron(p_out, p_in).T)
    with pytest.raises(ValueError, match=r"proj_in has shape \(4, 5\)"):
        per_sample_kron_projected(
            model, loss, params, data, ["0"], {"0": p_in[:, :5]}, {"0": p_out}
        )
    with pytest.raises(ValueError, match="proj_out"):
        per_sample_kron_projected(
            model, loss, params, data, ["0"], {"0": p_in}, {"0": p_out[:, :3]}
        )
    with pytest.raises(ValueError, match="missing '0'"):
        per_sample_kron_projected(model, loss, params, data, ["0"], {}, {"0": p_out})
    with pytest.raises(ValueError, match="not supported layers"):
        per_sample_kron_projected(model, loss, params, data, ["1"], {"1": p_in}, {"1": p_out})
    with pytest.raises(TypeError, match="proj_in must be a dict"):
        per_sample_kron_projected(model, loss, params, data, ["0"], p_in, {"0": p_out})


@pytest.mark.parametrize("case", ["mlp", "cnn", "seq"])
def test_layer_factors_reconstruct_grads(case):
    make_model, make_data, kind = CASES[case]
    model = make_model()
    data = make_data()
    params = params_of(model)
    loss = make_loss(model, False, kind)
    n = data[0].shape[0]
    layers = {"mlp": ["0", "2"], "cnn": ["c1", "c3", "fc"], "seq": ["tok", "ln", "mix"]}[case]
    fac = per_sample_layer_factors(model, loss, params, data, layers, chunk_size=3)
    for layer in layers:
        a, s = fac[layer]
        mod = model.get_submodule(layer)
        if isinstance(mod, nn.Embedding):
            got = torch.einsum("btv,btd->bvd", F.one_hot(a, mod.num_embeddings).to(DT), s)
            names = [f"{layer}.weight"]
        elif isinstance(mod, nn.LayerNorm):
            got = torch.cat([(a * s).sum(1), s.sum(1)], 1)
            names = [f"{layer}.weight", f"{layer}.bias"]
        else:
            has_b = mod.bias is not None
            got = torch.einsum("bto,bti->boi", s, a)
            ref = _explicit_matrix_grads(model, loss, params, data, layer, n, has_b)
            assert_close(got.reshape(n, -1), ref)
            continue
        ref = ref_grads(loss, params, data, names, False, n)
        assert_close(got.reshape(n, -1), ref)


def test_layer_factors_grouped_conv_not_implemented():
    model = cnn()
    with pytest.raises(NotImplementedError, match="grouped"):
        per_sample_layer_factors(
            model, make_loss(model, False), params_of(model), cnn_data(), ["c2"]
        )


# ------------------------------------------------------------------ errors


def test_error_messages():
    model = mlp()
    data = mlp_data()
    params = params_of(model)
    loss = make_loss(model, False)
    with pytest.raises(ValueError, match=r"Unknown parameter.*valid names are: 0\.weight"):
        per_sample_grad(model, loss, params, data, ["nope"])
    with pytest.raises(TypeError, match="wrap it"):
        per_sample_grad(model, loss, params, data, "0.weight")
    with pytest.raises(ValueError, match="route must be one of"):
        per_sample_grad(model, loss, params, data, route="fast")
    with pytest.raises(ValueError, match="empty batch"):
        per_sample_grad(model, loss, params, (data[0][:0], data[1][:0]))
    with pytest.raises(ValueError, match="share the batch dimension"):
        per_sample_grad(model, loss, params, (data[0], data[1][:3]))
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grad(model, loss, params, data, chunk_size=0)


@pytest.mark.parametrize("route", ["vmap", "hook"])
def test_non_scalar_loss(route):
    model = mlp()
    params = params_of(model)

    def loss(p, s):
        return F.cross_entropy(functional_call(model, p, (s[0],)), s[1], reduction="none")

    def loss2(p, s):
        return functional_call(model, p, (s[0],))

    # a single-element loss of shape (1,) is accepted
    ref = ref_grads(loss, params, mlp_data(), list(params), True, 7)
    assert_close(
        per_sample_grad(model, loss, params, mlp_data(), keep_batch_dim=True, route=route), ref
    )

    with pytest.raises(ValueError, match="scalar per sample"):
        per_sample_grad(model, loss2, params, mlp_data(), keep_batch_dim=True, route=route)


@pytest.mark.parametrize("route", ["vmap", "hook"])
def test_nonfinite_gradients_name_samples(route):
    model = mlp()
    params = params_of(model)
    x, y = mlp_data()
    x = x.clone()
    x[2, 0] = float("nan")
    x[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"indices \[2, 5\]"):
        per_sample_grad(model, make_loss(model, False), params, (x, y), route=route)
    p_in, p_out = torch.randn(2, 7, dtype=DT), torch.randn(2, 8, dtype=DT)
    with pytest.raises(ValueError, match=r"indices \[2, 5\]"):
        per_sample_kron_projected(
            model, make_loss(model, False), params, (x, y), ["0"], {"0": p_in}, {"0": p_out}
        )


@pytest.mark.parametrize("route", ["vmap", "hook"])
def test_out_buffer_is_fully_written_and_checked(route):
    model = mlp()
    params = params_of(model)
    data = mlp_data()
    loss = make_loss(model, False)
    ref = per_sample_grad(model, loss, params, data, route=route)
    # a reused buffer full of NaN: every entry must be overwritten (else NaN leaks)
    buf = torch.full_like(ref, float("nan"))
    got = per_sample_grad(model, loss, params, data, route=route, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    n, p = ref.shape
    for bad in (
        torch.empty(n + 1, p, dtype=DT),
        torch.empty(n, p, dtype=torch.float32),
        torch.empty(p, n, dtype=DT).T,
    ):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            per_sample_grad(model, loss, params, data, route=route, out=bad)


def test_nonfinite_error_carries_indices():
    model = mlp()
    params = params_of(model)
    x, y = mlp_data()
    x = x.clone()
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError) as info:
        per_sample_grad(model, make_loss(model, False), params, (x, y))
    assert info.value.indices == [1]
    assert isinstance(info.value, ValueError)


def test_hooks_removed_on_error():
    model = mlp()
    params = params_of(model)

    calls = []

    def loss(p, s):
        out = functional_call(model, p, (s[0],))
        calls.append(1)
        if len(calls) > 1:  # probe succeeds, main (vmapped) pass fails
            raise RuntimeError("boom")
        return out.sum()

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grad(model, loss, params, mlp_data(), keep_batch_dim=True, route="hook")
    assert all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------ CUDA


def _to(data, device):
    return tuple(t.to(device) for t in data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_routes_match_cpu_reference():
    dev = torch.device("cuda")
    for case, (make_model, make_data, kind) in CASES.items():
        model = make_model()
        data = make_data()
        params = params_of(model)
        ref = ref_grads(
            make_loss(model, False, kind), params, data, list(params), False, len(data[0])
        )
        model = model.to(dev)
        params_d = params_of(model)
        loss_d = make_loss(model, False, kind)
        for route in ("vmap", "auto"):
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="Layer-hook")
                got = per_sample_grad(
                    model, loss_d, params_d, _to(data, dev), route=route, chunk_size=3
                )
            assert got.device.type == "cuda", case
            assert_close(got.cpu(), ref)
        layer = {"mlp": "0", "cnn": "c2", "seq": "mix"}[case]
        w = params[f"{layer}.weight"]
        p_in = torch.randn(3, w[0].numel() + 1, dtype=DT)
        p_out = torch.randn(2, w.shape[0], dtype=DT)
        want = per_sample_kron_projected(
            model.cpu(),
            make_loss(model, False, kind),
            params_of(model),
            data,
            [layer],
            {layer: p_in},
            {layer: p_out},
        )[layer]
        model = model.to(dev)
        got = per_sample_kron_projected(
            model,
            make_loss(model, False, kind),
            params_of(model),
            _to(data, dev),
            [layer],
            {layer: p_in.to(dev)},
            {layer: p_out.to(dev)},
        )[layer]
        assert_close(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_cnn_hook_agrees_with_vmap():
    dev = torch.device("cuda")
    model = cnn().float().to(dev)
    params = params_of(model)
    x, y = cnn_data(16)
    data = (x.float().to(dev), y.to(dev))
    loss = make_loss(model, True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Layer-hook")
        a = per_sample_grad(model, loss, params, data, keep_batch_dim=True, route="auto")
    b = per_sample_grad(model, loss, params, data, keep_batch_dim=True, route="vmap")
    assert_close(a, b, rtol=1e-3)


def test_probe_cache_reuses_only_same_objects(monkeypatch):
    import dattri.func.grad_capture as gc

    count = []
    orig = gc._probe

    def spy(*args, **kwargs):
        count.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(gc, "_probe", spy)
    model = mlp()
    data = mlp_data()
    params = params_of(model)
    loss = make_loss(model, False)
    a = per_sample_grad(model, loss, params, data, route="hook")
    b = per_sample_grad(model, loss, params, (data[0][:3], data[1][:3]), route="hook")
    assert len(count) == 1
    torch.testing.assert_close(a[:3], b, rtol=1e-12, atol=1e-14)
    base = make_loss(model, False)

    def penalised(p, s):
        return base(p, s) + (p["0.bias"] ** 2).sum()

    with pytest.warns(UserWarning, match=r"0\.bias"):
        per_sample_grad(model, penalised, params, data)
    assert len(count) == 2
    per_sample_grad(model, make_loss(model, True), params, data, keep_batch_dim=True)
    assert len(count) == 3
