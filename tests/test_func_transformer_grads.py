"""Per-sample gradients on transformer layers: hook route against autograd per sample.

Covers ``nn.Linear`` on ``(T, d)`` inputs (attention/MLP projections, summed over
tokens), ``nn.Embedding``, ``nn.LayerNorm``, ``transformers``' GPT-2 ``Conv1D`` and a
config-built GPT-NeoX with rotary position embeddings, all in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dattri.benchmark.models.gpt import GPT, GPTConfig
from dattri.func.layer_grads import (
    factor_grads,
    kron_project,
    layer_kind,
    linear_factors,
    matrix_shape,
)
from dattri.func.per_sample_grad import (
    grad_routes,
    per_sample_grad,
    per_sample_grad_dict,
    per_sample_layer_factors,
)

transformers = pytest.importorskip("transformers")

VOCAB, T, B = 23, 7, 4


def _tiny_gpt(tie: bool = False) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=2, n_head=2, n_embd=8, tie_weights=tie)
    return GPT(cfg).double().eval()


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=8,
        n_layer=2,
        n_head=2,
        n_positions=8,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _tiny_neox() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        rotary_pct=0.5,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPTNeoXForCausalLM(cfg).double().eval()


def _tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _ours_loss(model: nn.Module):
    def loss(params, sample):
        x, y = sample
        return functional_call(model, params, (x, y))[1]

    return loss


def _hf_loss(model: nn.Module):
    def loss(params, sample):
        ids = sample["input_ids"]
        out = functional_call(model, params, (), {"input_ids": ids.unsqueeze(0)})
        logits = out.logits[0, :-1]
        return nn.functional.cross_entropy(logits, ids[1:])

    return loss


def _autograd_loop(model, loss, data, names, index):
    """Reference: one autograd.grad per sample."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(B):
        leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in params.items()}
        sample = index(data, i)
        grads = torch.autograd.grad(loss(leaves, sample), [leaves[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _tol(ref: torch.Tensor) -> dict:
    return {"rtol": 1e-9, "atol": 1e-12 * max(1.0, float(ref.abs().max()))}


def test_ours_gpt_every_layer_type_hook_equals_autograd():
    model = _tiny_gpt(tie=False)
    x, y = _tokens()
    routes = grad_routes(model)
    assert set(routes.values()) == {"hook"}
    names = list(routes)
    kinds = {layer_kind(m) for m in model.modules()} - {None}
    assert kinds == {"linear", "embedding", "layernorm"}
    got = per_sample_grad(
        model, _ours_loss(model), dict(model.named_parameters()), (x, y), route="hook"
    )
    ref = _autograd_loop(model, _ours_loss(model), (x, y), names, lambda d, i: (d[0][i], d[1][i]))
    torch.testing.assert_close(got, ref, **_tol(ref))


def test_ours_gpt_tied_head_uses_vmap_for_shared_weight():
    model = _tiny_gpt(tie=True)
    x, y = _tokens()
    routes = grad_routes(model)
    # the token embedding is also the head: its gradient is not one layer's
    assert routes["transformer.wte.weight"] == "vmap"
    assert routes["transformer.h.0.attn.c_attn.weight"] == "hook"
    got = per_sample_grad(model, _ours_loss(model), dict(model.named_parameters()), (x, y))
    ref = _autograd_loop(
        model, _ours_loss(model), (x, y), list(routes), lambda d, i: (d[0][i], d[1][i])
    )
    torch.testing.assert_close(got, ref, **_tol(ref))
    with pytest.raises(ValueError, match="route='hook' cannot handle"):
        per_sample_grad(
            model, _ours_loss(model), dict(model.named_parameters()), (x, y), route="hook"
        )


@pytest.mark.parametrize("build", [_tiny_gpt2, _tiny_neox], ids=["gpt2-conv1d", "neox-rotary"])
def test_hf_models_hook_equals_autograd_with_dict_batches(build):
    model = build()
    ids = torch.cat(_tokens(), dim=1)[:, : T + 1]
    data = {"input_ids": ids}
    routes = grad_routes(model)
    names = [n for n, r in routes.items() if r == "hook"]
    assert len(names) == len(routes)  # every parameter of both models is hookable
    kinds = {layer_kind(m) for m in model.modules()} - {None}
    if build is _tiny_gpt2:
        assert "conv1d" in kinds
    got = per_sample_grad(
        model, _hf_loss(model), dict(model.named_parameters()), data, route="hook", chunk_size=3
    )
    ref = _autograd_loop(
        model, _hf_loss(model), data, names, lambda d, i: {"input_ids": d["input_ids"][i]}
    )
    torch.testing.assert_close(got, ref, **_tol(ref))
    vm = per_sample_grad(model, _hf_loss(model), dict(model.named_parameters()), data, route="vmap")
    torch.testing.assert_close(vm, ref, **_tol(ref))


def test_conv1d_factor_forms_match_exact_gradient():
    model = _tiny_gpt2()
    ids = torch.cat(_tokens(), dim=1)[:, : T + 1]
    data = {"input_ids": ids}
    name = "transformer.h.1.mlp.c_fc"
    module = dict(model.named_modules())[name]
    assert layer_kind(module) == "conv1d"
    d_in, d_out = module.weight.shape
    assert matrix_shape(module, with_bias=True) == (d_out, d_in + 1)
    params = dict(model.named_parameters())
    exact = per_sample_grad_dict(
        model, _hf_loss(model), params, data, [f"{name}.weight", f"{name}.bias"], route="vmap"
    )
    g_mat = torch.cat(
        [exact[f"{name}.weight"].transpose(1, 2), exact[f"{name}.bias"].unsqueeze(-1)], dim=-1
    )  # (B, d_out, d_in + 1), nn.Linear orientation
    ((a, s),) = per_sample_layer_factors(model, _hf_loss(model), params, data, [name]).values()
    assert a.shape == (B, T + 1, d_in + 1) and s.shape == (B, T + 1, d_out)
    torch.testing.assert_close(torch.einsum("bto,bti->boi", s, a), g_mat, **_tol(g_mat))
    # the raw factors give the gradient in the parameter's own (d_in, d_out) layout
    a_raw, s_raw = a[..., :-1], s
    got = factor_grads(module, a_raw, s_raw, ["weight", "bias"])
    torch.testing.assert_close(got["weight"], exact[f"{name}.weight"], **_tol(g_mat))
    torch.testing.assert_close(got["bias"], exact[f"{name}.bias"], **_tol(g_mat))
    la, ls = linear_factors(module, a_raw, s_raw, bias_column=True)
    torch.testing.assert_close(la, a)
    torch.testing.assert_close(ls, s)
    g = torch.Generator().manual_seed(3)
    p_in = torch.randn(3, d_in + 1, generator=g, dtype=torch.float64)
    p_out = torch.randn(2, d_out, generator=g, dtype=torch.float64)
    proj = kron_project(module, a_raw, s_raw, p_in, p_out)
    ref = (p_out @ g_mat @ p_in.T).reshape(B, -1)
    torch.testing.assert_close(proj, ref, **_tol(ref))
