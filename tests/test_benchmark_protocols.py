"""`dattri-bench run --protocol fixed-seed --drop-fractions`: the fixed-seed ground truth
is the training MAGIC differentiates, so MAGIC's LDS is near 1 there."""

import dataclasses
import json

import pytest
import torch

from dattri.benchmark import settings as settings_mod
from dattri.benchmark.cli import main
from dattri.benchmark.prepare import load_prepared
from dattri.benchmark.protocols import subset_ground_truth
from dattri.model_util import train_subset_models


def _tiny(monkeypatch):
    base = settings_mod.SETTINGS["digits-mlp-sgd"]
    tiny = dataclasses.replace(
        base,
        name="tiny-mlp-sgd",
        load_data=settings_mod._digits(120, 16),
        model_factory=lambda: settings_mod.create_mlp_model("digits", hidden=(16,)),
        train_config=dataclasses.replace(base.train_config, epochs=2, batch_size=32),
        num_subsets=12,
        num_ensemble=1,
        num_tracin_checkpoints=1,
        quick={},
    )
    monkeypatch.setitem(settings_mod.SETTINGS, "tiny-mlp-sgd", tiny)
    return tiny


def test_fixed_seed_protocol_and_magic(tmp_path, monkeypatch, capsys):
    tiny = _tiny(monkeypatch)
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = ["run", "tiny-mlp-sgd", "--quiet", "--cache-dir", str(cache), "--out", str(out)]
    args += ["--methods", "magic", "grad-dot", "--protocol", "fixed-seed"]
    assert main([*args, "--drop-fractions", "0.05", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "| method | LDS drop 0.05 | LDS drop 0.5 |" in text
    rows = {
        r["method"]: r
        for r in json.loads((out / "tiny-mlp-sgd-fixed-seed.json").read_text())["results"]
    }
    assert rows["magic"]["error"] is None
    by_drop = rows["magic"]["extra"]["lds_by_drop"]
    assert by_drop["0.05"][0] > 0.9 and by_drop["0.5"][0] > 0.8
    assert by_drop["0.05"][0] > rows["grad-dot"]["extra"]["lds_by_drop"]["0.05"][0]

    # fixed-seed subset models: the full model's init (seed 0) and batch order, the
    # removed samples weighted 0 -- i.e. train_subset_models with init seed 0
    prepared = load_prepared(tiny, cache)
    values, kept = subset_ground_truth(prepared, "fixed-seed", 0.05)
    assert values.shape == (12, 16) and kept.shape == (12, 120 - 6)
    mask = torch.zeros(1, 120, dtype=torch.bool)
    mask[0, kept[3]] = True
    (sd,) = train_subset_models(
        tiny.model_factory,
        (prepared.x_train, prepared.y_train),
        mask,
        tiny.train_config,
        init_seeds=[0],
        verbose=False,
    )
    model = tiny.model_factory()
    model.load_state_dict(sd)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            model(prepared.x_test), prepared.y_test, reduction="none"
        )
    torch.testing.assert_close(-loss, values[3], rtol=1e-4, atol=1e-5)
    # the default protocol differs (independent initialisations)
    other, _ = subset_ground_truth(prepared, "default", 0.05)
    assert (other - values).abs().max() > 1e-3


def test_mnist_mlp_sgd_setting_reads_the_mnist_files(tmp_path, monkeypatch) -> None:
    """The SGD MNIST setting: minibatch SGD for a few epochs, data from the IDX files."""
    import dattri.benchmark.datasets.mnist as mnist_mod
    from dattri.benchmark.datasets.download import ChecksumError
    from tests.test_benchmark_data import make_mnist_folder

    setting = settings_mod.get_setting("mnist-mlp-sgd")
    cfg = setting.train_config
    assert cfg.optimizer == "sgd" and cfg.batch_size == 64 and cfg.epochs == 3
    make_mnist_folder(tmp_path, n_train=5000, n_test=500)
    with pytest.raises(ChecksumError, match="not the official one"):
        setting.load_data(tmp_path)  # test files are not the official ones: refused
    original = mnist_mod.create_mnist_dataset
    monkeypatch.setattr(
        mnist_mod,
        "create_mnist_dataset",
        lambda d, download=False, **kw: original(d, download=download, verify=False),
    )
    x, y, xt, yt = setting.load_data(tmp_path)
    assert yt.shape == (500,)
    assert x.shape == (5000, 784) and xt.shape == (500, 784)
    assert y.shape == (5000,) and int(y.max()) < 10
    with pytest.raises(FileNotFoundError, match="MNIST files"):
        setting.load_data(tmp_path / "missing")
