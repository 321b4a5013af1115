"""``dattri_retrain``: retrain benchmark models for LOO / LDS ground truth (upstream's CLI).

Flags as upstream's script::

    dattri_retrain --dataset mnist --model lr --mode lds
        [--train_subset 5000] [--save_path .] [--data_path .] [--seed 0]
        [--partition start,end,total] [--device cpu] [--extra_param key=value ...]

The training set is the first ``--train_subset`` samples (``-1``: all), loaded in
batches of the setting's size (lr 32, mlp 64, resnet18 256, resnet9 64,
musictransformer 64). ``--mode lds`` calls :func:`dattri.model_util.retrain_lds`
for subsets ``start .. end - 1`` of ``total`` (default ``0,100,100``);
``--mode loo`` calls :func:`dattri.model_util.retrain_loo` for the positions
``start .. end - 1`` (default: all). Both write the layout that
:func:`dattri.metric.calculate_lds_ground_truth` /
:func:`~dattri.metric.calculate_loo_ground_truth` read.

``mnist_lr`` in LDS mode trains all of its subset models at once
(:func:`dattri.model_util.retrain_lds_vectorized`, ``vmap``) with upstream's recipe
(SGD, learning rate 0.01, ``epoch_num`` epochs); every epoch walks the whole
training set in one shuffled order in batches of ``32 / subset_ratio`` = 64, and
each model averages the loss over the samples of its subset in the batch (about
32). ``--no_vectorize`` (ours) trains the models one by one with
``train_mnist_lr`` on loaders over each subset instead. Other extensions of ours:
``--model mlp`` is accepted (``mnist_mlp``), ``--num_runs_per_subset`` and
``--subset_ratio`` are exposed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, SubsetRandomSampler

from dattri.benchmark.datasets.cifar import create_cifar2_dataset, train_cifar_resnet9
from dattri.benchmark.datasets.imagenet import create_imagenet_dataset, train_imagenet_resnet18
from dattri.benchmark.datasets.mnist import (
    create_lr_model,
    create_mnist_dataset,
    train_mnist_lr,
    train_mnist_mlp,
)
from dattri.model_util.retrain import retrain_lds, retrain_loo

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "SUPPORTED_DATASETS",
    "SUPPORTED_MODELS",
    "SUPPORTED_RETRAINING_MODE",
    "SUPPORTED_SETTINGS",
    "key_value_pair",
    "main",
    "partition_type",
]


def _maestro(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        from dattri.benchmark.datasets import maestro

        return getattr(maestro, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


SUPPORTED_MODELS = ["lr", "mlp", "resnet18", "resnet9", "musictransformer"]

SUPPORTED_SETTINGS: dict[str, Callable[..., Any]] = {
    "mnist_lr": train_mnist_lr,
    "mnist_mlp": train_mnist_mlp,
    "imagenet_resnet18": train_imagenet_resnet18,
    "cifar2_resnet9": train_cifar_resnet9,
    "maestro_musictransformer": _maestro("train_maestro_musictransformer"),
}
SUPPORTED_RETRAINING_MODE = {"loo": retrain_loo, "lds": retrain_lds}
SUPPORTED_DATASETS: dict[str, Callable[..., Any]] = {
    "mnist": create_mnist_dataset,
    "imagenet": create_imagenet_dataset,
    "cifar2": create_cifar2_dataset,
    "maestro": _maestro("create_maestro_datasets"),
}
DEFAULT_BATCH_SIZE = {
    "mnist_lr": 32,
    "mnist_mlp": 64,
    "imagenet_resnet18": 256,
    "cifar2_resnet9": 64,
    "maestro_musictransformer": 64,
}


def partition_type(arg: str) -> list[int | None]:
    """Parse ``--partition start,end,total`` (``none`` for a default).

    Args:
        arg: e.g. ``"0,10,100"`` or ``"0,none,none"``.

    Returns:
        ``[start, end, total]`` with ``None`` for ``none``.

    Raises:
        argparse.ArgumentTypeError: If there are not three comma-separated integers.
    """
    parts = [p.strip() for p in arg.split(",")]
    try:
        res = [None if p.lower() == "none" else int(p) for p in parts]
    except ValueError:
        res = []
    if len(res) != 3:
        msg = f"--partition must be start,end,total (integers or none), got {arg!r}."
        raise argparse.ArgumentTypeError(msg)
    return res


def key_value_pair(arg: str) -> tuple[str, Any]:
    """Parse ``--extra_param key=value``.

    Integers become ``int`` (as upstream); other numbers become ``float`` (upstream
    keeps them as strings, which no training function accepts); the rest stays text.

    Args:
        arg: ``"key=value"``.

    Returns:
        ``(key, value)``.

    Raises:
        argparse.ArgumentTypeError: If there is no ``=``.
    """
    key, sep, value = arg.partition("=")
    if not sep or not key:
        msg = f"--extra_param must be key=value, got {arg!r}."
        raise argparse.ArgumentTypeError(msg)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            continue
    return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dattri_retrain", description="Retrain models on various datasets."
    )
    p.add_argument("--dataset", choices=list(SUPPORTED_DATASETS), help="dataset to retrain on")
    p.add_argument("--model", choices=SUPPORTED_MODELS, help="model to retrain")
    p.add_argument(
        "--train_subset",
        type=int,
        default=5000,
        help="number of training samples (the first ones); -1 = all",
    )
    p.add_argument("--mode", choices=list(SUPPORTED_RETRAINING_MODE), help="loo or lds")
    p.add_argument("--save_path", default=".", help="where the retrained models go")
    p.add_argument("--data_path", default=".", help="where the dataset is (or is downloaded)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the retraining")
    p.add_argument(
        "--partition",
        type=partition_type,
        default=[0, None, None],
        help="start,end,total: lds trains subsets start..end-1 of total (default "
        "0,100,100); loo leaves out positions start..end-1 (default: all)",
    )
    p.add_argument("--device", default="cpu", help="training device")
    p.add_argument(
        "--extra_param",
        type=key_value_pair,
        action="append",
        help="key=value passed to the training function (repeatable)",
    )
    p.add_argument("--subset_ratio", type=float, default=0.5, help="lds subset fraction (ours)")
    p.add_argument("--num_runs_per_subset", type=int, default=1, help="lds runs (ours)")
    p.add_argument(
        "--no_vectorize",
        action="store_true",
        help="train mnist_lr lds models one by one with train_mnist_lr (ours)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (ours)")
    return p


def _tensors(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    from dattri.model_util._data import loader_dataset_indices

    ds = loader.dataset
    idx = loader_dataset_indices(loader)
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def _retrain_mnist_lr_vectorized(
    loader: DataLoader, args: argparse.Namespace, extra: dict[str, Any], start: int, end: int
) -> None:
    from dattri.model_util.subset_train import SubsetTrainConfig, retrain_lds_vectorized

    config = SubsetTrainConfig(
        epochs=int(extra.get("epoch_num", 20)),
        lr=0.01,
        momentum=0.0,
        weight_decay=0.0,
        batch_size=max(1, round(DEFAULT_BATCH_SIZE["mnist_lr"] / args.subset_ratio)),
        seed=args.seed,
        device=args.device,
    )
    retrain_lds_vectorized(
        lambda: create_lr_model("mnist"),
        _tensors(loader),
        args.save_path,
        num_subsets=end - start,
        subset_ratio=args.subset_ratio,
        num_runs_per_subset=args.num_runs_per_subset,
        seed=args.seed,
        config=config,
        start_id=start,
        total_num_subsets=args.partition[2],
        verbose=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``dattri_retrain``.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Raises:
        SystemExit: On invalid arguments (argparse's usage error).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset is None or args.model is None or args.mode is None:
        parser.print_help()
        return
    setting = f"{args.dataset}_{args.model}"
    if setting not in SUPPORTED_SETTINGS:
        parser.error(
            f"--dataset {args.dataset} --model {args.model} is not a benchmark setting; "
            f"supported: {sorted(SUPPORTED_SETTINGS)}."
        )
    train_func = SUPPORTED_SETTINGS[setting]
    dataset_train, _ = SUPPORTED_DATASETS[args.dataset](args.data_path)
    n_all = len(dataset_train)
    n = n_all if args.train_subset < 0 else args.train_subset
    if n > n_all:
        parser.error(f"--train_subset {n} exceeds the {n_all} training samples.")
    loader = DataLoader(
        dataset_train,
        batch_size=DEFAULT_BATCH_SIZE[setting],
        sampler=SubsetRandomSampler(list(range(n))),
    )
    start, end, total = args.partition
    start = 0 if start is None else start
    if args.mode == "lds":
        end = 100 if end is None else end
        args.partition = [start, end, 100 if total is None else total]
    else:
        end = n if end is None else end
    extra = dict(args.extra_param or [])
    # Upstream forwards --extra_param to retrain_lds/retrain_loo, so their own
    # arguments can be set this way too; the partition stays --partition's job.
    for key in ("subset_ratio", "num_runs_per_subset"):
        if key in extra:
            setattr(args, key, type(getattr(args, key))(extra.pop(key)))
    clash = sorted(set(extra) & {"num_subsets", "start_id", "total_num_subsets", "indices"})
    if clash:
        parser.error(f"--extra_param {clash}: set the subsets with --partition start,end,total.")
    verbose = not args.quiet
    if args.mode == "lds":
        vectorize = setting == "mnist_lr" and not args.no_vectorize and set(extra) <= {"epoch_num"}
        if vectorize:
            _retrain_mnist_lr_vectorized(loader, args, extra, start, end)
            return
        retrain_lds(
            train_func,
            loader,
            args.save_path,
            num_subsets=end - start,
            subset_ratio=args.subset_ratio,
            num_runs_per_subset=args.num_runs_per_subset,
            start_id=start,
            total_num_subsets=args.partition[2],
            seed=args.seed,
            verbose=verbose,
            device=args.device,
            **extra,
        )
    else:
        retrain_loo(
            train_func,
            loader,
            args.save_path,
            indices=list(range(start, end)),
            seed=args.seed,
            verbose=verbose,
            device=args.device,
            **extra,
        )


if __name__ == "__main__":
    main()
