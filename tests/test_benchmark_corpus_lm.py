"""The ``corpus-nanogpt`` setting: data, model, ground truth and methods on token blocks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dattri.benchmark.cli import main
from dattri.benchmark.corpus_lm import (
    CORPUS_BLOCK,
    corpus_blocks,
    create_corpus_lm,
    load_corpus,
    sequence_loss,
)
from dattri.benchmark.datasets.text import default_corpus
from dattri.benchmark.prepare import prepare
from dattri.benchmark.run import run_benchmark
from dattri.benchmark.settings import get_setting


def test_blocks_are_fixed_corpus_blocks_split_by_block():
    x_tr, y_tr, x_te, y_te = corpus_blocks(n_test=24)
    assert x_tr.shape[1] == CORPUS_BLOCK and x_te.shape == (24, CORPUS_BLOCK)
    # targets are the inputs shifted by one character
    assert torch.equal(x_tr[:, 1:], y_tr[:, :-1]) and torch.equal(x_te[:, 1:], y_te[:, :-1])
    n_blocks = (len(default_corpus()) - CORPUS_BLOCK - 1) // CORPUS_BLOCK + 1
    assert len(x_tr) + len(x_te) == n_blocks
    rows = {tuple(r.tolist()) for r in x_tr}
    assert not any(tuple(r.tolist()) in rows for r in x_te)  # no block in both splits
    again = corpus_blocks(n_test=24)
    assert all(torch.equal(a, b) for a, b in zip(again, (x_tr, y_tr, x_te, y_te), strict=True))
    with pytest.raises(ValueError, match="n_test"):
        corpus_blocks(n_test=10_000)


def test_model_output_makes_cross_entropy_the_mean_token_loss():
    torch.manual_seed(0)
    model = create_corpus_lm().eval()
    x, y, _, _ = corpus_blocks(n_test=4, n_train=5)
    out = model(x)
    assert out.shape == (5, model.gpt.config.vocab_size, CORPUS_BLOCK)
    ref = model.gpt(x, y)[1]
    torch.testing.assert_close(torch.nn.functional.cross_entropy(out, y), ref)
    torch.testing.assert_close(sequence_loss(out, y).mean(), ref)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_list_shows_setting_and_inapplicable_methods(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "corpus-nanogpt" in out
    assert "not applicable: rps" in out and "not applicable: knn-shapley" in out


def _tiny_setting():
    """The setting at toy sizes: 40 training blocks, 6 LDS subsets, 3 epochs."""
    s = get_setting("corpus-nanogpt", quick=True)
    return dataclasses.replace(
        s,
        name="corpus-nanogpt-tiny",
        load_data=load_corpus(n_test=6, n_train=40),
        num_subsets=6,
        runs_per_subset=2,
        num_ensemble=1,
        num_tracin_checkpoints=1,
        train_config=dataclasses.replace(s.train_config, epochs=3),
    )


def test_tiny_prepare_and_methods_run(tmp_path):
    setting = _tiny_setting()
    prepared = prepare(setting, tmp_path, verbose=False)
    values, indices = prepared.lds_ground_truth()
    assert values.shape == (6, 6) and indices.shape == (6, 20)
    assert bool(torch.isfinite(values).all())
    methods = ["if-ekfac", "trak-1", "grad-dot", "logra", "dvemb", "rps"]
    reports = run_benchmark(prepared, methods)
    by = {r.method: r for r in reports}
    assert by["rps"].error.startswith("not applicable")
    for name in ("if-ekfac", "trak-1", "grad-dot", "logra", "dvemb"):
        r = by[name]
        assert r.error is None, r.error
        assert -1.0 <= r.lds <= 1.0 and r.lds_low <= r.lds <= r.lds_high


def test_quick_setting_if_and_trak_lds_exclude_zero(tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = ["run", "corpus-nanogpt", "--quick", "--quiet", "--cache-dir", str(tmp_path)]
    code = main([*args, "--out", str(out_dir), "--methods", "if-ekfac", "trak-10", "rps"])
    assert code == 0
    rows = {
        r["method"]: r
        for r in json.loads((out_dir / "corpus-nanogpt-quick.json").read_text())["results"]
    }
    assert rows["rps"]["error"].startswith("not applicable")
    for name in ("if-ekfac", "trak-10"):
        assert rows[name]["error"] is None
        assert rows[name]["lds_low"] > 0, rows[name]
