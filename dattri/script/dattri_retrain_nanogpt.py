"""``dattri_retrain_nanogpt``: retrain the Shakespeare nanoGPT on random data subsets.

Upstream's flags, on our own trainer (no vendored ``train.py``, no shell). Model
``i`` of ``--partition start end total`` (``start <= i < min(end, total)``) is
trained with seed ``seed + i - 1`` (upstream's numbering) on a random
``subset_ratio`` fraction of the training samples (blocks of
``create_shakespeare_dataset``) drawn with that seed, and saved as
``<save_path>/model_<i+1>/ckpt.pt`` (nanoGPT's checkpoint dict: ``model``,
``model_args``, ``iter_num``, ``best_val_loss``, ``config``; no optimizer state)
with the subset's sample indices in ``indices.txt``, one per line.

Beyond upstream's flags: ``--data_path`` (default ``~/.dattri/datasets/
<dataset>``; upstream used the package folder), ``--device``, ``--quiet`` and
``--extra_param key=value ...`` overriding model (``n_layer``, ``n_head``,
``n_embd``, ``block_size``, ``dropout``, ``bias``) or training settings
(:class:`~dattri.benchmark.models.train_gpt.NanoGPTTrainConfig` fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from dattri.benchmark.datasets.download import get_dataset_dir
from dattri.benchmark.datasets.shakespeare_char import (
    SHAKESPEARE_GPT_CONFIG,
    create_nanogpt_model,
    create_shakespeare_dataset,
    load_meta,
    prepare_shakespeare_char,
    save_nanogpt_checkpoint,
)
from dattri.benchmark.models.train_gpt import NanoGPTTrainConfig, train_gpt

__all__ = ["main", "parse_extra_params", "retrain_nanogpt"]

_DATASETS = ("shakespeare_char", "tinystories")


def _convert(key: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = raw.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        msg = f"--extra_param {key}={raw}: expected true or false."
        raise ValueError(msg)
    try:
        return type(default)(raw)
    except ValueError:
        msg = f"--extra_param {key}={raw}: expected a {type(default).__name__}."
        raise ValueError(msg) from None


def parse_extra_params(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``key=value`` strings into model and training overrides.

    Args:
        items: Strings like ``"n_layer=2"`` or ``"max_iters=100"``.

    Returns:
        ``(model_overrides, train_overrides)`` with typed values.

    Raises:
        ValueError: If an item is malformed, the key unknown or the value of the
            wrong type.
    """
    train_defaults = {f.name: f.default for f in dataclasses.fields(NanoGPTTrainConfig)}
    model_overrides: dict[str, Any] = {}
    train_overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            msg = f"--extra_param {item!r}: use key=value."
            raise ValueError(msg)
        if key in SHAKESPEARE_GPT_CONFIG:
            model_overrides[key] = _convert(key, raw, SHAKESPEARE_GPT_CONFIG[key])
        elif key in train_defaults:
            train_overrides[key] = _convert(key, raw, train_defaults[key])
        else:
            known = sorted([*SHAKESPEARE_GPT_CONFIG, *train_defaults])
            msg = f"--extra_param {key}: unknown key; valid keys are {known}."
            raise ValueError(msg)
    return model_overrides, train_overrides


def retrain_nanogpt(
    save_path: str | Path = "output_models",
    dataset: str = "shakespeare_char",
    data_path: str | Path | None = None,
    seed: int = 42,
    partition: Sequence[int] = (0, 5, 5),
    subset_ratio: float = 0.5,
    only_download: bool = False,
    device: str = "cpu",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    verbose: bool = True,
) -> list[Path]:
    """Prepare the data and retrain nanoGPT models on random subsets.

    Args:
        save_path: Output folder (``model_<i+1>/`` per model).
        dataset: ``"shakespeare_char"`` (``"tinystories"`` is not supported).
        data_path: Folder of ``train.bin`` / ``val.bin`` / ``meta.pkl``
            (prepared, downloading ``input.txt``, when missing).
        seed: Base seed; model ``i`` uses ``seed + i - 1``.
        partition: ``(start, end, total)``: train models ``start .. min(end, total) - 1``.
        subset_ratio: Fraction of training samples per model, in ``(0, 1]``.
        only_download: Stop after preparing the data.
        device: Training device.
        model_overrides: :class:`GPTConfig` fields to change.
        train_overrides: :class:`NanoGPTTrainConfig` fields to change.
        verbose: Progress output.

    Returns:
        The checkpoint paths written.

    Raises:
        NotImplementedError: For ``dataset="tinystories"``.
        ValueError: For a bad ``subset_ratio``, ``partition`` or ``dataset``.
    """
    if dataset == "tinystories":
        msg = (
            "dattri_retrain_nanogpt --dataset tinystories is not supported: it needs the "
            "TinyStoriesV2 text and GPT-2 BPE token files, which this package does not "
            "prepare yet. Use --dataset shakespeare_char."
        )
        raise NotImplementedError(msg)
    if dataset not in _DATASETS:
        msg = f"`dataset` must be one of {list(_DATASETS)}, got {dataset!r}."
        raise ValueError(msg)
    if not 0 < subset_ratio <= 1:
        msg = f"`subset_ratio` must be in (0, 1], got {subset_ratio}."
        raise ValueError(msg)
    start, end, total = (int(v) for v in partition)
    if not 0 <= start <= end or total < 1:
        msg = f"`partition` must be start <= end with start >= 0 and total >= 1, got {partition}."
        raise ValueError(msg)
    end = min(end, total)
    root = get_dataset_dir(dataset) if data_path is None else Path(data_path).expanduser()
    if not (root / "meta.pkl").is_file():
        prepare_shakespeare_char(root, download=True, verbose=verbose)
    if only_download:
        if verbose:
            print(f"Dataset prepared in {root}.")
        return []
    model_overrides = dict(model_overrides or {})
    config = NanoGPTTrainConfig(**(train_overrides or {}))
    block_size = int(model_overrides.get("block_size", SHAKESPEARE_GPT_CONFIG["block_size"]))
    vocab_size = int(load_meta(root)["vocab_size"])
    train, val = create_shakespeare_dataset(str(root), block_size=block_size)
    n_subset = max(1, int(len(train) * subset_ratio))
    written = []
    for i in range(start, end):
        model_seed = seed + i - 1
        generator = torch.Generator().manual_seed(model_seed)
        indices = torch.randperm(len(train), generator=generator)[:n_subset]
        loader = DataLoader(
            Subset(train, indices.tolist()),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(model_seed),
        )
        val_loader = DataLoader(val, batch_size=config.batch_size, shuffle=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            model = create_nanogpt_model(vocab_size, **model_overrides)
        model, info = train_gpt(
            model, loader, config, val_loader, seed=model_seed, device=device, verbose=verbose
        )
        out_dir = Path(save_path) / f"model_{i + 1}"
        path = save_nanogpt_checkpoint(
            model,
            out_dir / "ckpt.pt",
            iter_num=info["best_iter"],
            best_val_loss=info["best_val_loss"],
            config={**config.as_dict(), "seed": model_seed, "subset_ratio": subset_ratio},
        )
        (out_dir / "indices.txt").write_text(
            "\n".join(str(int(j)) for j in indices) + "\n", encoding="utf-8"
        )
        written.append(path)
        if verbose:
            print(f"model_{i + 1}: seed {model_seed}, val loss {info['best_val_loss']}, {path}")
    return written


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dattri_retrain_nanogpt",
        description="Retrain nanoGPT on random subsets of character-level Shakespeare.",
    )
    parser.add_argument("--save_path", type=str, default="output_models")
    parser.add_argument("--dataset", type=str, default="shakespeare_char", choices=_DATASETS)
    parser.add_argument(
        "--data_file",
        type=str,
        default="TinyStoriesV2-GPT4-train.txt",
        help="(tinystories only, unsupported) the TinyStories text file.",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--partition",
        type=int,
        nargs=3,
        default=[0, 5, 5],
        metavar=("START", "END", "TOTAL"),
        help="Train models START..END-1 of TOTAL.",
    )
    parser.add_argument("--subset_ratio", type=float, default=0.5)
    parser.add_argument("--only_download_dataset", action="store_true")
    parser.add_argument(
        "--data_path",
        type=str,
        default=None,
        help="Folder of train.bin/val.bin/meta.pkl (default ~/.dattri/datasets/<dataset>).",
    )
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument(
        "--extra_param",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Model (n_layer, n_head, n_embd, block_size, dropout, bias) or training "
        "(max_iters, batch_size, learning_rate, ...) overrides.",
    )
    parser.add_argument("--quiet", action="store_true", help="No progress output.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dattri_retrain_nanogpt``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status (0 on success, 2 on a usage error).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        model_overrides, train_overrides = parse_extra_params(args.extra_param)
        retrain_nanogpt(
            save_path=args.save_path,
            dataset=args.dataset,
            data_path=args.data_path,
            seed=args.seed,
            partition=args.partition,
            subset_ratio=args.subset_ratio,
            only_download=args.only_download_dataset,
            device=args.device,
            model_overrides=model_overrides,
            train_overrides=train_overrides,
            verbose=not args.quiet,
        )
    except (NotImplementedError, ValueError, FileNotFoundError) as exc:
        print(f"dattri_retrain_nanogpt: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
