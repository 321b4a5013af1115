"""WikiText-2 / GPT-2 with a tokenizer and text written by the test (no download)."""

import warnings
import zipfile

import pytest
import torch
import transformers  # optional extra `nlp`, part of the `test` extra
from tokenizers import ByteLevelBPETokenizer
from torch.utils.data import DataLoader

import dattri.benchmark.datasets.wikitext2.data as wikitext_data
from dattri.benchmark.datasets.download import ChecksumError
from dattri.benchmark.datasets.text import default_corpus
from dattri.benchmark.datasets.wikitext2 import (
    create_gpt2_model,
    create_wikitext2_dataset,
    download_wikitext2,
    group_into_blocks,
    loss_wikitext2_gpt2,
    read_wikitext2_lines,
    train_wikitext2_gpt2,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("wikitext2")
    raw = root / "wikitext-2-raw"
    raw.mkdir()
    lines = default_corpus().splitlines(keepends=True)
    (raw / "wiki.train.raw").write_text("".join(lines[:70]) + " \n", encoding="utf-8")
    (raw / "wiki.valid.raw").write_text("".join(lines[70:120]), encoding="utf-8")
    (raw / "wiki.test.raw").write_text("".join(lines[120:]), encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        default_corpus().splitlines(),
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.save_model(str(root))
    tokenizer = transformers.GPT2TokenizerFast(
        vocab=str(root / "vocab.json"), merges=str(root / "merges.txt")
    )
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return root, tokenizer, config


def test_lines_read_like_huggingface(corpus):
    root, _, _ = corpus
    lines = read_wikitext2_lines(root / "wikitext-2-raw", "train")
    text = (root / "wikitext-2-raw" / "wiki.train.raw").read_text(encoding="utf-8")
    assert "".join(lines) == "".join(l if l.strip() else "" for l in text.splitlines(True))
    assert lines[-1] == ""  # the whitespace-only last line
    assert all(l.endswith("\n") for l in lines if l)
    with pytest.raises(ValueError, match="split"):
        read_wikitext2_lines(root, "valid")


def test_grouping_matches_brute_force():
    ids = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9], [10], [11, 12, 13]]
    blocks = group_into_blocks({"input_ids": ids}, block_size=2, group=3)
    # runs of 3 lines: [1..5] -> [1,2],[3,4] (5 dropped); [6..13] -> [6,7],[8,9],[10,11],[12,13]
    want = [[1, 2], [3, 4], [6, 7], [8, 9], [10, 11], [12, 13]]
    assert blocks["input_ids"].tolist() == want
    assert torch.equal(blocks["labels"], blocks["input_ids"])
    assert blocks["attention_mask"].tolist() == [[1, 1]] * 6


def test_create_dataset_tokenizes_and_groups(corpus):
    root, tokenizer, _ = corpus
    train, val = create_wikitext2_dataset(str(root), block_size=16, tokenizer=tokenizer)
    lines = read_wikitext2_lines(root / "wikitext-2-raw", "train")
    flat = [t for ids in tokenizer(lines)["input_ids"] for t in ids]  # < 1000 lines: one run
    assert len(train) == len(flat) // 16 > 0
    assert train[3]["input_ids"].tolist() == flat[48:64]
    assert sorted(train[0]) == ["attention_mask", "input_ids", "labels"]
    batch = next(iter(DataLoader(val, batch_size=4)))
    assert batch["input_ids"].shape == (4, 16)
    with pytest.raises(FileNotFoundError, match="download_wikitext2"):
        create_wikitext2_dataset(str(root / "none"), tokenizer=tokenizer, download=False)


def test_download_checks_the_published_checksum(tmp_path, monkeypatch):
    fake = tmp_path / "fake.zip"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("wikitext-2-raw/wiki.train.raw", "x\n")
    (tmp_path / "dest").mkdir()
    # an archive that is not the published one is refused (size and SHA-256 differ)
    bad = tmp_path / "dest" / "wikitext-2-raw-v1.zip"
    bad.write_bytes(fake.read_bytes())
    monkeypatch.setattr(wikitext_data, "WIKITEXT2_URLS", (fake.as_uri(),))
    with pytest.raises(ChecksumError, match="expected 4721645"):
        download_wikitext2(tmp_path / "dest", verbose=False)
    assert not bad.exists()  # the mismatching file is not kept


def test_train_and_per_example_loss(corpus, tmp_path):
    root, tokenizer, config = corpus
    train, val = create_wikitext2_dataset(str(root), block_size=16, tokenizer=tokenizer)
    loader = DataLoader(
        train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model = train_wikitext2_gpt2(loader, seed=0, epoch_num=2, config=config, lr=3e-3)
    assert not model.training
    path = tmp_path / "model_weights_0.pt"
    torch.save(model.state_dict(), path)
    values = loss_wikitext2_gpt2(str(path), DataLoader(val, batch_size=5), config=config)
    assert values.shape == (len(val),)
    # each value is transformers' own mean loss of that block alone
    with torch.no_grad():
        for i in (0, len(val) - 1):
            sample = {k: v.unsqueeze(0) for k, v in val[i].items()}
            torch.testing.assert_close(values[i], model(**sample).loss, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    start = create_gpt2_model(config=config)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    before = loss_wikitext2_gpt2(
        str(tmp_path / "start.pt"), DataLoader(val, batch_size=5), config=config
    )
    assert values.mean() < before.mean() - 0.3


def test_create_gpt2_model_without_weights_warns(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_gpt2_model(pretrained=tmp_path / "no-weights", download=False)
    assert any("randomly initialised" in str(w.message) for w in caught)
    assert model.config.n_layer == 12 and model.config.n_embd == 768


def test_missing_tokenizer_is_a_clear_error(corpus, tmp_path):
    root, _, _ = corpus
    with pytest.raises(OSError, match="tokenizer="):
        create_wikitext2_dataset(str(root), tokenizer=tmp_path / "no-tokenizer")
