"""Data and models of the upstream-size generative settings of ``dattri-bench``.

Three settings run on the machinery of ``corpus-nanogpt``
(:mod:`dattri.benchmark.corpus_lm`): a sample is a token block ``x`` ``(T,)`` with
next-token targets ``y`` ``(T,)`` (the block shifted by one token, no ignored
position), and the model returns ``(B, V, T)`` logits, so that
``F.cross_entropy(model(x), y)`` is the mean next-token loss of a batch and
:func:`~dattri.benchmark.corpus_lm.sequence_loss` the mean next-token loss of each
sequence (the training loss and the LDS target). Models are deterministic
(dropout modules replaced by identities), so that the ground-truth models train
vectorised (:func:`~dattri.model_util.subset_train.train_subset_models`).

* ``shakespeare-nanogpt``: :class:`~dattri.benchmark.corpus_lm.CharLM` (dattri's
  nanoGPT) at upstream's size on tinyshakespeare blocks
  (:mod:`~dattri.benchmark.datasets.shakespeare_char`).
* ``wikitext2-gpt2``: ``transformers``' GPT-2 on WikiText-2 blocks
  (:mod:`~dattri.benchmark.datasets.wikitext2`), pretrained weights when they are in
  the local Hugging Face cache, built from the configuration otherwise.
* ``maestro-musictransformer``: the Music Transformer on MAESTRO windows
  (:mod:`~dattri.benchmark.datasets.maestro`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dattri.benchmark.corpus_lm import CharLM
from dattri.benchmark.datasets.download import get_dataset_dir
from dattri.benchmark.models.music_transformer import (
    MUSIC_VOCAB_SIZE,
    MusicTransformer,
    MusicTransformerConfig,
)

__all__ = [
    "GPT2_WEIGHTS",
    "SHAKESPEARE_VOCAB",
    "GPT2Factory",
    "NoDropout",
    "TokenLM",
    "create_music_lm",
    "create_shakespeare_lm",
    "load_maestro_windows",
    "load_shakespeare_blocks",
    "load_wikitext2_blocks",
    "strip_dropout",
]

Tensors = tuple[Tensor, Tensor, Tensor, Tensor]

#: Characters of tinyshakespeare (the model's vocabulary).
SHAKESPEARE_VOCAB = 65
#: Pretrained GPT-2 weights looked up in the local Hugging Face cache (or a folder
#: named by ``$DATTRI_GPT2_WEIGHTS``).
GPT2_WEIGHTS = "openai-community/gpt2"


class NoDropout(nn.Identity):
    """An identity standing in for a dropout module (``p`` is 0 for code reading it)."""

    p = 0.0


def strip_dropout(model: nn.Module) -> nn.Module:
    """Replace every dropout module of ``model`` by a :class:`NoDropout` (in place).

    Args:
        model: the model (its dropout probabilities should already be 0; the
            modules are removed so that vectorised training accepts the model).

    Returns:
        ``model``.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, NoDropout())
    return model


class TokenLM(nn.Module):
    """A token model whose forward returns ``(B, V, T)`` next-token logits.

    Args:
        lm: a module mapping token ids ``(B, T)`` to ``(B, T, V)`` logits, or to an
            output with a ``logits`` attribute (``transformers`` models).
        call_kwargs: extra keyword arguments of every call (e.g.
            ``{"use_cache": False}``).
    """

    def __init__(self, lm: nn.Module, call_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.lm = strip_dropout(lm)
        self.call_kwargs = dict(call_kwargs or {})

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, V, T)`` of token ids ``(B, T)``."""
        out = self.lm(input_ids=idx, **self.call_kwargs) if self.call_kwargs else self.lm(idx)
        logits = getattr(out, "logits", out)
        return logits.transpose(-1, -2)


# ------------------------------------------------------------------ shakespeare
def create_shakespeare_lm(
    n_layer: int = 6,
    n_head: int = 6,
    n_embd: int = 384,
    block_size: int = 256,
    vocab_size: int = SHAKESPEARE_VOCAB,
    bias: bool = False,
) -> CharLM:
    """The ``shakespeare-nanogpt`` model: upstream's nanoGPT sizes, deterministic.

    Upstream's model (6 layers, 6 heads, 384-d, context 256, no biases) with
    dropout 0 and an untied head (as ``corpus-nanogpt``), about 10.8M parameters.

    Args:
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: width.
        block_size: context length.
        vocab_size: characters.
        bias: biases in Linear and LayerNorm layers.

    Returns:
        A :class:`~dattri.benchmark.corpus_lm.CharLM`.
    """
    return CharLM.untied(vocab_size, block_size, n_layer, n_head, n_embd, bias=bias)


def _no_ignored_targets(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    keep = (y >= 0).all(1)
    return x[keep], y[keep]


def load_shakespeare_blocks(
    n_train: int | None = None, n_test: int = 200, block_size: int = 256
) -> Callable[..., Tensors]:
    """A ``Setting.load_data`` for tinyshakespeare character blocks.

    Sample ``i`` of a split is ``x = data[i T : (i + 1) T]``, ``y = data[i T + 1 :
    (i + 1) T + 1]`` (:class:`~dattri.benchmark.datasets.shakespeare_char.
    ShakespeareCharDataset`); the final block of a split, which lacks its last
    target, is dropped. Training samples are the first ``n_train`` blocks of
    ``train.bin``, test samples the first ``n_test`` blocks of ``val.bin``.

    Args:
        n_train: training blocks (default: all).
        n_test: test blocks.
        block_size: characters per block ``T``.

    Returns:
        ``load(data_dir, download=False) -> (x_train, y_train, x_test, y_test)``,
        int64 ``(n, T)``. ``data_dir`` (default ``~/.dattri/datasets/
        shakespeare_char``) holds ``train.bin``/``val.bin``/``meta.pkl`` or
        ``input.txt``; ``download`` fetches ``input.txt`` (published size and
        SHA-256 checked).
    """

    def load(data_dir: Path | None, download: bool = False) -> Tensors:
        from dattri.benchmark.datasets.shakespeare_char import (
            create_shakespeare_dataset,
            load_meta,
            prepare_shakespeare_char,
        )

        root = get_dataset_dir("shakespeare_char") if data_dir is None else Path(data_dir)
        root = root.expanduser()
        prepared = all((root / f).is_file() for f in ("train.bin", "val.bin", "meta.pkl"))
        if not prepared and not (root / "input.txt").is_file():
            if not download:
                msg = f"No train.bin/val.bin/meta.pkl or input.txt (tinyshakespeare) under {root}"
                raise FileNotFoundError(msg)
            prepare_shakespeare_char(root, download=True)
        train, val = create_shakespeare_dataset(str(root), block_size=block_size)
        vocab = int(load_meta(root)["vocab_size"])
        if vocab > SHAKESPEARE_VOCAB:
            msg = (
                f"{root / 'meta.pkl'}: the text has {vocab} distinct characters, the "
                f"shakespeare-nanogpt model {SHAKESPEARE_VOCAB}; use tinyshakespeare's input.txt."
            )
            raise ValueError(msg)
        out = []
        for ds, n in ((train, n_train), (val, n_test)):
            x, y = _no_ignored_targets(*ds.get_subset(list(range(len(ds)))))
            out += [x[:n], y[:n]] if n is not None else [x, y]
        return tuple(out)  # type: ignore[return-value]

    return load


# ------------------------------------------------------------------- wikitext-2
class GPT2Factory:
    """Builds the ``wikitext2-gpt2`` model: GPT-2 in a :class:`TokenLM`.

    The model is ``transformers.GPT2LMHeadModel`` with eager attention, no
    dropout and an untied head (initialised to the token embedding, so a
    pretrained model computes the same function as the tied original). With
    ``config`` the model is built from that ``GPT2Config`` (seed torch first);
    otherwise the pretrained ``weights`` are loaded from the local Hugging Face
    cache (or the folder ``$DATTRI_GPT2_WEIGHTS``), read once and kept; when they
    are not there, GPT-2 124M is built from ``GPT2Config()`` (one warning says so).

    Args:
        config: a ``transformers.GPT2Config`` (or a dict of its fields).
        weights: pretrained weights (hub name or local folder).
    """

    def __init__(self, config: Any = None, weights: str | None = GPT2_WEIGHTS) -> None:
        self.config = config
        self.weights = weights
        self._state: dict[str, Tensor] | None = None
        self._base_config: Any = None
        self.pretrained: bool | None = None

    def __deepcopy__(self, memo: dict) -> GPT2Factory:
        """The factory itself: a builder whose weight cache is read-only (no 500 MB copy)."""
        return self

    def _resolve(self) -> None:
        from dattri.benchmark.datasets.wikitext2.data import import_transformers

        transformers = import_transformers()
        if self.config is not None:
            cfg = self.config
            if isinstance(cfg, dict):
                cfg = transformers.GPT2Config(**cfg)
            self._base_config, self.pretrained = cfg, False
            return
        name = os.environ.get("DATTRI_GPT2_WEIGHTS", self.weights)
        try:
            model = transformers.GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"Pretrained GPT-2 weights {name!r} are not in the local Hugging Face cache "
                f"({str(exc).splitlines()[0]}); wikitext2-gpt2 builds GPT-2 124M from "
                "GPT2Config(). Download them (e.g. huggingface-cli download "
                "openai-community/gpt2) or set DATTRI_GPT2_WEIGHTS to a local folder.",
                stacklevel=3,
            )
            self._base_config, self.pretrained = transformers.GPT2Config(), False
            return
        self._base_config = model.config
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.pretrained = True

    def fingerprint(self) -> dict[str, Any]:
        """Where the starting weights come from, for the prepared-cache fingerprint.

        A cache prepared from pretrained weights must not be resumed or reused once
        they are gone (or the reverse): the ground-truth models would start elsewhere.
        """
        if self.pretrained is None:
            self._resolve()
        source = "config" if self.config is not None else "GPT2Config()"
        if self.pretrained:
            source = os.environ.get("DATTRI_GPT2_WEIGHTS", self.weights)
        return {"gpt2_weights": source, "pretrained": bool(self.pretrained)}

    def __call__(self) -> TokenLM:
        """A fresh model (pretrained weights, or initialised from torch's RNG)."""
        from dattri.benchmark.datasets.wikitext2.data import import_transformers

        transformers = import_transformers()
        if self.pretrained is None:
            self._resolve()
        cfg = transformers.GPT2Config(**self._base_config.to_dict())
        cfg.tie_word_embeddings = False
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        cfg._attn_implementation = "eager"
        lm = transformers.GPT2LMHeadModel(cfg)
        if self._state is not None:
            state = dict(self._state)
            state.setdefault("lm_head.weight", state["transformer.wte.weight"])
            lm.load_state_dict(state, strict=False)
            with torch.no_grad():
                lm.lm_head.weight.copy_(state["transformer.wte.weight"])
        return TokenLM(lm, call_kwargs={"use_cache": False})


def _wikitext_tokenizer(root: Path, download: bool) -> Any:
    """``root/tokenizer`` if present, else GPT-2's from the Hugging Face cache."""
    from dattri.benchmark.datasets.wikitext2.data import GPT2_TOKENIZER, import_transformers

    transformers = import_transformers()
    local = root / "tokenizer"
    name = str(local) if local.is_dir() else GPT2_TOKENIZER
    try:
        return transformers.AutoTokenizer.from_pretrained(
            name, use_fast=True, local_files_only=not download
        )
    except (OSError, ValueError) as exc:
        msg = (
            f"No tokenizer: {name!r} could not be loaded ({str(exc).splitlines()[0]}); put "
            f"a tokenizer folder at {local}, or fetch GPT-2's into the Hugging Face cache."
        )
        raise FileNotFoundError(msg) from exc


def load_wikitext2_blocks(
    n_train: int | None = None, n_test: int | None = None, block_size: int = 512
) -> Callable[..., Tensors]:
    """A ``Setting.load_data`` for WikiText-2 token blocks.

    The raw text is tokenised and grouped as
    :func:`~dattri.benchmark.datasets.wikitext2.create_wikitext2_dataset` does, in
    blocks of ``block_size + 1`` tokens: ``x`` is a block's first ``block_size``
    tokens, ``y`` its last ``block_size`` (every position has a target). Training
    samples are the first ``n_train`` blocks of the train split, test samples the
    first ``n_test`` of the validation split.

    Args:
        n_train: training blocks (default: all).
        n_test: test blocks (default: all).
        block_size: tokens per sample ``T``.

    Returns:
        ``load(data_dir, download=False) -> (x_train, y_train, x_test, y_test)``,
        int64 ``(n, T)``. ``data_dir`` (default ``~/.dattri/datasets/wikitext2``)
        holds ``wiki.{train,valid,test}.raw`` (or ``wikitext-2-raw/`` with them) and
        optionally ``tokenizer/`` (default: GPT-2's tokenizer from the Hugging Face
        cache); ``download`` fetches the archive (published SHA-256 checked) and
        the tokenizer.
    """

    def load(data_dir: Path | None, download: bool = False) -> Tensors:
        from dattri.benchmark.datasets.wikitext2 import create_wikitext2_dataset

        root = get_dataset_dir("wikitext2") if data_dir is None else Path(data_dir)
        root = root.expanduser()
        if not download and not any(
            (d / "wiki.train.raw").is_file() for d in (root, root / "wikitext-2-raw")
        ):
            msg = f"No wiki.train.raw under {root} (WikiText-2 raw, v1)"
            raise FileNotFoundError(msg)
        tokenizer = _wikitext_tokenizer(root, download)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Token indices sequence length")
            train, val = create_wikitext2_dataset(
                str(root), block_size + 1, tokenizer=tokenizer, download=download
            )
        out = []
        for ds, n in ((train, n_train), (val, n_test)):
            ids = ds.tensors["input_ids"][:n]
            out += [ids[:, :-1].contiguous(), ids[:, 1:].contiguous()]
        return tuple(out)  # type: ignore[return-value]

    return load


# ---------------------------------------------------------------------- maestro
def create_music_lm(
    n_layers: int = 6,
    num_heads: int = 8,
    d_model: int = 512,
    dim_feedforward: int = 1024,
    max_sequence: int = 256,
) -> TokenLM:
    """The ``maestro-musictransformer`` model: upstream's sizes, no dropout.

    Args:
        n_layers: transformer layers.
        num_heads: attention heads.
        d_model: width.
        dim_feedforward: feed-forward width.
        max_sequence: longest input (length of the relative position table).

    Returns:
        A :class:`TokenLM` around a :class:`~dattri.benchmark.models.music_transformer.
        MusicTransformer` with relative attention (about 13.1M parameters).
    """
    cfg = MusicTransformerConfig(
        n_layers=n_layers,
        num_heads=num_heads,
        d_model=d_model,
        dim_feedforward=dim_feedforward,
        dropout=0.0,
        max_sequence=max_sequence,
        rpr=True,
        vocab_size=MUSIC_VOCAB_SIZE,
    )
    return TokenLM(MusicTransformer(cfg))


def load_maestro_windows(
    n_train: int | None = 5000, n_test: int | None = 178, block_size: int = 256
) -> Callable[..., Tensors]:
    """A ``Setting.load_data`` for MAESTRO v2.0.0 event windows.

    Pieces are encoded with upstream's encoder into ``maestro-v2.0.0-processed/``
    (:func:`~dattri.benchmark.datasets.maestro.prepare_maestro`, once) and cut into
    consecutive windows (:class:`~dattri.benchmark.datasets.maestro.MaestroDataset`):
    ``x`` = events ``[o, o + T)``, ``y`` = events ``[o + 1, o + T + 1)``. Training
    samples are the first ``n_train`` windows of the train split (upstream's
    5,000), test samples the first ``n_test`` of the validation split.

    Args:
        n_train: training windows (``None``: all).
        n_test: test windows (``None``: all).
        block_size: events per window ``T``.

    Returns:
        ``load(data_dir, download=False) -> (x_train, y_train, x_test, y_test)``,
        int64 ``(n, T)``. ``data_dir`` (default ``~/.dattri/datasets/maestro``) holds
        ``maestro-v2.0.0-processed/`` or ``maestro-v2.0.0/`` (the extracted MIDI
        archive with ``maestro-v2.0.0.json``); ``download`` fetches the archive
        (MD5 checked).
    """

    def load(data_dir: Path | None, download: bool = False) -> Tensors:
        from dattri.benchmark.datasets.maestro import (
            MAESTRO_JSON,
            MaestroDataset,
            download_maestro,
            prepare_maestro,
        )

        root = get_dataset_dir("maestro") if data_dir is None else Path(data_dir)
        root = root.expanduser()
        processed = root / "maestro-v2.0.0-processed"
        if not (processed / "train").is_dir():
            midi_root = root / "maestro-v2.0.0"
            if not (midi_root / MAESTRO_JSON).is_file():
                if not download:
                    msg = (
                        f"No {processed.name}/ or {midi_root.name}/{MAESTRO_JSON} under "
                        f"{root} (MAESTRO v2.0.0 MIDI)"
                    )
                    raise FileNotFoundError(msg)
                midi_root = download_maestro(root)
            prepare_maestro(midi_root, processed)
        out = []
        for split, n in (("train", n_train), ("val", n_test)):
            ds = MaestroDataset.from_folder(processed / split, max_seq=block_size)
            if len(ds) == 0:
                msg = f"{processed / split} has no piece longer than {block_size} events."
                raise ValueError(msg)
            idx = range(len(ds) if n is None else min(n, len(ds)))
            out += [torch.stack([ds[i][0] for i in idx]), torch.stack([ds[i][1] for i in idx])]
        return tuple(out)  # type: ignore[return-value]

    return load
