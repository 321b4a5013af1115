"""Music Transformer training and evaluation on MAESTRO (upstream's functions)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.benchmark.datasets._upstream import load_weights, per_batch_values
from dattri.benchmark.models._rng import seeded_rng
from dattri.benchmark.models.music_transformer import (
    TOKEN_PAD,
    MusicTransformer,
    MusicTransformerConfig,
)

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPSILON",
    "LR",
    "config_from_state_dict",
    "create_musictransformer_model",
    "loss_maestro_musictransformer",
    "train_maestro_musictransformer",
]

#: Upstream's constant learning rate and Adam settings (from the Transformer paper).
LR = 1e-4
ADAM_BETAS = (0.9, 0.98)
ADAM_EPSILON = 10e-9


def create_musictransformer_model(
    device: str = "cpu", *, config: MusicTransformerConfig | None = None
) -> MusicTransformer:
    """Create the benchmark Music Transformer (6 layers, 8 heads, d 512, RPR, seq 256).

    Args:
        device: Device to put the model on.
        config: Other sizes (e.g. a small model for tests); keyword only.

    Returns:
        The model (about 13.1M parameters with the default sizes).
    """
    return MusicTransformer(config).to(device)


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> MusicTransformerConfig:
    """Recover the model sizes from a Music Transformer state dict.

    ``num_heads`` is read from the relative table (``d_model / Er.shape[1]``);
    a model without RPR is assumed to have upstream's 8 heads.

    Args:
        state_dict: Our or upstream's state dict.

    Returns:
        The configuration (dropout 0.1, irrelevant at evaluation).

    Raises:
        KeyError: If the dict is not a Music Transformer's.
    """
    prefix = "transformer.encoder.layers."
    layers = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    vocab_size, d_model = state_dict["embedding.weight"].shape
    er = state_dict.get(prefix + "0.self_attn.Er")
    return MusicTransformerConfig(
        n_layers=len(layers),
        num_heads=d_model // er.shape[1] if er is not None else 8,
        d_model=d_model,
        dim_feedforward=state_dict[prefix + "0.linear1.weight"].shape[0],
        max_sequence=state_dict["positional_encoding.pe"].shape[0],
        rpr=er is not None,
        vocab_size=vocab_size,
    )


def _load_model(model_path: str | os.PathLike, device: str) -> MusicTransformer:
    path = Path(model_path)
    state = load_weights(path, "a saved Music Transformer state dict", device)
    if not isinstance(state, dict) or "embedding.weight" not in state:
        msg = f"{path} is not a Music Transformer state dict (no 'embedding.weight')."
        raise ValueError(msg)
    model = MusicTransformer(config_from_state_dict(state)).to(device)
    model.load_state_dict(state)
    return model.eval()


def _xy(batch: Any, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        msg = "MAESTRO batches must be (x, tgt) pairs of (batch, seq) token ids."
        raise TypeError(msg)
    return batch[0].to(device), batch[1].to(device)


def train_maestro_musictransformer(
    train_dataloader: DataLoader,
    seed: int = 0,
    num_epoch: int = 20,
    device: str = "cpu",
    *,
    config: MusicTransformerConfig | None = None,
    lr: float = LR,
    verbose: bool = False,
) -> MusicTransformer:
    """Train a Music Transformer with upstream's recipe.

    Adam (lr 1e-4 constant, betas (0.9, 0.98), eps 1e-8), cross-entropy over all
    positions ignoring padding, ``num_epoch`` passes. The model is built after
    seeding, inside ``torch.random.fork_rng`` (the caller's RNG is untouched),
    so the same seed and loader order give the same model. Upstream also
    evaluated on the training loader after each epoch and returned the model
    object it was training (that is, the final model); the evaluation is
    skipped here, the result is the same final model.

    Args:
        train_dataloader: Loader of ``(x, tgt)`` batches ``(b, seq)``.
        seed: Seed of initialisation, dropout and unseeded shuffling.
        num_epoch: Number of epochs.
        device: Training device.
        config: Model sizes (keyword only; default: the benchmark model).
        lr: Learning rate (keyword only).
        verbose: Show a progress bar (keyword only).

    Returns:
        The trained model in eval mode.

    Raises:
        ValueError: If ``num_epoch`` is negative.
    """
    if num_epoch < 0:
        msg = f"`num_epoch` must be >= 0, got {num_epoch}."
        raise ValueError(msg)
    with seeded_rng(seed, device):
        model = create_musictransformer_model(device, config=config)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPSILON)
        for _ in tqdm(range(num_epoch), desc="train music transformer", disable=not verbose):
            for batch in train_dataloader:
                x, tgt = _xy(batch, device)
                logits = model(x)
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=TOKEN_PAD
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


def loss_maestro_musictransformer(
    model_path: str,
    dataloader: DataLoader,
    device: str = "cpu",
) -> torch.Tensor:
    """Log-likelihood of each sample's last event: the **negative** cross-entropy.

    Upstream's ground-truth target for MAESTRO: for every sample, ``-CE`` of the
    model's prediction at the last position against the last target event
    (``0`` when that target is padding). Higher means the model finds the
    sample more likely. The model sizes are read from the state dict.

    Args:
        model_path: Saved state dict (ours or upstream's).
        dataloader: Loader of ``(x, tgt)`` batches.
        device: Evaluation device.

    Returns:
        float tensor ``(n_samples,)`` on the CPU, in loader order.
    """
    model = _load_model(model_path, device)

    def last_event_log_likelihood(batch: Any) -> torch.Tensor:
        x, tgt = _xy(batch, device)
        last = model(x)[:, -1, :]
        return -F.cross_entropy(last, tgt[:, -1], ignore_index=TOKEN_PAD, reduction="none")

    return per_batch_values(dataloader, last_event_log_likelihood)
