"""Character-level tinyshakespeare as nanoGPT's ``train.bin`` / ``val.bin`` / ``meta.pkl``.

:func:`prepare_shakespeare_char` is upstream's ``prepare.py`` as a function: it
reads (downloading if asked) Karpathy's ``input.txt``, builds the sorted
character vocabulary, splits the characters 90 / 10 and writes the ids as
``uint16`` to ``train.bin`` / ``val.bin`` with ``meta.pkl`` (``vocab_size``,
``itos``, ``stoi``). Unlike upstream, everything goes to a user data folder
(default ``~/.dattri/datasets/shakespeare_char``), never into the installed
package, and :func:`create_shakespeare_dataset` honours ``data_path``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import dattri
from dattri.benchmark.datasets._safe_pickle import safe_pickle_load
from dattri.benchmark.datasets.download import get_dataset_dir
from dattri.benchmark.datasets.text import create_char_datasets, load_shakespeare_text

__all__ = [
    "ShakespeareCharDataset",
    "create_shakespeare_dataset",
    "load_meta",
    "prepare_shakespeare_char",
]

_FILES = ("train.bin", "val.bin", "meta.pkl")


def _refuse_package_dir(path: Path) -> None:
    package = Path(dattri.__file__).resolve().parent
    target = path.expanduser().resolve()
    if target == package or package in target.parents:
        msg = (
            f"Refusing to write dataset files inside the installed package ({target}); "
            "pass a user data folder such as ~/.dattri/datasets/shakespeare_char."
        )
        raise ValueError(msg)


def prepare_shakespeare_char(
    data_path: str | os.PathLike | None = None,
    input_path: str | os.PathLike | None = None,
    download: bool = True,
    verbose: bool = True,
) -> Path:
    """Write ``train.bin``, ``val.bin`` and ``meta.pkl`` for the character model.

    Args:
        data_path: Output folder (created); defaults to
            ``~/.dattri/datasets/shakespeare_char`` (``$DATTRI_HOME`` honoured).
        input_path: ``input.txt`` (or its folder); defaults to ``data_path``.
        download: Download ``input.txt`` when missing (checked against its
            size, 1,115,394 bytes, and SHA-256).
        verbose: Show a progress bar while downloading.

    Returns:
        The output folder.

    Raises:
        ValueError: If ``data_path`` lies inside the installed package or the
            text has more than 65,535 distinct characters.
        FileNotFoundError: If ``input.txt`` is missing and ``download`` is False.
    """
    out = get_dataset_dir("shakespeare_char") if data_path is None else Path(data_path)
    out = out.expanduser()
    _refuse_package_dir(out)
    text = load_shakespeare_text(out if input_path is None else input_path, download, verbose)
    train, val = create_char_datasets(text, block_size=1, train_frac=0.9)
    if train.vocab_size > np.iinfo(np.uint16).max:
        msg = f"The text has {train.vocab_size} distinct characters; uint16 ids hold 65,535."
        raise ValueError(msg)
    out.mkdir(parents=True, exist_ok=True)
    train.data.numpy().astype(np.uint16).tofile(out / "train.bin")
    val.data.numpy().astype(np.uint16).tofile(out / "val.bin")
    meta = {
        "vocab_size": train.vocab_size,
        "itos": dict(enumerate(train.vocab)),
        "stoi": dict(train.stoi),
    }
    with (out / "meta.pkl").open("wb") as fh:
        pickle.dump(meta, fh)
    return out


def load_meta(data_path: str | os.PathLike) -> dict:
    """Read ``meta.pkl`` (``vocab_size``, ``itos``, ``stoi``) without running code.

    Raises:
        FileNotFoundError: If the file is missing.
    """
    path = Path(data_path).expanduser() / "meta.pkl"
    if not path.is_file():
        msg = f"{path} not found; run prepare_shakespeare_char({str(path.parent)!r}) first."
        raise FileNotFoundError(msg)
    return safe_pickle_load(path)


class ShakespeareCharDataset(Dataset):
    """Non-overlapping blocks of a ``uint16`` id array (upstream's ``CustomDataset``).

    Sample ``i`` is ``x = data[i T : (i + 1) T]`` and ``y = data[i T + 1 :
    (i + 1) T + 1]`` (int64), ``T = block_size``; there are ``len(data) // T``
    samples. When the last block has no following character its final target
    is ``-1`` (ignored by :class:`~dattri.benchmark.models.gpt.GPT`'s loss;
    upstream padded with ``0``, a real character id).

    Args:
        data: 1-D id array (a ``np.memmap`` of ``train.bin`` / ``val.bin``).
        block_size: Context length ``T``.

    Raises:
        ValueError: If ``block_size`` < 1 or ``data`` is shorter than one block.
    """

    def __init__(self, data: np.ndarray, block_size: int) -> None:
        if block_size < 1:
            msg = f"`block_size` must be >= 1, got {block_size}."
            raise ValueError(msg)
        if len(data) < block_size:
            msg = f"The data has {len(data)} ids, fewer than block_size={block_size}."
            raise ValueError(msg)
        self.data = data
        self.block_size = int(block_size)

    def __len__(self) -> int:
        return len(self.data) // self.block_size

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = int(idx)
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            msg = f"index {idx} out of range for {len(self)} samples"
            raise IndexError(msg)
        start = idx * self.block_size
        x = torch.from_numpy(np.asarray(self.data[start : start + self.block_size], np.int64))
        y = torch.from_numpy(
            np.asarray(self.data[start + 1 : start + 1 + self.block_size], np.int64)
        )
        if len(y) < self.block_size:
            y = torch.cat([y, torch.full((self.block_size - len(y),), -1, dtype=torch.int64)])
        return x, y

    def get_subset(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the samples at ``indices`` into ``(x, y)`` of shape ``(k, T)``."""
        pairs = [self[i] for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def create_shakespeare_dataset(
    data_path: str,
    block_size: int = 256,
) -> tuple[ShakespeareCharDataset, ShakespeareCharDataset]:
    """Create the character-level Shakespeare train and validation sets.

    Reads ``train.bin`` / ``val.bin`` from ``data_path``; when they are missing
    but ``data_path/input.txt`` exists they are prepared from it first (nothing
    is downloaded here: use :func:`prepare_shakespeare_char` or
    ``dattri_retrain_nanogpt --only_download_dataset``).

    Args:
        data_path: Folder with the prepared files.
        block_size: Characters per sample.

    Returns:
        ``(train_dataset, val_dataset)`` of :class:`ShakespeareCharDataset`.

    Raises:
        FileNotFoundError: If neither the prepared files nor ``input.txt`` exist.
    """
    root = Path(data_path).expanduser()
    if not all((root / name).is_file() for name in _FILES):
        if not (root / "input.txt").is_file():
            msg = (
                f"{root} has no train.bin/val.bin/meta.pkl. Prepare them with "
                f"dattri.benchmark.datasets.shakespeare_char.prepare_shakespeare_char"
                f"({str(root)!r}) (downloads input.txt) or "
                f"`dattri_retrain_nanogpt --only_download_dataset --data_path {root}`."
            )
            raise FileNotFoundError(msg)
        prepare_shakespeare_char(root, download=False, verbose=False)
    train = np.memmap(root / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(root / "val.bin", dtype=np.uint16, mode="r")
    return ShakespeareCharDataset(train, block_size), ShakespeareCharDataset(val, block_size)
