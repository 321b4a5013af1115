"""Upstream dattri 0.3 names, signatures and CLI flags of the generative benchmark modules."""

import inspect
from pathlib import Path

import pytest

from dattri.benchmark.datasets import maestro, shakespeare_char, wikitext2
from dattri.script import dattri_retrain_nanogpt

_EMPTY = inspect.Parameter.empty

# (module, name, [(parameter, default)]) as listed in the upstream API reference (section 10).
UPSTREAM = [
    (shakespeare_char, "create_shakespeare_dataset", [("data_path", _EMPTY), ("block_size", 256)]),
    (wikitext2, "create_wikitext2_dataset", [("path", None), ("block_size", 512)]),
    (
        wikitext2,
        "train_wikitext2_gpt2",
        [("dataloader", _EMPTY), ("seed", 0), ("device", "cpu"), ("epoch_num", 3)],
    ),
    (
        wikitext2,
        "loss_wikitext2_gpt2",
        [("model_path", _EMPTY), ("dataloader", _EMPTY), ("device", "cpu")],
    ),
    (wikitext2, "create_gpt2_model", []),
    (maestro, "create_maestro_datasets", [("dataset_path", _EMPTY), ("generated_music", False)]),
    (maestro, "create_musictransformer_model", [("device", "cpu")]),
    (
        maestro,
        "train_maestro_musictransformer",
        [("train_dataloader", _EMPTY), ("seed", 0), ("num_epoch", 20), ("device", "cpu")],
    ),
    (
        maestro,
        "loss_maestro_musictransformer",
        [("model_path", _EMPTY), ("dataloader", _EMPTY), ("device", "cpu")],
    ),
]


@pytest.mark.parametrize(("module", "name", "params"), UPSTREAM, ids=[u[1] for u in UPSTREAM])
def test_upstream_signature(module, name, params):
    assert name in module.__all__
    sig = inspect.signature(getattr(module, name))
    got = list(sig.parameters.values())
    head = [(p.name, p.default) for p in got[: len(params)]]
    assert head == params
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in got[: len(params)])
    # anything beyond upstream's parameters is keyword-only with a default
    for extra in got[len(params) :]:
        assert extra.kind is extra.KEYWORD_ONLY and extra.default is not _EMPTY, extra


def test_models_exported_with_upstream_names():
    assert shakespeare_char.GPT.__name__ == "GPT"
    assert shakespeare_char.GPTConfig.__name__ == "GPTConfig"
    cfg = shakespeare_char.GPTConfig(**shakespeare_char.SHAKESPEARE_GPT_CONFIG)
    model = shakespeare_char.GPT(cfg)
    assert 10.6e6 < model.num_params() < 10.8e6  # "10.7M" in upstream's README


def test_retrain_nanogpt_flags_and_defaults():
    args = dattri_retrain_nanogpt._build_parser().parse_args([])
    assert args.save_path == "output_models"
    assert args.dataset == "shakespeare_char"
    assert args.data_file == "TinyStoriesV2-GPT4-train.txt"
    assert args.seed == 42
    assert args.partition == [0, 5, 5]
    assert args.subset_ratio == 0.5
    assert args.only_download_dataset is False


def test_console_script_registered():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = pyproject.read_text()
    scripts = text[text.index("[project.scripts]") :].split("\n[", 1)[0]  # tomllib needs 3.11
    line = 'dattri_retrain_nanogpt = "dattri.script.dattri_retrain_nanogpt:main"'
    assert line in scripts.splitlines()
