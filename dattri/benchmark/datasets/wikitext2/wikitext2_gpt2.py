"""GPT-2 (``transformers``) training and evaluation on WikiText-2 (upstream's functions)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.benchmark.datasets._upstream import load_weights, per_batch_values
from dattri.benchmark.datasets.wikitext2.data import import_transformers
from dattri.benchmark.models._rng import seeded_rng

__all__ = [
    "GPT2_MODEL",
    "create_gpt2_model",
    "loss_wikitext2_gpt2",
    "per_example_lm_loss",
    "train_wikitext2_gpt2",
]

#: Pretrained model upstream starts from.
GPT2_MODEL = "openai-community/gpt2"


def create_gpt2_model(
    *,
    config: Any = None,
    pretrained: str | os.PathLike | None = GPT2_MODEL,
    download: bool = True,
) -> nn.Module:
    """Create GPT-2 (``transformers.GPT2LMHeadModel``).

    With ``config`` (a ``GPT2Config``) a freshly initialised model of that
    configuration is built (seed torch first for reproducible weights).
    Otherwise the pretrained weights ``pretrained`` (a hub name or a local
    folder) are loaded: from the local cache first, then downloaded when
    ``download`` is true. When they cannot be had, a randomly initialised
    GPT-2 124M (``GPT2Config()``) is returned with a warning saying so.

    Args:
        config: Build from this configuration instead (keyword only).
        pretrained: Weights to load (keyword only); ``None`` means ``GPT2Config()``.
        download: Allow downloading the weights (keyword only).

    Returns:
        The model (``from_pretrained`` returns it in eval mode, a config-built
        one is in train mode; callers set the mode they need).
    """
    transformers = import_transformers()
    if config is not None:
        return transformers.GPT2LMHeadModel(config)
    if pretrained is None:
        return transformers.GPT2LMHeadModel(transformers.GPT2Config())
    name = os.fspath(pretrained)
    try:
        return transformers.GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
    except OSError as local_error:
        if download:
            try:
                return transformers.GPT2LMHeadModel.from_pretrained(name)
            except OSError as exc:
                reason = str(exc).splitlines()[0]
        else:
            reason = str(local_error).splitlines()[0]
    warnings.warn(
        f"Pretrained GPT-2 weights {name!r} are not available ({reason}); using a "
        "randomly initialised GPT-2 124M built from GPT2Config(). Put the weights in the "
        "Hugging Face cache or pass `pretrained=<local folder>` to use them.",
        stacklevel=2,
    )
    return transformers.GPT2LMHeadModel(transformers.GPT2Config())


def _to(batch: Any, device: str) -> dict[str, torch.Tensor]:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        msg = (
            "WikiText-2 batches must be dicts with 'input_ids' (and 'labels', "
            "'attention_mask'), as create_wikitext2_dataset's samples collate to."
        )
        raise TypeError(msg)
    return {k: v.to(device) for k, v in batch.items()}


def train_wikitext2_gpt2(
    dataloader: DataLoader,
    seed: int = 0,
    device: str = "cpu",
    epoch_num: int = 3,
    *,
    config: Any = None,
    lr: float = 5e-5,
    verbose: bool = False,
) -> nn.Module:
    """Fine-tune GPT-2 on WikiText-2 blocks.

    AdamW (lr 5e-5) with the learning rate decayed linearly to 0 over all steps
    (``run_clm``'s default schedule, which upstream's code refers to but never
    defines). The model (pretrained, or built from ``config``) is created after
    seeding, inside a forked RNG: the caller's RNG state is untouched.

    Args:
        dataloader: Loader of dict batches (``input_ids``, ``attention_mask``, ``labels``).
        seed: Seed of initialisation, dropout and unseeded shuffling.
        device: Training device.
        epoch_num: Passes over the loader.
        config: Train a model built from this ``GPT2Config`` (keyword only).
        lr: Peak learning rate (keyword only).
        verbose: Show a progress bar (keyword only).

    Returns:
        The trained model in eval mode.

    Raises:
        ValueError: If ``epoch_num`` is negative.
    """
    if epoch_num < 0:
        msg = f"`epoch_num` must be >= 0, got {epoch_num}."
        raise ValueError(msg)
    with seeded_rng(seed, device):
        model = create_gpt2_model(config=config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        total = max(epoch_num * len(dataloader), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total)
        )
        model.train()
        for _ in tqdm(range(epoch_num), desc="train gpt2", disable=not verbose):
            for batch in dataloader:
                loss = model(**_to(batch, device)).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    return model.eval()


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence (labels ``-100`` ignored).

    Args:
        logits: ``(b, T, vocab)``.
        labels: ``(b, T)``; position ``t`` predicts ``labels[:, t + 1]``.

    Returns:
        ``(b,)`` losses (``0`` for a row without targets).
    """
    shift_logits = logits[:, :-1].transpose(1, 2)
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    counts = (shift_labels != -100).sum(dim=1).clamp_min(1)
    return ce.sum(dim=1) / counts


def _config_from_state(state: dict[str, torch.Tensor]) -> Any:
    transformers = import_transformers()
    vocab_size, n_embd = state["transformer.wte.weight"].shape
    if n_embd % 64:
        msg = (
            f"Cannot infer GPT-2's head count for n_embd={n_embd} (not a multiple of the "
            "usual head size 64); pass `config=`."
        )
        raise ValueError(msg)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=state["transformer.wpe.weight"].shape[0],
        n_embd=n_embd,
        n_layer=len(layers),
        n_head=n_embd // 64,
    )


def loss_wikitext2_gpt2(
    model_path: str,
    dataloader: DataLoader,
    device: str = "cpu",
    *,
    config: Any = None,
) -> torch.Tensor:
    """Mean next-token loss of every block (the ground-truth target).

    Upstream repeated each *batch's* mean loss for every example of the batch;
    here every example gets its own mean loss (identical for batches of one).

    Args:
        model_path: A saved ``GPT2LMHeadModel`` state dict.
        dataloader: Loader of dict batches.
        device: Evaluation device.
        config: The model's ``GPT2Config`` (keyword only; inferred from the
            weights, with 64-dim heads, when omitted).

    Returns:
        float tensor ``(n_examples,)`` on the CPU, in loader order.

    Raises:
        FileNotFoundError: If ``model_path`` does not exist.
    """
    state = load_weights(model_path, "a saved GPT-2 state dict", device)
    model = create_gpt2_model(config=config or _config_from_state(state)).to(device)
    model.load_state_dict(state)
    model.eval()

    def block_losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = _to(batch, device)
        labels = batch.pop("labels", batch["input_ids"])
        return per_example_lm_loss(model(**batch).logits, labels)

    return per_batch_values(dataloader, block_losses)
