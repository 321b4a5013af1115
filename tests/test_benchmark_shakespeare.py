"""Character-level Shakespeare with nanoGPT: preparation, dataset, training, retrain script."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import dattri
from dattri.benchmark.datasets.shakespeare_char import (
    NanoGPTTrainConfig,
    ShakespeareCharDataset,
    create_nanogpt_model,
    create_shakespeare_dataset,
    load_meta,
    load_nanogpt_checkpoint,
    loss_shakespeare_nanogpt,
    prepare_shakespeare_char,
    save_nanogpt_checkpoint,
    train_shakespeare_nanogpt,
)
from dattri.benchmark.datasets.text import default_corpus
from dattri.benchmark.models.train_gpt import nanogpt_lr, train_gpt
from dattri.script.dattri_retrain_nanogpt import main, parse_extra_params, retrain_nanogpt

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "dropout": 0.0}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    (folder / "input.txt").write_text(default_corpus(), encoding="utf-8")
    return folder


def test_prepare_writes_nanogpt_files(data_dir):
    text = default_corpus()
    out = prepare_shakespeare_char(data_dir, download=False, verbose=False)
    assert out == data_dir
    meta = load_meta(data_dir)
    chars = sorted(set(text))
    assert meta["vocab_size"] == len(chars)
    assert meta["itos"] == dict(enumerate(chars))
    assert meta["stoi"] == {c: i for i, c in enumerate(chars)}
    ids = np.array([meta["stoi"][c] for c in text], dtype=np.uint16)
    cut = int(len(text) * 0.9)
    assert np.array_equal(np.fromfile(data_dir / "train.bin", dtype=np.uint16), ids[:cut])
    assert np.array_equal(np.fromfile(data_dir / "val.bin", dtype=np.uint16), ids[cut:])


def test_prepare_refuses_the_package_folder(data_dir):
    package_dir = Path(dattri.__file__).parent / "benchmark" / "datasets" / "shakespeare_char"
    with pytest.raises(ValueError, match="inside the installed package"):
        prepare_shakespeare_char(package_dir, input_path=data_dir, download=False)
    with pytest.raises(FileNotFoundError, match="download=True"):
        prepare_shakespeare_char(data_dir / "empty", download=False)


def test_dataset_blocks_follow_upstream_indexing(data_dir):
    train, val = create_shakespeare_dataset(str(data_dir), block_size=16)  # prepares first
    data = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    assert len(train) == len(data) // 16
    for i in (0, 5, len(train) - 2):
        x, y = train[i]
        assert x.tolist() == data[16 * i : 16 * i + 16].tolist()
        assert y.tolist() == data[16 * i + 1 : 16 * i + 17].tolist()
    assert len(val) == len(np.fromfile(data_dir / "val.bin", dtype=np.uint16)) // 16
    # a last block without a following character gets the ignored target -1
    exact = ShakespeareCharDataset(np.arange(32, dtype=np.uint16), 16)
    assert exact[1][1].tolist() == [*range(17, 32), -1]
    xs, ys = exact.get_subset([1, 0])
    assert xs.shape == ys.shape == (2, 16)
    assert torch.equal(xs[1], exact[0][0])
    with pytest.raises(FileNotFoundError, match="prepare_shakespeare_char"):
        create_shakespeare_dataset(str(data_dir / "missing"))


def test_lr_schedule_is_nanogpts():
    cfg = NanoGPTTrainConfig()
    assert nanogpt_lr(0, cfg) == 0.0
    assert nanogpt_lr(50, cfg) == pytest.approx(5e-4)
    assert nanogpt_lr(100, cfg) == pytest.approx(1e-3)
    assert nanogpt_lr(2550, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert nanogpt_lr(5000, cfg) == pytest.approx(1e-4)
    assert nanogpt_lr(6000, cfg) == 1e-4


def test_train_checkpoint_and_target(data_dir, tmp_path):
    train, val = create_shakespeare_dataset(str(data_dir), block_size=16)
    vocab = load_meta(data_dir)["vocab_size"]
    loader = DataLoader(
        train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    cfg = NanoGPTTrainConfig(warmup_iters=2, eval_interval=5, eval_iters=2)
    kwargs = {"vocab_size": vocab, "model_config": TINY, "train_config": cfg}
    model = train_shakespeare_nanogpt(loader, seed=1, max_iters=10, **kwargs)
    loader2 = DataLoader(
        train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    again = train_shakespeare_nanogpt(loader2, seed=1, max_iters=10, **kwargs)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    path = save_nanogpt_checkpoint(model, tmp_path / "model_1" / "ckpt.pt", iter_num=10)
    loaded = load_nanogpt_checkpoint(path)
    assert loaded.config.n_head == 2
    val_loader = DataLoader(val, batch_size=4)
    values = loss_shakespeare_nanogpt(str(path), val_loader)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits, _ = model(x)
        want = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)
    torch.testing.assert_close(values, want)
    # a plain state dict loads too (head count given explicitly)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    plain = load_nanogpt_checkpoint(tmp_path / "plain.pt", n_head=2)
    torch.testing.assert_close(plain(x)[0], logits)
    untrained = create_nanogpt_model(vocab, **TINY)
    assert untrained.config.bias is False and untrained.config.n_embd == 16


def test_training_lowers_the_loss_and_keeps_best_val(data_dir):
    train, val = create_shakespeare_dataset(str(data_dir), block_size=16)
    vocab = load_meta(data_dir)["vocab_size"]
    loader = DataLoader(
        train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val_loader = DataLoader(val, batch_size=16)
    cfg = NanoGPTTrainConfig(
        max_iters=60, warmup_iters=5, eval_interval=20, eval_iters=10, lr_decay_iters=60
    )
    torch.manual_seed(1)
    start = create_nanogpt_model(vocab, **TINY).eval()
    model = create_nanogpt_model(vocab, **TINY)
    model.load_state_dict(start.state_dict())
    model, info = train_gpt(model, loader, cfg, val_loader, seed=0)
    x, y = next(iter(val_loader))
    with torch.no_grad():
        assert model(x, y)[1] < start(x, y)[1] - 0.3
        # the returned weights are those of the best validation estimate
        val_loss = sum(float(model(a, b)[1]) for a, b in val_loader) / len(val_loader)
    assert info["best_iter"] in (20, 40, 60)
    assert val_loss == pytest.approx(info["best_val_loss"], rel=1e-6)


def test_retrain_script_writes_models_and_indices(data_dir, tmp_path):
    save = tmp_path / "out"
    code = main(
        [
            "--save_path", str(save), "--data_path", str(data_dir), "--partition", "1", "3", "5",
            "--seed", "7", "--quiet", "--extra_param", "n_layer=1", "n_head=2", "n_embd=16",
            "block_size=16", "max_iters=2", "batch_size=4", "eval_iters=1",
        ]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in save.iterdir()) == ["model_2", "model_3"]
    train, _ = create_shakespeare_dataset(str(data_dir), block_size=16)
    for i in (1, 2):
        indices = [int(v) for v in (save / f"model_{i + 1}" / "indices.txt").read_text().split()]
        assert len(indices) == int(len(train) * 0.5) == len(set(indices))
        want = torch.randperm(len(train), generator=torch.Generator().manual_seed(7 + i - 1))
        assert indices == want[: len(indices)].tolist()
        blob = torch.load(save / f"model_{i + 1}" / "ckpt.pt", weights_only=True)
        assert blob["model_args"]["n_embd"] == 16
        assert blob["config"]["seed"] == 7 + i - 1
    first = (save / "model_2" / "indices.txt").read_text()
    assert first != (save / "model_3" / "indices.txt").read_text()


def test_retrain_script_errors_and_download_only(data_dir, tmp_path, capsys):
    assert main(["--data_path", str(data_dir), "--only_download_dataset", "--quiet"]) == 0
    assert (data_dir / "meta.pkl").is_file()
    assert main(["--dataset", "tinystories", "--data_path", str(data_dir)]) == 2
    assert "not supported" in capsys.readouterr().err
    assert main(["--data_path", str(data_dir), "--subset_ratio", "1.5", "--quiet"]) == 2
    assert main(["--data_path", str(data_dir), "--extra_param", "n_layers=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a int"):
        parse_extra_params(["max_iters=abc"])
    assert parse_extra_params(["bias=true", "learning_rate=0.5"]) == (
        {"bias": True},
        {"learning_rate": 0.5},
    )
    with pytest.raises(NotImplementedError, match="tinystories"):
        retrain_nanogpt(dataset="tinystories")


def test_download_is_checked_against_the_published_digest(tmp_path, monkeypatch):
    import dattri.benchmark.datasets.text as text_module
    from dattri.benchmark.datasets.download import ChecksumError

    fake = tmp_path / "fake.txt"
    fake.write_bytes(b"a" * text_module.SHAKESPEARE_SIZE)  # right size, wrong content
    monkeypatch.setattr(text_module, "SHAKESPEARE_URL", fake.as_uri())
    with pytest.raises(ChecksumError, match="sha256"):
        prepare_shakespeare_char(tmp_path / "out", verbose=False)
    assert not (tmp_path / "out" / "input.txt").exists()


def test_loads_a_nanogpt_style_checkpoint(tmp_path):
    """nanoGPT's own files: compiled-model key prefix, causal-mask buffers, model_args."""
    torch.manual_seed(0)
    model = create_nanogpt_model(65, **TINY).eval()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    state["_orig_mod.transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    args = {**TINY, "bias": False, "vocab_size": 65}
    torch.save({"model": state, "model_args": args, "iter_num": 3}, tmp_path / "ckpt.pt")
    loaded = load_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    x = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    del state["_orig_mod.lm_head.weight"], state["_orig_mod.transformer.wte.weight"]
    torch.save({"model": state, "model_args": args}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="not a GPT checkpoint"):
        load_nanogpt_checkpoint(tmp_path / "broken.pt")
