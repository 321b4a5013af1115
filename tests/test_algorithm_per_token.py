"""Per-token attribution: token scores add up to the sequence score; streamed outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.algorithm.influence_function import (
    IFAttributorCG,
    IFAttributorEKFAC,
    IFAttributorExplicit,
)
from dattri.algorithm.logra import LoGraAttributor
from dattri.algorithm.per_token import PerTokenTopK, attribute_per_token, mask_all_but
from dattri.algorithm.rps import RPSAttributor
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.benchmark.models.gpt import GPT, GPTConfig
from dattri.params.projection import (
    LoGraProjectionParams,
    TracInProjectionParams,
    TRAKProjectionParams,
)
from dattri.task import AttributionTask

VOCAB, T, N_TRAIN, N_TEST = 7, 5, 8, 3


def _gpt() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=VOCAB, block_size=T, n_layer=1, n_head=1, n_embd=4, tie_weights=False
    )
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _loaders():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N_TRAIN + N_TEST, T + 1), generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    y[N_TRAIN + 1, 0] = -1  # one query with an ignored target: T_eff = T - 1
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=4)
    test = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=2)
    return train, test


def _loss(model):
    def loss(params, data):
        x, y = data
        return functional_call(model, params, (x, y))[1]

    return loss


def _eager(model, batch, device):
    x, y = batch
    return model(x.to(device), y.to(device))[1]


def _task(model, loss=_loss, **kw):
    return AttributionTask(loss_func=loss(model), model=model, checkpoints=model.state_dict(), **kw)


def _margin(model):
    """Mean token margin over the targets that are not ignored (-1)."""

    def f(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))[0]
        valid = (y != -1).to(logits.dtype)
        logp = -F.cross_entropy(logits, y.clamp_min(0), reduction="none")
        margin = logp - torch.log(-torch.expm1(logp))
        return (margin * valid).sum() / valid.sum()

    return f


def _prob(model):
    def f(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))[0]
        return (-F.cross_entropy(logits, y, ignore_index=-1)).exp()

    return f


def _grad_dot(model):
    return TracInAttributor(
        _task(model), weight_list=[1.0], normalized_grad=False,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=1), verbose=False,
    )  # fmt: skip


def _builders():
    def trak(model):
        task = AttributionTask(
            loss_func=_margin(model), model=model, checkpoints=model.state_dict()
        )
        return TRAKAttributor(
            task, correct_probability_func=_prob(model),
            proj_params=TRAKProjectionParams(proj_type="identity", proj_dim=1),
            regularization=0.1, verbose=False,
        )  # fmt: skip

    def logra(model):
        task = AttributionTask(loss_func=_eager, model=model, checkpoints=model.state_dict())
        return LoGraAttributor(
            task, proj_params=LoGraProjectionParams(proj_dim_per_layer=16), offload="none",
            verbose=False,
        )  # fmt: skip

    return {
        "grad-dot": _grad_dot,
        "if-explicit": lambda m: IFAttributorExplicit(_task(m), regularization=1.0, verbose=False),
        # CG is linear in the query only once converged (H + 5 I is positive definite)
        "if-cg": lambda m: IFAttributorCG(
            _task(m), regularization=5.0, max_iter=300, tol=1e-12, verbose=False
        ),
        "if-ekfac": lambda m: IFAttributorEKFAC(_task(m), verbose=False),
        "trak": trak,
        "logra": logra,
    }


def _sequence_scores(attr, train, test):
    if isinstance(attr, TRAKAttributor):
        return attr.attribute(test)
    return attr.attribute(train, test)


@pytest.mark.parametrize("name", list(_builders()))
def test_token_scores_add_up_to_sequence_score(name):
    model = _gpt()
    train, test = _loaders()
    attr = _builders()[name](model)
    attr.cache(train)
    seq = _sequence_scores(attr, train, test)
    tok = attribute_per_token(attr, test, train, token_batch_size=4)
    assert tok.shape == (N_TRAIN, N_TEST, T)
    assert float(tok[:, 1, 0].abs().max()) == 0.0  # the ignored target has no score
    torch.testing.assert_close(tok.sum(-1), seq.to(tok.dtype), rtol=1e-7, atol=1e-10)
    # tokens differ: the split is not a uniform share of the sequence score
    assert float((tok - tok.mean(-1, keepdim=True)).abs().max()) > 1e-3 * float(seq.abs().max())


def test_reduction_sum_with_summed_target():
    model = _gpt()
    train, test = _loaders()

    def sum_loss(m):
        def loss(params, data):
            x, y = data
            logits = functional_call(m, params, (x,))[0]
            return F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")

        return loss

    attr = TracInAttributor(
        _task(model, sum_loss), weight_list=[1.0], normalized_grad=False,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=1), verbose=False,
    )  # fmt: skip
    attr.cache(train)
    tok = attribute_per_token(attr, test, train, reduction="sum")
    torch.testing.assert_close(tok.sum(-1), attr.attribute(train, test).to(tok.dtype))


def test_dvemb_per_token_adds_up():
    model = _gpt()
    train, test = _loaders()
    attr = DVEmbAttributor(_task(model), verbose=False)
    for step, (x, y) in enumerate(train):
        attr.cache_gradients(0, (x, y), torch.arange(4 * step, 4 * step + len(x)), 0.1)
    attr.cache()
    tok = attribute_per_token(attr, test)
    torch.testing.assert_close(tok.sum(-1), attr.attribute(test).to(tok.dtype))


def test_topk_and_file_outputs_match_dense(tmp_path):
    model = _gpt()
    train, test = _loaders()
    attr = _grad_dot(model)
    attr.cache(train)
    dense = attribute_per_token(attr, test, train)
    top = attribute_per_token(attr, test, train, k=3, token_batch_size=5)
    assert isinstance(top, PerTokenTopK)
    assert top.helpful_indices.shape == (N_TEST, T, 3)
    assert not bool(top.token_valid[1, 0]) and int(top.token_valid.sum()) == N_TEST * T - 1
    ref_v, ref_i = torch.topk(dense.permute(1, 2, 0), 3, dim=-1)
    valid = top.token_valid
    torch.testing.assert_close(top.helpful_scores[valid], ref_v[valid])
    assert torch.equal(top.helpful_indices[valid], ref_i[valid])
    low_v, _ = torch.topk(dense.permute(1, 2, 0), 3, dim=-1, largest=False)
    torch.testing.assert_close(top.harmful_scores[valid], low_v[valid])
    path = tmp_path / "tok.npy"
    mm = attribute_per_token(attr, test, train, out=path, token_batch_size=2)
    assert mm.dtype == torch.float32 and mm.shape == (N_TRAIN, N_TEST, T)
    np.testing.assert_allclose(np.load(path), dense.float().numpy(), rtol=1e-6, atol=1e-7)


def test_refuses_methods_that_do_not_split():
    model = _gpt()
    train, test = _loaders()
    cos = TracInAttributor(
        _task(model), weight_list=[1.0], normalized_grad=True,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=1), verbose=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="not linear"):
        attribute_per_token(cos, test, train)
    rps = RPSAttributor(
        AttributionTask(
            loss_func=lambda logits, y: F.cross_entropy(logits, y),
            model=model,
            checkpoints=model.state_dict(),
            target_func=lambda logits, y: F.cross_entropy(logits, y),
        ),
        final_linear_layer_name="lm_head",
        verbose=False,
    )
    with pytest.raises(ValueError, match="not linear in the test"):
        attribute_per_token(rps, test, train)
    attr = _grad_dot(model)
    attr.cache(train)
    with pytest.raises(ValueError, match="either k"):
        attribute_per_token(attr, test, train, k=2, out="x.npy")
    with pytest.raises(ValueError, match="reduction"):
        attribute_per_token(attr, test, train, reduction="max")
    with pytest.raises(ValueError, match="mask_fn"):
        attribute_per_token(attr, [torch.zeros(2, T)], train)


def test_mask_all_but_formats():
    x, y = torch.arange(4), torch.tensor([3, 1, 2, 0])
    assert mask_all_but((x, y), 2)[1].tolist() == [-1, -1, 2, -1]
    d = mask_all_but({"input_ids": x, "labels": y}, 0)
    assert d["labels"].tolist() == [3, -100, -100, -100] and d["input_ids"] is x
