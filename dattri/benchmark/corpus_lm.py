"""The ``corpus-nanogpt`` benchmark setting: a char-level GPT on the shipped corpus.

Samples are fixed blocks of the corpus shipped with dattri
(:func:`~dattri.benchmark.datasets.text.default_corpus`): block ``b`` is the input
``ids[b T : b T + T]`` with next-character targets ``ids[b T + 1 : b T + T + 1]``.
A fixed, seeded choice of blocks is the test set, the other blocks the training set.

The model is dattri's nanoGPT-style :class:`~dattri.benchmark.models.gpt.GPT` (plain
torch: Embedding, LayerNorm, Linear), untied head, no dropout modules, wrapped so that
its output is ``(B, V, T)`` logits: ``F.cross_entropy(model(x), y)`` is then the mean
next-token loss of a batch of sequences and every benchmark method (written for
``cross_entropy(model(x), y)``) runs on it unchanged. The target of a query sequence is
its mean next-token loss, as in the LDS ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dattri.benchmark.datasets.text import CharTextDataset, default_corpus
from dattri.benchmark.models.gpt import GPT, GPTConfig

__all__ = [
    "CORPUS_BLOCK",
    "CharLM",
    "corpus_blocks",
    "create_corpus_lm",
    "sequence_loss",
]

#: characters per sample (context length of the model).
CORPUS_BLOCK = 32


class CharLM(nn.Module):
    """A :class:`GPT` whose forward returns ``(B, V, T)`` next-token logits.

    Args:
        config: the GPT configuration (dropout must be 0; dropout modules are
            replaced by identities so that the model is deterministic and can be
            trained vectorised).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.dropout != 0:
            msg = "CharLM needs GPTConfig.dropout == 0 (deterministic benchmark model)."
            raise ValueError(msg)
        self.gpt = GPT(config)
        for name, module in list(self.gpt.named_modules()):
            if isinstance(module, nn.Dropout):
                parent, _, attr = name.rpartition(".")
                setattr(self.gpt.get_submodule(parent), attr, nn.Identity())

    @classmethod
    def untied(
        cls,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        bias: bool = True,
    ) -> CharLM:
        """A model of these sizes with dropout 0 and an output head untied from the embedding.

        Args:
            vocab_size: token ids.
            block_size: context length.
            n_layer: transformer blocks.
            n_head: attention heads.
            n_embd: width.
            bias: biases in Linear and LayerNorm layers.

        Returns:
            The :class:`CharLM`.
        """
        return cls(
            GPTConfig(
                vocab_size=vocab_size,
                block_size=block_size,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                dropout=0.0,
                bias=bias,
                tie_weights=False,
            )
        )

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, V, T)`` of token ids ``(B, T)``."""
        logits, _ = self.gpt(idx)
        return logits.transpose(-1, -2)


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sequence mean next-token loss, ``(B, V, T), (B, T) -> (B,)`` (-1 ignored)."""
    per_token = F.cross_entropy(logits, targets, reduction="none", ignore_index=-1)
    valid = (targets != -1).to(per_token.dtype)
    return (per_token * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)


def create_corpus_lm(
    n_layer: int = 1, n_head: int = 2, n_embd: int = 16, vocab_size: int | None = None
) -> CharLM:
    """The benchmark model for the shipped corpus.

    Args:
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: width.
        vocab_size: characters (default: those of the shipped corpus).

    Returns:
        A :class:`CharLM` with context :data:`CORPUS_BLOCK`, untied head, biases.
    """
    vocab = len(set(default_corpus())) if vocab_size is None else vocab_size
    return CharLM.untied(vocab, CORPUS_BLOCK, n_layer, n_head, n_embd)


def corpus_blocks(
    n_test: int = 24, n_train: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed blocks of the shipped corpus, split into train and test by block.

    Args:
        n_test: number of test blocks (drawn with ``seed``).
        n_train: number of training blocks (default: all the others, in corpus order).
        seed: seed of the test-block choice.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` int64 ``(n, CORPUS_BLOCK)`` tensors.

    Raises:
        ValueError: if the corpus has too few blocks.
    """
    ds = CharTextDataset(default_corpus(), CORPUS_BLOCK)
    x, y = ds.as_tensors()
    n = x.shape[0]
    if n_test < 1 or n_test >= n:
        msg = f"n_test must be in [1, {n - 1}] (the corpus has {n} blocks), got {n_test}."
        raise ValueError(msg)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test = perm[:n_test].sort().values
    train = perm[n_test:].sort().values
    if n_train is not None:
        train = train[:n_train]
    return x[train], y[train], x[test], y[test]


def load_corpus(
    n_test: int = 24, n_train: int | None = None
) -> Callable[[Path | None], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """A ``Setting.load_data`` for the shipped corpus (the data directory is unused).

    Args:
        n_test: test blocks.
        n_train: training blocks (default all others).

    Returns:
        ``load(data_dir) -> (x_train, y_train, x_test, y_test)``.
    """

    def load(data_dir: Path | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return corpus_blocks(n_test=n_test, n_train=n_train)

    return load
