"""WikiText-2 (raw, v1) tokenised into GPT-2 language-modelling blocks (upstream-compatible).

The raw archive is downloaded directly (no ``datasets`` dependency) and checked
against its published size and SHA-256. Lines are read as Hugging Face's
``wikitext-2-raw-v1`` presents them (one example per line, newline kept,
blank lines as ``""``), tokenised, and grouped as upstream does (its
``run_clm`` recipe): the token ids of each run of 1,000 consecutive lines are
concatenated and cut into blocks of ``block_size``, the remainder of each run
dropped; ``labels`` equal ``input_ids``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dattri.benchmark.datasets._optional import import_optional
from dattri.benchmark.datasets.download import download_file, get_dataset_dir

__all__ = [
    "GPT2_TOKENIZER",
    "GROUP_LINES",
    "WIKITEXT2_SHA256",
    "WIKITEXT2_SIZE",
    "WIKITEXT2_URLS",
    "TokenBlockDataset",
    "create_wikitext2_dataset",
    "download_wikitext2",
    "group_into_blocks",
    "import_transformers",
    "read_wikitext2_lines",
]

#: Mirrors of ``wikitext-2-raw-v1.zip`` (Salesforce's original S3 location first).
WIKITEXT2_URLS = (
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip",
)
#: Published size and SHA-256 of ``wikitext-2-raw-v1.zip``.
WIKITEXT2_SIZE = 4721645
WIKITEXT2_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
#: Tokenizer upstream uses.
GPT2_TOKENIZER = "openai-community/gpt2"
#: Lines grouped together before cutting blocks (``datasets.map``'s batch size).
GROUP_LINES = 1000
_SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def import_transformers() -> Any:
    """Import ``transformers`` or explain how to install it.

    Returns:
        The ``transformers`` module.

    Raises:
        ImportError: If it is not installed.
    """
    return import_optional(
        "transformers",
        "The WikiText-2 / GPT-2 benchmark needs the optional dependency "
        "`transformers`; install it with `pip install 'dattri[nlp]'`.",
    )


def download_wikitext2(path: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Download (verified) and extract ``wikitext-2-raw-v1.zip``.

    Args:
        path: Folder receiving the archive and ``wikitext-2-raw/``; defaults to
            ``~/.dattri/datasets/wikitext2``.
        verbose: Show a progress bar.

    Returns:
        The ``wikitext-2-raw`` folder.
    """
    root = get_dataset_dir("wikitext2") if path is None else Path(path).expanduser()
    archive = download_file(
        WIKITEXT2_URLS,
        root / "wikitext-2-raw-v1.zip",
        sha256=WIKITEXT2_SHA256,
        size=WIKITEXT2_SIZE,
        verbose=verbose,
    )
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                msg = f"Refusing to extract {name!r} from {archive}."
                raise ValueError(msg)
        zf.extractall(root)
    return root / "wikitext-2-raw"


def _raw_dir(path: str | os.PathLike | None, download: bool) -> Path:
    root = get_dataset_dir("wikitext2") if path is None else Path(path).expanduser()
    for candidate in (root, root / "wikitext-2-raw"):
        if (candidate / _SPLIT_FILES["train"]).is_file():
            return candidate
    if not download:
        msg = (
            f"No wiki.train.raw under {root}. Download it with "
            f"dattri.benchmark.datasets.wikitext2.download_wikitext2({str(root)!r})."
        )
        raise FileNotFoundError(msg)
    return download_wikitext2(root)


def read_wikitext2_lines(folder: str | os.PathLike, split: str) -> list[str]:
    """Lines of one split as Hugging Face's ``wikitext-2-raw-v1`` gives them.

    Args:
        folder: Folder with ``wiki.{train,valid,test}.raw``.
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        One string per line, newline kept; whitespace-only lines become ``""``.

    Raises:
        ValueError: If ``split`` is unknown.
    """
    if split not in _SPLIT_FILES:
        msg = f"`split` must be one of {sorted(_SPLIT_FILES)}, got {split!r}."
        raise ValueError(msg)
    text = (Path(folder) / _SPLIT_FILES[split]).read_text(encoding="utf-8")
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def group_into_blocks(
    encoded: Sequence[dict[str, Sequence[int]]] | dict[str, Sequence[Sequence[int]]],
    block_size: int,
    group: int = GROUP_LINES,
) -> dict[str, torch.Tensor]:
    """Concatenate tokenised lines per run of ``group`` lines and cut into blocks.

    Args:
        encoded: Tokenizer output: a dict of per-line lists (``input_ids`` and
            optionally ``attention_mask``).
        block_size: Tokens per block.
        group: Lines per run (the remainder of each run is dropped).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` int64 tensors ``(n, block_size)``.
    """
    ids = list(encoded["input_ids"])
    masks = list(encoded.get("attention_mask", [[1] * len(i) for i in ids]))
    blocks_ids: list[list[int]] = []
    blocks_mask: list[list[int]] = []
    for start in range(0, len(ids), group):
        flat_ids = [t for line in ids[start : start + group] for t in line]
        flat_mask = [m for line in masks[start : start + group] for m in line]
        usable = len(flat_ids) // block_size * block_size
        for b in range(0, usable, block_size):
            blocks_ids.append(flat_ids[b : b + block_size])
            blocks_mask.append(flat_mask[b : b + block_size])
    input_ids = torch.tensor(blocks_ids, dtype=torch.int64).reshape(-1, block_size)
    attention_mask = torch.tensor(blocks_mask, dtype=torch.int64).reshape(-1, block_size)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone()}


class TokenBlockDataset(Dataset):
    """Language-modelling blocks; sample ``i`` is a dict of ``(block_size,)`` tensors.

    The default collate function stacks samples into the ``(b, T)`` dict that
    ``GPT2LMHeadModel(**batch)`` takes.

    Args:
        tensors: ``input_ids``, ``attention_mask``, ``labels`` of shape ``(n, T)``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {v.shape[0] for v in tensors.values()}
        if len(lengths) != 1:
            msg = f"All tensors need the same number of rows, got {sorted(lengths)}."
            raise ValueError(msg)
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}

    @property
    def column_names(self) -> list[str]:
        """Field names of a sample (as a Hugging Face dataset lists them)."""
        return list(self.tensors)


def _load_tokenizer(tokenizer: Any) -> Callable[..., Any]:
    if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
        transformers = import_transformers()
        name = GPT2_TOKENIZER if tokenizer is None else os.fspath(tokenizer)
        try:
            return transformers.AutoTokenizer.from_pretrained(name, use_fast=True)
        except (OSError, ValueError) as exc:  # missing files / invalid repository id
            msg = (
                f"The tokenizer {name!r} could not be loaded ({str(exc).splitlines()[0]}). "
                "Put it in the Hugging Face cache, or pass `tokenizer=` a tokenizer object "
                "or a local folder with its files."
            )
            raise OSError(msg) from exc
    return tokenizer


def create_wikitext2_dataset(
    path: str | None = None,
    block_size: int = 512,
    *,
    tokenizer: Any = None,
    download: bool = True,
) -> tuple[TokenBlockDataset, TokenBlockDataset]:
    """Create tokenised WikiText-2 train and validation blocks for GPT-2.

    Args:
        path: Folder with ``wiki.*.raw`` (or ``wikitext-2-raw/`` inside it), where
            the archive is downloaded when missing; defaults to
            ``~/.dattri/datasets/wikitext2``. (Upstream passed it to ``datasets``
            as a cache folder.)
        block_size: Tokens per block, capped at the tokenizer's ``model_max_length``.
        tokenizer: A Hugging Face tokenizer (or its name / local path); defaults to
            ``openai-community/gpt2`` (keyword only).
        download: Download the raw archive when missing (keyword only).

    Returns:
        ``(train_dataset, eval_dataset)`` of :class:`TokenBlockDataset` (the
        validation split is the evaluation set, as upstream).

    Raises:
        ValueError: If ``block_size`` < 1.
    """
    if block_size < 1:
        msg = f"`block_size` must be >= 1, got {block_size}."
        raise ValueError(msg)
    folder = _raw_dir(path, download)
    tok = _load_tokenizer(tokenizer)
    max_length = getattr(tok, "model_max_length", None)
    if max_length is not None and block_size > max_length:
        warnings.warn(
            f"block_size={block_size} exceeds the tokenizer's model_max_length="
            f"{max_length}; using {max_length}.",
            stacklevel=2,
        )
        block_size = int(max_length)
    out = []
    for split in ("train", "validation"):
        lines = read_wikitext2_lines(folder, split)
        out.append(TokenBlockDataset(group_into_blocks(tok(lines), block_size)))
    return out[0], out[1]
