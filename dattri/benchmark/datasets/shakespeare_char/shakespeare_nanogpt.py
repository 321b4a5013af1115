"""nanoGPT on character-level Shakespeare: model, training, checkpoints, target values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dattri.benchmark.datasets._upstream import load_weights, per_batch_values
from dattri.benchmark.models._rng import seeded_rng
from dattri.benchmark.models.gpt import GPT, GPTConfig
from dattri.benchmark.models.train_gpt import NanoGPTTrainConfig, train_gpt

__all__ = [
    "SHAKESPEARE_GPT_CONFIG",
    "create_nanogpt_model",
    "load_nanogpt_checkpoint",
    "loss_shakespeare_nanogpt",
    "save_nanogpt_checkpoint",
    "train_shakespeare_nanogpt",
]

#: Upstream's Shakespeare model (``train_shakespeare_char.py``): 6 layers, 6 heads,
#: 384-dim, context 256, dropout 0.2, no biases (nanoGPT's ``train.py`` default).
SHAKESPEARE_GPT_CONFIG = {
    "n_layer": 6,
    "n_head": 6,
    "n_embd": 384,
    "block_size": 256,
    "dropout": 0.2,
    "bias": False,
}
_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def create_nanogpt_model(vocab_size: int = 65, **overrides: Any) -> GPT:
    """Create the Shakespeare character GPT (about 10.7M parameters).

    Args:
        vocab_size: Number of characters (65 for tinyshakespeare).
        **overrides: Other :class:`~dattri.benchmark.models.gpt.GPTConfig` fields
            (e.g. a small model for tests).

    Returns:
        The freshly initialised model.
    """
    args = {**SHAKESPEARE_GPT_CONFIG, "vocab_size": vocab_size, **overrides}
    return GPT(GPTConfig(**args))


def train_shakespeare_nanogpt(
    dataloader: DataLoader,
    seed: int = 0,
    device: str = "cpu",
    max_iters: int = 5000,
    *,
    val_dataloader: DataLoader | None = None,
    vocab_size: int = 65,
    model_config: dict[str, Any] | None = None,
    train_config: NanoGPTTrainConfig | None = None,
    verbose: bool = False,
) -> GPT:
    """Train the character GPT with upstream's nanoGPT recipe.

    The model is built after seeding (inside a forked RNG, the caller's state
    is untouched), then trained by
    :func:`~dattri.benchmark.models.train_gpt.train_gpt`: AdamW (lr 1e-3, betas
    (0.9, 0.99), weight decay 0.1 on matrices), 100 warm-up steps, cosine decay
    to 1e-4, gradient clipping at 1; with ``val_dataloader`` the weights of
    lowest validation loss are returned.

    Args:
        dataloader: Loader of ``(x, y)`` windows (upstream used batches of 32).
        seed: Seed of initialisation, dropout and unseeded shuffling.
        device: Training device.
        max_iters: Optimiser steps (overrides ``train_config.max_iters``).
        val_dataloader: Optional validation loader (keyword only).
        vocab_size: Characters in the vocabulary (keyword only).
        model_config: :class:`GPTConfig` overrides (keyword only).
        train_config: Other optimisation settings (keyword only).
        verbose: Show a progress bar (keyword only).

    Returns:
        The trained :class:`GPT` in eval mode.
    """
    base = NanoGPTTrainConfig() if train_config is None else train_config
    config = NanoGPTTrainConfig(**{**base.as_dict(), "max_iters": max_iters})
    with seeded_rng(seed):
        model = create_nanogpt_model(vocab_size, **(model_config or {}))
    model, _ = train_gpt(model, dataloader, config, val_dataloader, seed, device, verbose)
    return model


def save_nanogpt_checkpoint(model: GPT, path: str | os.PathLike, **extra: Any) -> Path:
    """Save a nanoGPT-style checkpoint ``{"model", "model_args", ...}``.

    Args:
        model: The trained model.
        path: Destination file (parents created).
        **extra: More entries (e.g. ``iter_num``, ``best_val_loss``, ``config``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model_args = {name: getattr(cfg, name) for name in _MODEL_ARGS}
    torch.save({"model": model.state_dict(), "model_args": model_args, **extra}, path)
    return path


def load_nanogpt_checkpoint(
    path: str | os.PathLike, device: str = "cpu", n_head: int | None = None
) -> GPT:
    """Load a GPT from a nanoGPT ``ckpt.pt`` or a plain state dict.

    A nanoGPT checkpoint carries its ``model_args``; for a plain state dict the
    sizes are read from the weights except the head count, which defaults to
    the Shakespeare model's 6 (pass ``n_head`` otherwise). A ``_orig_mod.``
    prefix left by ``torch.compile`` is removed.

    Args:
        path: The checkpoint.
        device: Device to load onto.
        n_head: Head count for a plain state dict.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a GPT checkpoint.
    """
    path = Path(path)
    blob = load_weights(path, "a nanoGPT checkpoint or GPT state dict", device, arg="path")
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        msg = f"{path} holds no GPT state dict."
        raise ValueError(msg)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if "transformer.wte.weight" not in state:
        msg = f"{path} is not a GPT checkpoint (no 'transformer.wte.weight')."
        raise ValueError(msg)
    if isinstance(blob.get("model_args"), dict):
        args = {k: blob["model_args"][k] for k in _MODEL_ARGS if k in blob["model_args"]}
    else:
        layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
        vocab_size, n_embd = state["transformer.wte.weight"].shape
        args = {
            "n_layer": len(layers),
            "n_head": SHAKESPEARE_GPT_CONFIG["n_head"] if n_head is None else n_head,
            "n_embd": n_embd,
            "block_size": state["transformer.wpe.weight"].shape[0],
            "bias": "transformer.ln_f.bias" in state,
            "vocab_size": vocab_size,
        }
    args["dropout"] = 0.0
    model = GPT(GPTConfig(**args)).to(device)
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state)
    if missing:
        msg = f"{path} lacks weights {sorted(missing)[:5]}; it is not this GPT's checkpoint."
        raise ValueError(msg)
    return model.eval()


def loss_shakespeare_nanogpt(
    model_path: str,
    dataloader: DataLoader,
    device: str = "cpu",
) -> torch.Tensor:
    """Mean next-character cross-entropy of every sample (the LDS target).

    Args:
        model_path: A nanoGPT checkpoint or GPT state dict.
        dataloader: Loader of ``(x, y)`` windows.
        device: Evaluation device.

    Returns:
        float tensor ``(n_samples,)`` on the CPU, in loader order (targets
        ``-1`` are left out of each mean).
    """
    model = load_nanogpt_checkpoint(model_path, device)

    def mean_next_char_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits, _ = model(x.to(device))
        y = y.to(device)
        ce = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none")
        return ce.sum(dim=1) / (y != -1).sum(dim=1).clamp_min(1)

    return per_batch_values(dataloader, mean_next_char_loss)
