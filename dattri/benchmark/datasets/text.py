"""Character-level text datasets for the small GPT benchmark."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dattri.benchmark.datasets._corpus import CORPUS
from dattri.benchmark.datasets.download import download_file, get_dataset_dir

__all__ = [
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_SIZE",
    "SHAKESPEARE_URL",
    "CharTextDataset",
    "create_char_datasets",
    "create_shakespeare_dataset",
    "default_corpus",
    "load_shakespeare_text",
]

#: Karpathy's tinyshakespeare (about 1.1 MB of public-domain Shakespeare).
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
#: Size in bytes of the official ``input.txt`` (1,115,394 ASCII characters).
SHAKESPEARE_SIZE = 1115394
#: SHA-256 of the official ``input.txt`` (the digest Hugging Face's ``tiny_shakespeare``
#: loader recorded for this URL; widely used to pin the file).
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def default_corpus() -> str:
    """Return the small offline corpus shipped with dattri (about 8 KB of prose)."""
    return CORPUS


class CharTextDataset(Dataset):
    """Next-character prediction samples cut from one text.

    The text is encoded with a character vocabulary (sorted distinct characters
    unless ``vocab`` is given). Sample ``i`` starts at offset ``i * stride`` and
    is ``(x, y)`` with ``x = ids[s : s + block_size]`` and
    ``y = ids[s + 1 : s + block_size + 1]``.

    Args:
        text: The text to cut into samples.
        block_size: Context length ``T`` of each sample.
        vocab: Characters of the vocabulary, in id order. Defaults to
            ``sorted(set(text))``. Pass the train set's ``vocab`` to a validation
            set so both share ids.
        stride: Offset between consecutive samples; defaults to ``block_size``
            (non-overlapping windows).

    Attributes:
        vocab: Tuple of characters; ``vocab[i]`` is the character of id ``i``.
        stoi: Dict character -> id.
        data: int64 tensor ``(len(text),)`` of encoded characters.

    Raises:
        ValueError: If ``block_size``/``stride`` are not positive, the text has at
            most ``block_size`` characters, or it contains characters missing from
            ``vocab``.
    """

    def __init__(
        self,
        text: str,
        block_size: int,
        vocab: Sequence[str] | None = None,
        stride: int | None = None,
    ) -> None:
        if not isinstance(text, str):
            msg = f"`text` must be a str, got {type(text).__name__}."
            raise TypeError(msg)
        if block_size < 1:
            msg = f"`block_size` must be >= 1, got {block_size}."
            raise ValueError(msg)
        stride = block_size if stride is None else stride
        if stride < 1:
            msg = f"`stride` must be >= 1, got {stride}."
            raise ValueError(msg)
        if len(text) <= block_size:
            msg = (
                f"`text` has {len(text)} characters; it needs more than "
                f"block_size={block_size}. Use a longer text or a smaller block_size."
            )
            raise ValueError(msg)
        self.vocab: tuple[str, ...] = tuple(sorted(set(text)) if vocab is None else vocab)
        if any(len(ch) != 1 for ch in self.vocab):
            msg = "`vocab` entries must be single characters."
            raise ValueError(msg)
        if len(set(self.vocab)) != len(self.vocab):
            msg = "`vocab` must not repeat characters."
            raise ValueError(msg)
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(self.vocab)}
        codes = np.array([ord(ch) for ch in self.vocab], dtype=np.int64)
        self._code_order = np.argsort(codes)
        self._sorted_codes = codes[self._code_order]
        self.block_size = int(block_size)
        self.stride = int(stride)
        self.data = self.encode(text)
        self._len = (len(self.data) - self.block_size - 1) // self.stride + 1

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters (the GPT's ``vocab_size``)."""
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Encode a string into an int64 tensor of shape ``(len(text),)``.

        Raises:
            ValueError: If ``text`` has a character outside the vocabulary.
        """
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, points)
        pos = np.minimum(pos, len(self._sorted_codes) - 1)
        if not np.array_equal(self._sorted_codes[pos], points):
            unknown = sorted(set(text) - self.stoi.keys())
            msg = f"`text` has characters {unknown!r} that are not in the vocabulary."
            raise ValueError(msg)
        return torch.from_numpy(self._code_order[pos].astype(np.int64))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Decode ids (any 1-D sequence or tensor) back into a string."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return "".join(self.vocab[int(i)] for i in ids)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            msg = f"index {index} out of range for {self._len} samples"
            raise IndexError(msg)
        start = index * self.stride
        chunk = self.data[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once.

        Returns:
            ``(x, y)`` int64 tensors of shape ``(len(self), block_size)``.
        """
        windows = self.data.unfold(0, self.block_size + 1, self.stride)[: self._len]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def create_char_datasets(
    text: str | None = None,
    block_size: int = 64,
    train_frac: float = 0.9,
    stride: int | None = None,
) -> tuple[CharTextDataset, CharTextDataset]:
    """Split a text into train/validation character datasets with one vocabulary.

    The first ``train_frac`` of the characters go to the train set, the rest to
    the validation set; the vocabulary is built from the whole text.

    Args:
        text: Text to use; defaults to :func:`default_corpus`.
        block_size: Context length of each sample.
        train_frac: Fraction of characters in the train split, in ``(0, 1)``.
        stride: Sample stride (defaults to ``block_size``).

    Returns:
        ``(train_ds, val_ds)`` sharing ``vocab``.

    Raises:
        ValueError: If ``train_frac`` is outside ``(0, 1)`` or a split is too
            short for ``block_size``.
    """
    text = default_corpus() if text is None else text
    if not 0.0 < train_frac < 1.0:
        msg = f"`train_frac` must be in (0, 1), got {train_frac}."
        raise ValueError(msg)
    vocab = sorted(set(text))
    cut = int(len(text) * train_frac)
    train = CharTextDataset(text[:cut], block_size, vocab=vocab, stride=stride)
    val = CharTextDataset(text[cut:], block_size, vocab=vocab, stride=stride)
    return train, val


def load_shakespeare_text(
    path: str | os.PathLike | None = None,
    download: bool = False,
    verbose: bool = True,
) -> str:
    """Read tinyshakespeare's ``input.txt``.

    Args:
        path: The ``input.txt`` file or a folder holding it; defaults to
            ``~/.dattri/datasets/shakespeare_char``.
        download: Download the file from :data:`SHAKESPEARE_URL` when missing
            (verified by its size and SHA-256).
        verbose: Show a progress bar while downloading.

    Returns:
        The text.

    Raises:
        FileNotFoundError: If the file is missing and ``download`` is False.
    """
    target = get_dataset_dir("shakespeare_char") if path is None else Path(path)
    target = target.expanduser()
    if target.suffix != ".txt":
        target = target / "input.txt"
    if not target.is_file():
        if not download:
            msg = (
                f"{target} not found. Pass download=True to fetch {SHAKESPEARE_URL}, "
                "or point `path` at a local input.txt."
            )
            raise FileNotFoundError(msg)
        download_file(
            SHAKESPEARE_URL,
            target,
            sha256=SHAKESPEARE_SHA256,
            size=SHAKESPEARE_SIZE,
            verbose=verbose,
        )
    return target.read_text(encoding="utf-8")


def create_shakespeare_dataset(
    path: str | os.PathLike | None = None,
    block_size: int = 256,
    download: bool = False,
    train_frac: float = 0.9,
    stride: int | None = None,
    verbose: bool = True,
) -> tuple[CharTextDataset, CharTextDataset]:
    """Character-level tinyshakespeare train/validation sets (90/10 split).

    Unlike upstream, ``path`` is honoured and nothing is written inside the
    installed package.

    Args:
        path: ``input.txt`` or its folder (see :func:`load_shakespeare_text`).
        block_size: Context length (256 in the nanoGPT benchmark).
        download: Download the text when missing.
        train_frac: Fraction of characters in the train split.
        stride: Sample stride (defaults to ``block_size``).
        verbose: Show a progress bar while downloading.

    Returns:
        ``(train_ds, val_ds)`` sharing one vocabulary (65 characters for the
        official file).
    """
    text = load_shakespeare_text(path, download=download, verbose=verbose)
    return create_char_datasets(text, block_size, train_frac=train_frac, stride=stride)
