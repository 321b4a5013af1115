"""The upstream-size generative settings on data the tests write (no download).

``shakespeare-nanogpt`` (a tinyshakespeare-like ``input.txt``), ``wikitext2-gpt2`` (a
wikitext-2-raw-like folder and a byte-level BPE tokenizer trained here) and
``maestro-musictransformer`` (MIDI files written with ``pretty_midi``), each with a
tiny model so that ``prepare`` and two methods run in seconds; the missing-data
message; ``dattri-bench list``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dattri.benchmark.cli import main
from dattri.benchmark.corpus_lm import sequence_loss
from dattri.benchmark.datasets.text import default_corpus
from dattri.benchmark.generative import (
    GPT2Factory,
    NoDropout,
    create_music_lm,
    create_shakespeare_lm,
    load_maestro_windows,
    load_shakespeare_blocks,
    load_wikitext2_blocks,
)
from dattri.benchmark.prepare import (
    MissingDataError,
    _vectorizable,
    per_sample_test_loss,
    prepare,
)
from dattri.benchmark.run import run_benchmark
from dattri.benchmark.settings import get_setting

GENERATIVE = ("shakespeare-nanogpt", "wikitext2-gpt2", "maestro-musictransformer")


def _tiny(name, **overrides):
    """The quick setting at toy sizes: 6 LDS subsets, one TracIn/ensemble model."""
    s = get_setting(name, quick=True)
    train = dataclasses.replace(s.train_config, epochs=2, batch_size=8, model_chunk_size=None)
    base = {
        "name": name + "-tiny",
        "num_subsets": 6,
        "num_ensemble": 1,
        "num_tracin_checkpoints": 1,
        "train_config": train,
        "eval_batch_size": 4,
    }
    return dataclasses.replace(s, **{**base, **overrides})


def _check_run(prepared, methods):
    values, indices = prepared.lds_ground_truth()
    n_train, n_test = len(prepared.y_train), len(prepared.y_test)
    assert values.shape == (6, n_test) and indices.shape == (6, n_train // 2)
    assert bool(torch.isfinite(values).all())
    reports = {r.method: r for r in run_benchmark(prepared, [*methods, "rps"])}
    assert reports["rps"].error.startswith("not applicable")
    for name in methods:
        r = reports[name]
        assert r.error is None, r.error
        assert -1.0 <= r.lds <= 1.0 and r.lds_low <= r.lds <= r.lds_high


def _check_target(prepared, own_loss):
    """The LDS target is each test sequence's mean next-token loss (batched or not)."""
    s = prepared.setting
    sd = prepared.state_dict("full")
    x, y = prepared.x_test, prepared.y_test
    batched = per_sample_test_loss(s, sd, x, y)
    whole = per_sample_test_loss(dataclasses.replace(s, eval_batch_size=None), sd, x, y)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    model = prepared.model("full")
    with torch.no_grad():
        for i in (0, len(x) - 1):
            torch.testing.assert_close(batched[i], own_loss(model, x[i : i + 1], y[i : i + 1]))


# ------------------------------------------------------------------ list, missing
def test_list_shows_the_four_generative_settings(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for name in ("corpus-nanogpt", *GENERATIVE):
        assert name in lines
    for name in GENERATIVE:
        assert "--download or --data-dir DIR" in lines[name]
    assert "GPU recommended" in lines["shakespeare-nanogpt"]
    assert out.count("not applicable: if-explicit") >= 4


@pytest.mark.parametrize("name", GENERATIVE)
def test_missing_data_says_how_to_get_it_in_one_line(name, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["prepare", name, "--quick", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--data-dir", str(empty)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(empty) in err and "--data-dir DIR" in err and "--download" in err
    with pytest.raises(MissingDataError, match="data_dir"):
        prepare(get_setting(name, quick=True), tmp_path / "cache2", empty, quick=True)


# ------------------------------------------------------------------ shakespeare
def test_shakespeare_blocks_prepare_and_methods(tmp_path):
    text = default_corpus()  # 63 distinct characters, like tinyshakespeare's 65
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text(text, encoding="utf-8")
    setting = _tiny(
        "shakespeare-nanogpt",
        load_data=load_shakespeare_blocks(n_train=40, n_test=6, block_size=16),
        model_factory=lambda: create_shakespeare_lm(1, 2, 16, 16),
    )
    assert _vectorizable(setting.model_factory())
    prepared = prepare(setting, tmp_path / "cache", data, verbose=False)
    assert (data / "train.bin").is_file()  # nanoGPT files written next to input.txt
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    n_train_chars = int(len(text) * 0.9)
    train, val = ids[:n_train_chars], ids[n_train_chars:]
    x, y = prepared.x_train, prepared.y_train
    assert x.shape == y.shape == (40, 16) and prepared.x_test.shape == (6, 16)
    for i in (0, 39):
        assert torch.equal(x[i], train[16 * i : 16 * i + 16])
        assert torch.equal(y[i], train[16 * i + 1 : 16 * i + 17])
    assert torch.equal(prepared.y_test[5], val[81:97])

    def own_loss(model, xb, yb):
        return model.gpt(xb, yb)[1]

    _check_target(prepared, own_loss)
    _check_run(prepared, ["if-ekfac", "grad-dot"])


def test_shakespeare_model_is_upstreams_size():
    model = create_shakespeare_lm()
    cfg = model.gpt.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (6, 6, 384, 256)
    assert not cfg.bias and cfg.dropout == 0
    assert 10.7e6 < sum(p.numel() for p in model.parameters()) < 10.8e6


def test_shakespeare_refuses_a_larger_alphabet(tmp_path):
    (tmp_path / "input.txt").write_text("".join(chr(0x100 + i) for i in range(70)) * 40)
    with pytest.raises(ValueError, match="70 distinct characters"):
        load_shakespeare_blocks(n_test=2, block_size=8)(tmp_path)


# ---------------------------------------------------------------------- wikitext
@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("wikitext2")
    raw = root / "wikitext-2-raw"
    raw.mkdir()
    lines = default_corpus().splitlines(keepends=True)
    (raw / "wiki.train.raw").write_text("".join(lines[:110]), encoding="utf-8")
    (raw / "wiki.valid.raw").write_text("".join(lines[110:140]), encoding="utf-8")
    (raw / "wiki.test.raw").write_text("".join(lines[140:]), encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        default_corpus().splitlines(),
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    (root / "bpe").mkdir()
    bpe.save_model(str(root / "bpe"))
    tokenizer = transformers.GPT2TokenizerFast(
        vocab=str(root / "bpe" / "vocab.json"), merges=str(root / "bpe" / "merges.txt")
    )
    tokenizer.save_pretrained(str(root / "tokenizer"))
    config = {
        "vocab_size": len(tokenizer),
        "n_positions": 16,
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    return root, tokenizer, config


def test_wikitext2_blocks_prepare_and_methods(wikitext, tmp_path):
    from dattri.benchmark.datasets.wikitext2 import read_wikitext2_lines

    root, tokenizer, config = wikitext
    setting = _tiny(
        "wikitext2-gpt2",
        load_data=load_wikitext2_blocks(n_train=24, n_test=6, block_size=12),
        model_factory=GPT2Factory(config=config),
    )
    assert _vectorizable(setting.model_factory())
    prepared = prepare(setting, tmp_path / "cache", root, verbose=False)
    lines = read_wikitext2_lines(root / "wikitext-2-raw", "train")
    flat = torch.tensor([t for ids in tokenizer(lines)["input_ids"] for t in ids])
    x, y = prepared.x_train, prepared.y_train
    assert x.shape == y.shape == (24, 12) and prepared.x_test.shape == (6, 12)
    for i in (0, 23):  # blocks of 13 tokens: x its first 12, y its last 12
        assert torch.equal(x[i], flat[13 * i : 13 * i + 12])
        assert torch.equal(y[i], flat[13 * i + 1 : 13 * i + 13])

    def own_loss(model, xb, yb):  # transformers' own (shifted) mean loss of the block
        ids = torch.cat([xb, yb[:, -1:]], 1)
        return model.lm(input_ids=ids, labels=ids, use_cache=False).loss

    _check_target(prepared, own_loss)
    _check_run(prepared, ["if-ekfac", "grad-dot"])


def test_gpt2_factory_untied_pretrained_keeps_the_function(wikitext, tmp_path):
    import transformers

    _, _, config = wikitext
    torch.manual_seed(0)
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    tied.save_pretrained(str(tmp_path / "weights"))
    factory = GPT2Factory(weights=str(tmp_path / "weights"))
    model = factory().eval()
    assert factory.pretrained is True
    assert not model.lm.config.tie_word_embeddings
    assert model.lm.lm_head.weight is not model.lm.transformer.wte.weight
    assert any(isinstance(m, NoDropout) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    ids = torch.randint(0, config["vocab_size"], (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tied(input_ids=ids).logits.transpose(1, 2))


def test_gpt2_factory_is_shared_by_deepcopy():
    import copy

    factory = GPT2Factory(config={"n_layer": 1})
    assert copy.deepcopy(factory) is factory


def test_gpt2_factory_without_weights_warns_and_builds_from_config(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.delenv("DATTRI_GPT2_WEIGHTS", raising=False)
    factory = GPT2Factory(weights=str(tmp_path / "no-weights"))
    with pytest.warns(UserWarning, match="GPT2Config"):
        factory._resolve()
    assert factory.pretrained is False and factory._base_config.n_layer == 12


def test_wikitext2_without_a_tokenizer_is_missing_data(wikitext, tmp_path, monkeypatch):
    root, _, _ = wikitext
    data = tmp_path / "data"
    data.mkdir()
    for f in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        (data / f).write_bytes((root / "wikitext-2-raw" / f).read_bytes())
    import dattri.benchmark.datasets.wikitext2.data as wikitext_data

    # no tokenizer/ folder, and GPT-2's tokenizer is not in the (local) cache
    monkeypatch.setattr(wikitext_data, "GPT2_TOKENIZER", str(tmp_path / "no-tokenizer"))
    with pytest.raises(FileNotFoundError, match="tokenizer folder at"):
        load_wikitext2_blocks(n_test=2, block_size=8)(data)
    # the CLI turns it into the one-line missing-data message
    setting = dataclasses.replace(
        get_setting("wikitext2-gpt2", quick=True), load_data=load_wikitext2_blocks(n_test=2)
    )
    with pytest.raises(MissingDataError, match="tokenizer"):
        prepare(setting, tmp_path / "cache", data, quick=True, verbose=False)


# ----------------------------------------------------------------------- maestro
def _write_maestro(root, rng):
    import pretty_midi

    base = root / "maestro-v2.0.0"
    (base / "2004").mkdir(parents=True)
    pieces = []
    for i, split in enumerate(["train", "train", "validation", "test"]):
        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(program=0)
        t = 0.0
        for _ in range(40 if split == "train" else 25):
            t += 0.05 * int(rng.integers(0, 4))
            pitch, vel = int(rng.integers(21, 109)), 4 * int(rng.integers(1, 32))
            inst.notes.append(pretty_midi.Note(vel, pitch, t, t + 0.01 * rng.integers(1, 100)))
        # upstream's encoder keeps the notes of sustain-pedal spans: pedal down throughout
        end = max(n.end for n in inst.notes) + 1
        inst.control_changes = [
            pretty_midi.ControlChange(64, 127, 0.0),
            pretty_midi.ControlChange(64, 0, end),
        ]
        pm.instruments.append(inst)
        name = f"2004/piece_{i}.midi"
        pm.write(str(base / name))
        pieces.append({"midi_filename": name, "split": split})
    (base / "maestro-v2.0.0.json").write_text(json.dumps(pieces))


def test_maestro_windows_prepare_and_methods(tmp_path):
    pytest.importorskip("pretty_midi")
    data = tmp_path / "data"
    _write_maestro(data, np.random.default_rng(0))
    setting = _tiny(
        "maestro-musictransformer",
        load_data=load_maestro_windows(n_train=None, n_test=None, block_size=16),
        model_factory=lambda: create_music_lm(1, 2, 16, 32, 16),
    )
    assert _vectorizable(setting.model_factory())
    prepared = prepare(setting, tmp_path / "cache", data, verbose=False)
    processed = data / "maestro-v2.0.0-processed"
    pieces = [np.load(p) for p in sorted((processed / "train").iterdir())]
    want = [
        torch.from_numpy(p[o : o + 17].astype(np.int64))
        for p in pieces
        for o in range(0, len(p) - 16, 16)
    ]
    x, y = prepared.x_train, prepared.y_train
    assert len(x) == len(want) >= 12
    for i in (0, len(x) - 1):
        assert torch.equal(x[i], want[i][:-1]) and torch.equal(y[i], want[i][1:])
    assert len(prepared.x_test) > 0

    def own_loss(model, xb, yb):
        logits = model.lm(xb)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))

    _check_target(prepared, own_loss)
    _check_run(prepared, ["grad-dot", "trak-1"])


def test_music_model_is_upstreams_size():
    model = create_music_lm()
    cfg = model.lm.config
    assert (cfg.n_layers, cfg.num_heads, cfg.d_model, cfg.max_sequence) == (6, 8, 512, 256)
    assert cfg.rpr and cfg.dropout == 0
    assert 13.0e6 < sum(p.numel() for p in model.parameters()) < 13.2e6
    x = torch.randint(0, 388, (2, 8))
    y = torch.randint(0, 388, (2, 8))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 390, 8)
        want = torch.stack([F.cross_entropy(model.lm(x[i]), y[i]) for i in range(2)])
        torch.testing.assert_close(sequence_loss(out, y), want)


def test_prepare_takes_a_training_device(tmp_path, capsys):
    args = ["prepare", "shakespeare-nanogpt", "--quick", "--cache-dir", str(tmp_path)]
    assert main([*args, "--device", "nonsense"]) == 2
    assert "--device 'nonsense' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_prepared_cache_records_whether_gpt2_was_pretrained(wikitext, tmp_path, monkeypatch):
    """Weights that appear (or vanish) after prepare make the cache refuse, naming why."""
    import transformers

    from dattri.benchmark.prepare import _check_manifest

    monkeypatch.delenv("DATTRI_GPT2_WEIGHTS", raising=False)
    _, _, config = wikitext
    weights = tmp_path / "weights"
    missing = GPT2Factory(weights=str(weights))
    with pytest.warns(UserWarning, match="GPT2Config"):
        assert missing.fingerprint() == {"gpt2_weights": "GPT2Config()", "pretrained": False}
    cache = tmp_path / "cache"
    _check_manifest(cache, _tiny("wikitext2-gpt2", model_factory=missing))
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).save_pretrained(str(weights))
    present = GPT2Factory(weights=str(weights))
    assert present.fingerprint() == {"gpt2_weights": str(weights), "pretrained": True}
    with pytest.raises(ValueError, match=r"differs in: model\.gpt2_weights, model\.pretrained"):
        _check_manifest(cache, _tiny("wikitext2-gpt2", model_factory=present))
