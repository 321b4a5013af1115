"""The shared batch helpers: ``LossPass`` chunking and ``check_names``."""

import pytest
import torch

from dattri.func.batch_utils import LossPass, check_names
from dattri.func.projection_engine import check_int


def test_loss_pass_chunks_slice_every_leaf() -> None:
    x = torch.arange(10.0).reshape(5, 2)
    y = torch.arange(5)
    job = LossPass(lambda p, s: s, {}, {"x": x, "pair": (x, y)}, chunk_size=2)
    seen = []
    for s, e, chunk in job.chunks():
        assert torch.equal(chunk["x"], x[s:e]) and torch.equal(chunk["pair"][1], y[s:e])
        seen.append((s, e))
    assert seen == [(0, 2), (2, 4), (4, 5)]
    assert torch.equal(job.first_sample()["x"], x[0])
    assert job.prepare()(x[0]) is not None
    kept = LossPass(lambda p, s: s, {}, x, keep_batch_dim=True)
    assert kept.first_sample().shape == (1, 2) and kept.prepare()(x[0]).shape == (1, 2)
    assert [(s, e) for s, e, _ in kept.chunks()] == [(0, 5)]
    with pytest.raises(ValueError, match="chunk_size"):
        list(LossPass(lambda p, s: s, {}, x, chunk_size=0).chunks())


def test_check_names_messages() -> None:
    valid = ["a.weight", "a.bias"]
    check_names(["a.bias", "a.bias"], valid, unknown="{names} {valid}")  # repeats allowed
    with pytest.raises(ValueError, match=r"^bad \['b'\] of a.weight, a.bias$"):
        check_names(["a.weight", "b"], valid, unknown="bad {names} of {valid}")
    with pytest.raises(ValueError, match=r"twice: \['a.bias', 'a.bias'\]"):
        check_names(["a.bias", "a.bias"], valid, unknown="{names}", repeated="twice: {names}")


def test_check_int() -> None:
    assert check_int(3, "n") == 3 and check_int(torch.tensor(2), "n", minimum=1) == 2
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int(True, "n")
    with pytest.raises(TypeError, match="n must be an int, got float"):
        check_int(1.0, "n")
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        check_int(-1, "n", minimum=0, expected="a non-negative int")
