"""``load_benchmark``: upstream's pre-trained benchmark settings, on upstream's layout.

A benchmark lives in ``<download_path>/benchmark/<dataset>_<model>/``::

    models_full/<i>/model_weights_0.pt   models trained on the full training subset
    models_half/<i>/model_weights_0.pt   models trained on random halves (ensembles)
    lds/indices_lds.pt                   (S, subset_size) training positions per subset
    lds/target_values_lds.pt             (S, n_test) negated mean test loss per subset
    loo/indices_loo.pt                   (n_loo,) removed training positions
    loo/target_values_loo.pt             (n_loo, n_test) test loss without each sample

Upstream's published settings (``mnist_lr``, ``mnist_mlp``, ``cifar2_resnet9``,
``shakespeare_nanogpt``, ``maestro_musictransformer``, ``wikitext2_gpt2``) are
downloaded from :data:`REPO_URL` when their folder is missing. Any of our own
prepared settings can be written in the same layout, offline, with
``dattri-bench prepare SETTING --export-upstream DIR`` (see
:mod:`dattri.benchmark.export`); such a folder also holds the exact data tensors
(``data.pt``) and ``dattri_export.json``, and :func:`load_benchmark` then returns
that data and functions built from the setting's model and training recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.datasets.cifar import (
    create_cifar2_dataset,
    create_resnet9_model,
    loss_cifar_resnet9,
    train_cifar_resnet9,
)
from dattri.benchmark.datasets.download import extract_zip
from dattri.benchmark.datasets.mnist import (
    create_lr_model,
    create_mlp_model,
    create_mnist_dataset,
    loss_mnist_lr,
    loss_mnist_mlp,
    train_mnist_lr,
    train_mnist_mlp,
)
from dattri.benchmark.utils import SubsetSampler

__all__ = [
    "EXPORT_MANIFEST",
    "LOSS_MAP",
    "MODEL_MAP",
    "REPO_URL",
    "SAMPLERSIZE_MAP",
    "SUPPORTED_DATASETS",
    "TRAIN_FUNC_MAP",
    "BenchmarkNotFoundError",
    "download_benchmark",
    "generate_url_map",
    "load_benchmark",
]

REPO_URL = "https://huggingface.co/datasets/trais-lab/dattri-benchmark/resolve/main/"

#: File that marks a folder written by ``dattri-bench prepare --export-upstream``.
EXPORT_MANIFEST = "dattri_export.json"

_EXPORT_HINT = (
    "make it locally from one of our settings with "
    "`dattri-bench prepare SETTING --export-upstream DIR` (then pass download_path=DIR; "
    "`dattri-bench list` shows the settings, e.g. mnist-lr)"
)


class BenchmarkNotFoundError(FileNotFoundError):
    """A benchmark's files are neither on disk nor downloadable."""


def _lazy(module: str, name: str, **bound: Any) -> Callable[..., Any]:
    """A function that imports ``module.name`` when first called (optional extras)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        import importlib

        func = getattr(importlib.import_module(module), name)
        return func(*args, **bound, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{module}.{name}`` (imported on first call)."
    return call


def generate_url_map(identifier: str) -> dict[str, Any]:
    """URLs of one published benchmark's files.

    Args:
        identifier: ``"<dataset>_<model>"``, e.g. ``"mnist_lr"``.

    Returns:
        ``{"models_full": url, "models_half": url, "groundtruth": {"lds": [indices
        url, values url], "loo": [indices url, values url]}}``.
    """
    base = REPO_URL + identifier
    return {
        "models_full": f"{base}/{identifier}_full.zip?download=true",
        "models_half": f"{base}/{identifier}_half.zip?download=true",
        "groundtruth": {
            metric: [
                f"{base}/{metric}/indices_{metric}.pt?download=true",
                f"{base}/{metric}/target_values_{metric}.pt?download=true",
            ]
            for metric in ("lds", "loo")
        },
    }


#: dataset name -> ``f(path) -> (train_dataset, test_dataset)``.
SUPPORTED_DATASETS: dict[str, Callable[..., Any]] = {
    "mnist": create_mnist_dataset,
    "cifar2": create_cifar2_dataset,
    "shakespeare": _lazy(
        "dattri.benchmark.datasets.shakespeare_char", "create_shakespeare_dataset"
    ),
    "maestro": _lazy(
        "dattri.benchmark.datasets.maestro", "create_maestro_datasets", generated_music=True
    ),
    "wikitext2": _lazy("dattri.benchmark.datasets.wikitext2", "create_wikitext2_dataset"),
}

#: identifier -> ground-truth style target ``f(model_path, dataloader, device="cpu")``
#: (upstream has None for ``shakespeare_nanogpt``; ours are complete).
LOSS_MAP: dict[str, Callable[..., Any] | None] = {
    "mnist_mlp": loss_mnist_mlp,
    "mnist_lr": loss_mnist_lr,
    "cifar2_resnet9": loss_cifar_resnet9,
    "shakespeare_nanogpt": _lazy(
        "dattri.benchmark.datasets.shakespeare_char", "loss_shakespeare_nanogpt"
    ),
    "maestro_musictransformer": _lazy(
        "dattri.benchmark.datasets.maestro", "loss_maestro_musictransformer"
    ),
    "wikitext2_gpt2": _lazy("dattri.benchmark.datasets.wikitext2", "loss_wikitext2_gpt2"),
}

#: identifier -> ``train_func(dataloader, seed=0, device="cpu", ...)``.
TRAIN_FUNC_MAP: dict[str, Callable[..., Any] | None] = {
    "mnist_mlp": train_mnist_mlp,
    "mnist_lr": train_mnist_lr,
    "cifar2_resnet9": train_cifar_resnet9,
    "shakespeare_nanogpt": _lazy(
        "dattri.benchmark.datasets.shakespeare_char", "train_shakespeare_nanogpt"
    ),
    "maestro_musictransformer": _lazy(
        "dattri.benchmark.datasets.maestro", "train_maestro_musictransformer"
    ),
    "wikitext2_gpt2": _lazy("dattri.benchmark.datasets.wikitext2", "train_wikitext2_gpt2"),
}

#: identifier -> zero-argument model factory.
MODEL_MAP: dict[str, Callable[[], nn.Module] | None] = {
    "mnist_mlp": partial(create_mlp_model, "mnist"),
    "mnist_lr": partial(create_lr_model, "mnist"),
    "cifar2_resnet9": create_resnet9_model,
    "shakespeare_nanogpt": _lazy(
        "dattri.benchmark.datasets.shakespeare_char", "create_nanogpt_model"
    ),
    "maestro_musictransformer": _lazy(
        "dattri.benchmark.datasets.maestro", "create_musictransformer_model"
    ),
    "wikitext2_gpt2": _lazy("dattri.benchmark.datasets.wikitext2", "create_gpt2_model"),
}

#: identifier -> ``(n_train, n_test)`` of the benchmark's samplers.
SAMPLERSIZE_MAP: dict[str, tuple[int, int]] = {
    "mnist_mlp": (5000, 500),
    "mnist_lr": (5000, 500),
    "cifar2_resnet9": (5000, 500),
    "shakespeare_nanogpt": (5000, 500),
    "maestro_musictransformer": (5000, 178),
    "wikitext2_gpt2": (4656, 481),
}


# ----------------------------------------------------------------------- downloads
def _fetch(url: str, dest: Path, timeout: float = 60.0) -> bool:
    """Stream ``url`` to ``dest`` (via ``dest.part``); False if the file does not exist.

    Raises:
        OSError: If the server cannot be reached or answers with an error other
            than "not found".
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if url.startswith("file:"):  # a local mirror: no query strings on files
        url = url.split("?", 1)[0]
    request = urllib.request.Request(url, headers={"User-Agent": "dattri-load-benchmark"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        if exc.code == 404:
            return False
        raise
    except urllib.error.URLError as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc.reason, FileNotFoundError):  # file:// mirror without the file
            return False
        raise
    part.replace(dest)
    return True


def download_benchmark(identifier: str, path: str | os.PathLike, verbose: bool = True) -> Path:
    """Download one published benchmark into ``path`` in upstream's layout.

    The model zips are unpacked into ``models_full/`` and ``models_half/``; the
    ground-truth tensors go to ``lds/`` and ``loo/``. A file the repository does
    not have (e.g. LOO of ``wikitext2_gpt2``) gives a warning, as upstream.

    Args:
        identifier: A key of :data:`MODEL_MAP`.
        path: The benchmark folder ``<download_path>/benchmark/<identifier>``.
        verbose: Print each file as it is fetched.

    Returns:
        ``path``.

    Raises:
        BenchmarkNotFoundError: If the repository cannot be reached (offline);
            the message names the command that builds the layout locally.
    """
    path = Path(path)
    urls = generate_url_map(identifier)
    jobs: list[tuple[str, Path, bool]] = [
        (urls["models_full"], path / "models_full", True),
        (urls["models_half"], path / "models_half", True),
    ]
    for metric, pair in urls["groundtruth"].items():
        jobs.extend((u, path / metric / u.split("?")[0].rsplit("/", 1)[-1], False) for u in pair)
    for url, dest, unzip in jobs:
        if verbose:
            print(f"fetching {url}")
        target = path / ".download.zip" if unzip else dest
        try:
            found = _fetch(url, target)
        except OSError as exc:
            msg = (
                f"Could not download benchmark {identifier!r} from {url} ({exc}). "
                f"Check the connection, or {_EXPORT_HINT}."
            )
            raise BenchmarkNotFoundError(msg) from exc
        if not found:
            warnings.warn(
                f"{url} does not exist, which is expected for some settings "
                "(e.g. no LOO ground truth for large models).",
                stacklevel=2,
            )
            continue
        if unzip:
            extract_zip(target, dest)
            target.unlink()
    return path


# ------------------------------------------------------------------ local layout
def _checkpoints(folder: Path) -> list[Path]:
    """``folder/<i>/model_weights_0.pt`` for ``i = 0, 1, ...`` (numeric order)."""
    if not folder.is_dir():
        return []
    ids = sorted(int(d.name) for d in folder.iterdir() if d.is_dir() and d.name.isdigit())
    files = [folder / str(i) / "model_weights_0.pt" for i in ids]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        msg = f"Incomplete benchmark folder: {missing[:3]} missing; download or export it again."
        raise BenchmarkNotFoundError(msg)
    return files


def _read_manifest(root: Path) -> dict[str, Any] | None:
    file = root / EXPORT_MANIFEST
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def _setting_functions(manifest: dict[str, Any]) -> dict[str, Any]:
    """Model factory, data, target and train functions of an exported setting."""
    from dattri.benchmark.datasets._upstream import UpstreamRecipe
    from dattri.benchmark.settings import get_setting

    setting = get_setting(manifest["setting"], quick=bool(manifest.get("quick", False)))
    factory = setting.model_factory
    cfg = setting.train_config
    recipe = UpstreamRecipe(factory, cfg.lr, cfg.momentum, cfg.weight_decay)

    def target_func(
        model_path: str | os.PathLike, dataloader: DataLoader, device: str = "cpu"
    ) -> torch.Tensor:
        """Per-example cross-entropy of a saved model of the exported setting."""
        return recipe.loss(model_path, dataloader, device)

    def train_func(dataloader: DataLoader, seed: int = 0, device: str = "cpu") -> nn.Module:
        """Train a fresh model of the exported setting with its SGD recipe on ``dataloader``."""
        return recipe.train(dataloader, seed, device, cfg.epochs)

    target_func.__name__ = target_func.__qualname__ = f"loss_{manifest['identifier']}"
    train_func.__name__ = train_func.__qualname__ = f"train_{manifest['identifier']}"
    return {"model_factory": factory, "target_func": target_func, "train_func": train_func}


def load_benchmark(
    model: str,
    dataset: str,
    metric: str,
    download_path: str = "~/.dattri",
    redownload: bool = False,
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Load a benchmark setting: models, data, functions and ground truth.

    Looks in ``<download_path>/benchmark/<dataset>_<model>/``; for upstream's
    published settings a missing folder (or ``redownload=True``) is downloaded
    from :data:`REPO_URL`. Folders written by
    ``dattri-bench prepare SETTING --export-upstream DIR`` load offline, for any
    of our settings (``load_benchmark("lr", "digits", "lds", download_path=DIR)``
    for ``digits-lr``).

    Args:
        model: Model name, e.g. ``"lr"``, ``"mlp"``, ``"resnet9"``.
        dataset: Dataset name, e.g. ``"mnist"``, ``"cifar2"``.
        metric: ``"lds"`` or ``"loo"``: which ground truth to return.
        download_path: Root folder of benchmarks (and of upstream's datasets,
            under ``<download_path>/dataset``).
        redownload: Download an upstream benchmark again even if present.

    Returns:
        ``(inputs, (target_values, indices))``. ``inputs`` has the keys
        ``model`` (a fresh model in eval mode), ``models_full`` and
        ``models_half`` (lists of checkpoint ``Path``), ``train_dataset``,
        ``test_dataset``, ``train_sampler`` / ``test_sampler``
        (``SubsetSampler(range(n))``), ``loss_func`` = ``target_func`` (the
        ground-truth style ``f(model_path, dataloader, device="cpu")``) and
        ``train_func``. The ground truth goes straight into
        :func:`dattri.metric.lds` / :func:`dattri.metric.loo_corr`.

    Raises:
        ValueError: If the setting is unknown or ``metric`` is not lds/loo.
        BenchmarkNotFoundError: If the files are missing and cannot be
            downloaded (the message names the export command).
    """
    identifier = f"{dataset}_{model}"
    root = Path(download_path).expanduser() / "benchmark" / identifier
    manifest = _read_manifest(root)
    if identifier not in MODEL_MAP and manifest is None:
        msg = (
            f"The combination {identifier!r} is not supported: upstream publishes "
            f"{sorted(MODEL_MAP)}; for any other setting, {_EXPORT_HINT}."
        )
        raise ValueError(msg)
    if metric not in ("lds", "loo"):
        msg = f"`metric` must be 'lds' or 'loo', got {metric!r}."
        raise ValueError(msg)
    if redownload and identifier not in MODEL_MAP:
        msg = f"{identifier!r} is an exported local setting, not a published one; re-export it."
        raise ValueError(msg)
    if redownload or not root.exists():
        if root.exists():
            shutil.rmtree(root)
        download_benchmark(identifier, root)
        manifest = None

    gt_dir = root / metric
    gt_files = [gt_dir / f"target_values_{metric}.pt", gt_dir / f"indices_{metric}.pt"]
    missing = [str(f) for f in gt_files if not f.is_file()]
    if missing:
        msg = f"No {metric.upper()} ground truth for {identifier!r} ({missing} missing); "
        msg += _EXPORT_HINT + "."
        raise BenchmarkNotFoundError(msg)
    target_values = torch.load(gt_files[0], map_location="cpu", weights_only=True)
    indices = torch.load(gt_files[1], map_location="cpu", weights_only=True)

    if manifest is not None:
        funcs = _setting_functions(manifest)
        data = torch.load(root / manifest["data"], map_location="cpu", weights_only=True)
        train_dataset = TensorDataset(data["x_train"], data["y_train"])
        test_dataset = TensorDataset(data["x_test"], data["y_test"])
        n_train, n_test = int(manifest["n_train"]), int(manifest["n_test"])
        model_factory = funcs["model_factory"]
        target_func, train_func = funcs["target_func"], funcs["train_func"]
    else:
        builder = SUPPORTED_DATASETS.get(dataset)
        if builder is None:
            train_dataset = test_dataset = None
        else:
            train_dataset, test_dataset = builder(Path(download_path).expanduser() / "dataset")
        n_train, n_test = SAMPLERSIZE_MAP[identifier]
        model_factory = MODEL_MAP[identifier]
        target_func, train_func = LOSS_MAP[identifier], TRAIN_FUNC_MAP[identifier]

    return {
        "model": None if model_factory is None else model_factory().eval(),
        "models_full": _checkpoints(root / "models_full"),
        "models_half": _checkpoints(root / "models_half"),
        "train_dataset": train_dataset,
        "test_dataset": test_dataset,
        "train_sampler": SubsetSampler(range(n_train)),
        "test_sampler": SubsetSampler(range(n_test)),
        "loss_func": target_func,
        "target_func": target_func,
        "train_func": train_func,
    }, (target_values, indices)
