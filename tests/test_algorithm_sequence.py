"""Every attributor that applies to a sequence model, on token batches (float64).

* a tiny GPT of ours (``(x, y)`` token batches): the iHVP solvers (CG, LiSSA, full-rank
  Arnoldi) agree with the explicit Hessian solve; Grad-Dot/TracIn equal per-sample
  autograd inner products; TRAK, DataInf, EK-FAC (attention and MLP Linears), LoGra,
  FactGraSS and DVEmb run and give finite scores;
* a tiny config-built GPT-2 (``transformers``, dict batches): EK-FAC, LoGra and DVEmb on
  its ``Conv1D`` projections equal the same methods on the model with each ``Conv1D``
  replaced by the equivalent ``nn.Linear``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.algorithm.factgrass import FactGraSSAttributor
from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri.algorithm.logra import LoGraAttributor
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.benchmark.models.gpt import GPT, GPTConfig
from dattri.params.projection import TracInProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask

VOCAB, T, N_TRAIN, N_TEST = 7, 4, 10, 3


def _gpt() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=VOCAB, block_size=T, n_layer=1, n_head=1, n_embd=4, tie_weights=False
    )
    model = GPT(cfg).double().eval()
    with torch.no_grad():  # larger weights than GPT init: a less degenerate Hessian
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N_TRAIN + N_TEST, T + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    test = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    return train, test


def _loaders(bs=4):
    train, test = _data()
    return DataLoader(train, batch_size=bs), DataLoader(test, batch_size=2)


def _loss_batched(model):
    """IF convention: ``(B, T)`` token batch -> mean next-token loss."""

    def loss(params, data):
        x, y = data
        return functional_call(model, params, (x, y))[1]

    return loss


def _loss_sample(model):
    """TracIn/TRAK convention: one un-batched ``(T,)`` sequence -> its mean token loss."""

    def loss(params, data):
        x, y = data
        return functional_call(model, params, (x, y))[1]

    return loss


def _eager_loss(model, batch, device):
    x, y = batch
    return model(x.to(device), y.to(device))[1]


def _flat_hessian_and_grads(model):
    """Explicit reference: Hessian of the mean training loss and per-sample gradients."""
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    train, test = _data()

    def unflat(v):
        return {n: t.reshape(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}

    def mean_loss(v):
        return functional_call(model, unflat(v), train.tensors)[1]

    hess = torch.autograd.functional.hessian(mean_loss, theta)

    def grads(ds):
        rows = []
        for x, y in zip(*ds.tensors, strict=True):
            v = theta.clone().requires_grad_()
            (g,) = torch.autograd.grad(functional_call(model, unflat(v), (x, y))[1], v)
            rows.append(g)
        return torch.stack(rows)

    return hess, grads(train), grads(test)


@pytest.fixture(scope="module")
def reference():
    model = _gpt()
    hess, g_tr, g_te = _flat_hessian_and_grads(model)
    lam_min = float(torch.linalg.eigvalsh(hess)[0])
    reg = 0.05 + max(0.0, -lam_min)  # H + reg I positive definite (H is indefinite)
    ref = g_tr @ torch.linalg.solve(hess + reg * torch.eye(len(hess), dtype=hess.dtype), g_te.T)
    return {"reg": reg, "ref": ref, "g_tr": g_tr, "g_te": g_te, "hess": hess}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _task(model, loss, **kw):
    return AttributionTask(loss_func=loss(model), model=model, checkpoints=model.state_dict(), **kw)


# ------------------------------------------------------------------ IF solvers
def test_explicit_if_equals_hessian_solve(reference):
    model = _gpt()
    train, test = _loaders()
    a = IFAttributorExplicit(
        _task(model, _loss_batched), regularization=reference["reg"], verbose=False
    )
    a.cache(train)
    scores = a.attribute(train, test)
    assert _rel(scores, reference["ref"]) < 1e-8


def test_cg_equals_hessian_solve(reference):
    model = _gpt()
    train, test = _loaders()
    a = IFAttributorCG(
        _task(model, _loss_batched),
        regularization=reference["reg"],
        max_iter=500,
        tol=1e-12,
        verbose=False,
    )
    a.cache(train)
    assert _rel(a.attribute(train, test), reference["ref"]) < 1e-6


def test_lissa_equals_hessian_solve(reference):
    model = _gpt()
    train, test = _loaders(bs=N_TRAIN)
    # a larger shift than the other solvers: LiSSA contracts by 1 - lambda_min / scale
    # per step, so a condition number ~4 converges to 1e-9 in 250 steps
    hess, eye = reference["hess"], torch.eye(len(reference["hess"]), dtype=torch.float64)
    reg = 0.3 * float(torch.linalg.eigvalsh(hess)[-1]) + reference["reg"]
    ref = reference["g_tr"] @ torch.linalg.solve(hess + reg * eye, reference["g_te"].T)
    a = IFAttributorLiSSA(
        _task(model, _loss_batched),
        batch_size=N_TRAIN,  # full batches: the recursion is deterministic
        recursion_depth=250,
        scaling="auto",
        regularization=reg,
        verbose=False,
    )
    a.cache(train)
    assert _rel(a.attribute(train, test), ref) < 1e-6


def test_arnoldi_full_rank_equals_hessian_solve(reference):
    model = _gpt()
    p = reference["hess"].shape[0]
    train, test = _loaders()
    a = IFAttributorArnoldi(
        _task(model, _loss_batched),
        regularization=reference["reg"],
        proj_dim=p,
        max_iter=p,
        tol=0.0,
        verbose=False,
    )
    a.cache(train)
    assert _rel(a.attribute(train, test), reference["ref"]) < 1e-6


# ------------------------------------------------------------ gradient methods
@pytest.mark.parametrize("normalized", [False, True], ids=["grad-dot", "grad-cos"])
def test_grad_dot_and_cos_equal_autograd(reference, normalized):
    model = _gpt()
    train, test = _loaders()
    a = TracInAttributor(
        _task(model, _loss_sample),
        weight_list=[1.0],
        normalized_grad=normalized,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=1),
        verbose=False,
    )
    a.cache(train)
    g_tr, g_te = reference["g_tr"], reference["g_te"]
    if normalized:
        g_tr = g_tr / g_tr.norm(dim=1, keepdim=True)
        g_te = g_te / g_te.norm(dim=1, keepdim=True)
    torch.testing.assert_close(a.attribute(train, test).double(), g_tr @ g_te.T)


def _margin(model):
    """TRAK output of a sequence: mean over tokens of ``log p_t - log(1 - p_t)``."""

    def f(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))[0]
        logp = -F.cross_entropy(logits, y, reduction="none")
        return (logp - torch.log(-torch.expm1(logp))).mean()

    return f


def _prob(model):
    def f(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))[0]
        return (-F.cross_entropy(logits, y, reduction="none")).exp().mean()

    return f


def test_trak_on_token_batches_matches_its_formula():
    model = _gpt()
    train, test = _loaders()
    sd = model.state_dict()
    task = AttributionTask(loss_func=_margin(model), model=model, checkpoints=sd)
    a = TRAKAttributor(
        task,
        correct_probability_func=_prob(model),
        proj_params=TRAKProjectionParams(proj_type="identity", proj_dim=1),
        regularization=0.1,
        verbose=False,
    )
    a.cache(train)
    scores = a.attribute(test)
    # TRAK, identity projection: Phi (Phi^T Phi + reg I)^-1 phi_te^T (1 - p), Phi = G / sqrt(p)
    phi_tr, phi_te, q = [], [], []
    for ds, rows in ((train.dataset, phi_tr), (test.dataset, phi_te)):
        for x, y in zip(*ds.tensors, strict=True):
            params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
            g = torch.autograd.grad(_margin(model)(params, (x, y)), list(params.values()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
            if rows is phi_tr:
                q.append(1 - _prob(model)(params, (x, y)).detach())
    phi_tr, phi_te, q = torch.stack(phi_tr), torch.stack(phi_te), torch.stack(q)
    scale = phi_tr.shape[1] ** -0.5  # TRAK scales gradients by 1 / sqrt(p)
    phi_tr, phi_te = phi_tr * scale, phi_te * scale
    kernel = phi_tr.T @ phi_tr + 0.1 * torch.eye(phi_tr.shape[1], dtype=phi_tr.dtype)
    ref = (phi_tr @ torch.linalg.solve(kernel, phi_te.T)) * q.unsqueeze(1)
    assert scores.shape == (N_TRAIN, N_TEST)
    assert _rel(scores.double(), ref) < 1e-6


def test_datainf_on_token_batches_matches_layerwise_formula(reference):
    model = _gpt()
    train, test = _loaders()
    a = IFAttributorDataInf(_task(model, _loss_batched), regularization=0.5, verbose=False)
    a.cache(train)
    scores = a.attribute(train, test)
    # layer-wise Sherman-Morrison average with r = 0.5 on each parameter tensor's block
    sizes = [p.numel() for p in model.parameters()]
    ref = torch.zeros(N_TRAIN, N_TEST, dtype=torch.float64)
    blocks_tr = reference["g_tr"].split(sizes, dim=1)
    blocks_te = reference["g_te"].split(sizes, dim=1)
    layer_of = a.task._generate_param_layer_map(dict(model.named_parameters()))
    for layer in sorted(set(layer_of)):
        idx = [i for i, li in enumerate(layer_of) if li == layer]
        g = torch.cat([blocks_tr[i] for i in idx], dim=1)
        v = torch.cat([blocks_te[i] for i in idx], dim=1)
        inv = (
            sum(
                torch.linalg.inv(torch.outer(gi, gi) + 0.5 * torch.eye(g.shape[1], dtype=g.dtype))
                for gi in g
            )
            / N_TRAIN
        )
        ref += g @ inv @ v.T
    assert _rel(scores, ref) < 1e-8


# ------------------------------------------------- Kronecker / factor methods
_LINEARS = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]  # fmt: skip


def test_ekfac_on_attention_and_mlp_linears_runs():
    model = _gpt()
    train, test = _loaders()
    a = IFAttributorEKFAC(_task(model, _loss_batched), module_name=_LINEARS, verbose=False)
    a.cache(train)
    scores = a.attribute(train, test)
    assert scores.shape == (N_TRAIN, N_TEST) and bool(torch.isfinite(scores).all())
    # self-influence under a positive-definite inverse is positive
    assert bool((a.self_attribute(train) > 0).all())


def _small(cls):
    """16-d per layer (the 4096-d default would project these tiny layers up)."""
    from dattri.params.projection import FactGrassProjectionParams, LoGraProjectionParams

    params = LoGraProjectionParams if cls is LoGraAttributor else FactGrassProjectionParams
    return params(proj_dim_per_layer=16)


@pytest.mark.parametrize("cls", [LoGraAttributor, FactGraSSAttributor])
def test_logra_factgrass_on_token_batches_run(cls):
    model = _gpt()
    train, test = _loaders()
    task = AttributionTask(loss_func=_eager_loss, model=model, checkpoints=model.state_dict())
    a = cls(task, layer_names=_LINEARS, proj_params=_small(cls), offload="none", verbose=False)
    a.cache(train)
    scores = a.attribute(train, test)
    assert scores.shape == (N_TRAIN, N_TEST) and bool(torch.isfinite(scores).all())


def test_dvemb_on_token_batches_runs():
    model = _gpt()
    train, test = _loaders(bs=N_TRAIN)
    a = DVEmbAttributor(_task(model, _loss_sample), verbose=False)
    x, y = train.dataset.tensors
    a.cache_gradients(0, (x, y), torch.arange(N_TRAIN), learning_rate=0.1)
    a.cache()
    scores = a.attribute(test)
    assert scores.shape == (N_TRAIN, N_TEST) and bool(torch.isfinite(scores).all())


# --------------------------------------------------------- GPT-2 Conv1D (HF)
transformers = pytest.importorskip("transformers")


class _Ids(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def _gpt2_pair():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=4, n_layer=1, n_head=2, n_positions=T + 1,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    conv = transformers.GPT2LMHeadModel(cfg).double().eval()
    lin = transformers.GPT2LMHeadModel(cfg).double().eval()
    lin.load_state_dict(conv.state_dict())
    from transformers.pytorch_utils import Conv1D

    for name, m in list(lin.named_modules()):
        if isinstance(m, Conv1D):
            parent, _, attr = name.rpartition(".")
            new = nn.Linear(m.weight.shape[0], m.weight.shape[1]).double()
            with torch.no_grad():
                new.weight.copy_(m.weight.T)
                new.bias.copy_(m.bias)
            setattr(lin.get_submodule(parent), attr, new)
    return conv, lin


def _hf_eager_loss(model, batch, device):
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _hf_loss(model):
    def loss(params, batch):
        ids = batch["input_ids"]
        logits = functional_call(model, params, (), {"input_ids": ids}).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return loss


def _hf_loaders():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N_TRAIN + N_TEST, T + 1), generator=g)
    return (
        DataLoader(_Ids(ids[:N_TRAIN]), batch_size=4),
        DataLoader(_Ids(ids[N_TRAIN:]), batch_size=2),
    )


def test_gpt2_conv1d_models_agree_with_linear_twin():
    conv, lin = _gpt2_pair()
    _, test = _hf_loaders()
    with torch.no_grad():
        batch = next(iter(test))
        torch.testing.assert_close(conv(**batch).logits, lin(**batch).logits)


def _conv_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def test_gpt2_ekfac_conv1d_equals_linear_twin():
    conv, lin = _gpt2_pair()
    train, test = _hf_loaders()
    names = _conv_names(conv)
    assert len(names) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    out = []
    for model in (conv, lin):
        a = IFAttributorEKFAC(_task(model, _hf_loss), module_name=names, verbose=False)
        a.cache(train)
        out.append(a.attribute(train, test))
    assert bool(torch.isfinite(out[0]).all())
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("cls", [LoGraAttributor, FactGraSSAttributor])
def test_gpt2_logra_factgrass_conv1d_equals_linear_twin(cls):
    conv, lin = _gpt2_pair()
    train, test = _hf_loaders()
    names = _conv_names(conv)
    out = []
    for model in (conv, lin):
        task = AttributionTask(
            loss_func=_hf_eager_loss, model=model, checkpoints=model.state_dict()
        )
        a = cls(task, layer_names=names, proj_params=_small(cls), offload="none", verbose=False)
        a.cache(train)
        out.append(a.attribute(train, test))
    assert bool(torch.isfinite(out[0]).all())
    torch.testing.assert_close(out[0], out[1])


def test_gpt2_dvemb_kronecker_conv1d_equals_linear_twin():
    from dattri.params.projection import DVEmbProjectionParams

    conv, lin = _gpt2_pair()
    train, test = _hf_loaders()
    names = _conv_names(conv)
    out = []
    for model in (conv, lin):
        task = AttributionTask(
            loss_func=_hf_eager_loss, model=model, checkpoints=model.state_dict()
        )
        a = DVEmbAttributor(
            task,
            proj_params=DVEmbProjectionParams(proj_dim_per_layer=3, proj_type="normal"),
            factorization_type="kronecker",
            layer_names=names,
            verbose=False,
        )
        for step, batch in enumerate(train):
            idx = torch.arange(step * 4, step * 4 + len(batch["input_ids"]))
            a.cache_gradients(0, batch, idx, learning_rate=0.1)
        a.cache()
        out.append(a.attribute(test))
    assert bool(torch.isfinite(out[0]).all())
    torch.testing.assert_close(out[0], out[1])


def test_gpt2_tracin_dict_batches_equal_autograd():
    conv, _ = _gpt2_pair()
    train, test = _hf_loaders()

    def loss_sample(params, sample):
        return _hf_loss(conv)(params, {"input_ids": sample["input_ids"].unsqueeze(0)})

    task = AttributionTask(loss_func=loss_sample, model=conv, checkpoints=conv.state_dict())
    a = TracInAttributor(
        task, weight_list=[1.0], normalized_grad=False,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=1), verbose=False,
    )  # fmt: skip
    a.cache(train)
    scores = a.attribute(train, test)

    def grads(loader):
        rows = []
        for batch in loader:
            for ids in batch["input_ids"]:
                conv.zero_grad()
                _hf_eager_loss(conv, {"input_ids": ids.unsqueeze(0)}, "cpu").backward()
                rows.append(torch.cat([p.grad.reshape(-1) for p in conv.parameters()]))
        return torch.stack(rows)

    torch.testing.assert_close(scores.double(), grads(train) @ grads(test).T)
