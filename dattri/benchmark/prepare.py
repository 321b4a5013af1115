"""``dattri-bench prepare``: train a setting's models and build its ground truth.

Everything lands in one cache directory per setting (resumable: finished pieces are
skipped on a rerun)::

    <cache>/<setting>/
        manifest.json          setting fingerprint (a different setting is refused)
        data.pt                x_train, y_train (after label noise), x_test, y_test, noisy
        models/full.pt         the attributed model (state_dict)
        models/traj_<k>.pt     checkpoints along its training trajectory (TracIn)
        models/half_<k>.pt     models on random half subsets (TRAK ensembles)
        lds/                   retrain_lds layout (metadata.yml, <i>/indices.txt, weights)
        lds_gt.pt              (values (S, n_test), indices (S, subset_size))
        loo_gt.pt              (values (n_loo, n_test), removed indices (n_loo,))
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.settings import Setting
from dattri.benchmark.utils import flip_label
from dattri.metric import calculate_lds_ground_truth
from dattri.model_util.subset_train import (
    SubsetTrainConfig,
    retrain_lds_vectorized,
    train_subset_models,
)

__all__ = [
    "MissingDataError",
    "PreparedSetting",
    "default_cache_dir",
    "load_prepared",
    "prepare",
]


class MissingDataError(FileNotFoundError):
    """A setting's dataset files are missing (and no download was asked for).

    Attributes:
        setting: the setting's name.
        detail: the dataset loader's message (which files, where it looked).
    """

    def __init__(self, setting: str, detail: str) -> None:
        self.setting = setting
        self.detail = detail
        super().__init__(
            f"{setting}: {detail.split('. Pass download=True')[0].rstrip('.')}. Pass "
            "data_dir (a folder holding the files) or download=True."
        )


def _load_data(
    setting: Setting, data_dir: Path | None, download: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Call the setting's loader; a loader without a ``download`` argument gets none."""
    import inspect

    try:
        params = inspect.signature(setting.load_data).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    try:
        if "download" in params:
            return setting.load_data(data_dir, download=download)
        return setting.load_data(data_dir)
    except FileNotFoundError as exc:
        raise MissingDataError(setting.name, str(exc)) from exc


def default_cache_dir() -> Path:
    """``$DATTRI_BENCH_CACHE`` or ``~/.cache/dattri-bench``."""
    return Path(os.environ.get("DATTRI_BENCH_CACHE", Path.home() / ".cache" / "dattri-bench"))


def _fingerprint(setting: Setting) -> dict[str, Any]:
    cfg = setting.train_config.to_dict()
    fields = {
        k: v
        for k, v in asdict(setting).items()
        if k
        not in (
            "load_data",
            "model_factory",
            "train_config",
            "quick",
            "description",
            "inapplicable",
            "method_kwargs",
            "eval_batch_size",
            "self_attribution",
        )
    }
    out = {"setting": fields, "train_config": cfg, "version": 1}
    model_fingerprint = getattr(setting.model_factory, "fingerprint", None)
    if callable(model_fingerprint):  # e.g. pretrained vs config-built starting weights
        out["model"] = model_fingerprint()
    return out


def _setting_dir(setting: Setting, cache_dir: Path | None, quick: bool) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / (setting.name + ("-quick" if quick else ""))


def _differing_fields(old: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fingerprint fields that differ between two manifests."""
    out = []
    for key in sorted(set(old) | set(now) - {"digest"}):
        if key == "digest":
            continue
        a, b = old.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _check_manifest(path: Path, setting: Setting) -> None:
    manifest = path / "manifest.json"
    fp = _fingerprint(setting)
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("digest") != digest:
            now = json.loads(json.dumps(fp, default=str))
            differ = _differing_fields(old, now)
            what = f" (differs in: {', '.join(differ)})" if differ else ""
            msg = (
                f"{path} was prepared for a different configuration of {setting.name!r}"
                f"{what}. Delete that directory or pass another --cache-dir."
            )
            raise ValueError(msg)
        return
    path.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"digest": digest, **fp}, indent=2, default=str))


def _save(obj: Any, file: Path) -> None:
    tmp = file.with_suffix(file.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(file)


def _vectorizable(model: nn.Module) -> bool:
    return not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        or (isinstance(m, nn.Dropout) and m.p > 0)  # dropout(p=0) is the identity
        for m in model.modules()
    )


def train_models(
    setting: Setting,
    x: Tensor,
    y: Tensor,
    masks: Tensor,
    init_seeds: list[int],
    config: SubsetTrainConfig | None = None,
    verbose: bool = True,
) -> list[dict[str, Tensor]]:
    """Train one model per 0/1 mask with the setting's recipe.

    Small models (no BatchNorm/Dropout) train all at once with
    :func:`~dattri.model_util.subset_train.train_subset_models`; others one by one
    with minibatch SGD over the masked subset.

    Args:
        setting: the setting.
        x: ``(n, ...)`` training inputs.
        y: ``(n,)`` labels.
        masks: ``(n_models, n)`` subset masks.
        init_seeds: initialisation seed of each model.
        config: training recipe (default: the setting's).
        verbose: progress bars.

    Returns:
        The trained state_dicts.
    """
    config = config or setting.train_config
    if _vectorizable(setting.model_factory()):
        return train_subset_models(
            setting.model_factory,
            (x, y),
            masks,
            config,
            init_seeds=init_seeds,
            vectorized=True,
            verbose=verbose,
        )
    out = []
    for mask, seed in zip(masks, init_seeds, strict=True):
        idx = torch.nonzero(mask).flatten()
        loader = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=config.batch_size or len(idx))
        model = _train_model(setting, config, loader, seed, config.seed, verbose)
        out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return out


def _train_model(
    setting: Setting,
    config: SubsetTrainConfig,
    loader: DataLoader,
    init_seed: int,
    seed: int,
    verbose: bool,
) -> nn.Module:
    """One model of ``setting`` trained by minibatch SGD on ``loader``.

    The global RNG is seeded with ``init_seed`` before the model is built;
    ``seed`` seeds the shuffling and dropout of training.
    """
    from dattri.benchmark.models import train_classifier

    torch.manual_seed(init_seed)
    return train_classifier(
        setting.model_factory(),
        loader,
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        seed=seed,
        device=config.device,
        verbose=verbose,
    )


def per_sample_test_loss(
    setting: Setting,
    state_dict: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    device: str | torch.device | None = None,
) -> Tensor:
    """Loss of each test sample under a model, ``(n_test,)`` on the CPU.

    Cross-entropy, or the setting's per-sample training loss when it is a callable
    (e.g. the mean next-token loss of a sequence). Evaluated in batches of the
    setting's ``eval_batch_size`` (all at once when it is None) on ``device``
    (default: the training device).
    """
    device = setting.train_config.device if device is None else device
    model = setting.model_factory()
    model.load_state_dict(state_dict)
    model.to(device).eval()
    loss = setting.train_config.loss
    step = setting.eval_batch_size or max(len(x), 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), step):
            xb, yb = x[start : start + step].to(device), y[start : start + step].to(device)
            if callable(loss):
                out.append(loss(model(xb), yb).cpu())
            else:
                out.append(nn.functional.cross_entropy(model(xb), yb, reduction="none").cpu())
    return torch.cat(out)


class PreparedSetting:
    """A prepared setting's files, loaded lazily.

    Args:
        setting: the setting.
        path: its cache directory.
    """

    def __init__(self, setting: Setting, path: Path) -> None:
        self.setting = setting
        self.path = path
        data = torch.load(path / "data.pt", weights_only=True)
        self.x_train: Tensor = data["x_train"]
        self.y_train: Tensor = data["y_train"]
        self.x_test: Tensor = data["x_test"]
        self.y_test: Tensor = data["y_test"]
        self.noisy: Tensor = data["noisy"]

    def state_dict(self, name: str) -> dict[str, Tensor]:
        """Load ``models/<name>.pt``."""
        return torch.load(self.path / "models" / f"{name}.pt", weights_only=True)

    def model(self, name: str = "full") -> nn.Module:
        """A fresh model with ``models/<name>.pt`` loaded, in eval mode."""
        model = self.setting.model_factory()
        model.load_state_dict(self.state_dict(name))
        return model.eval()

    def checkpoint_paths(self, prefix: str) -> list[str]:
        """Paths of ``models/<prefix>_<k>.pt`` in order."""
        files = sorted(
            (self.path / "models").glob(f"{prefix}_*.pt"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )
        return [str(f) for f in files]

    def lds_ground_truth(self) -> tuple[Tensor, Tensor]:
        """``(values (S, n_test), indices (S, subset_size))``."""
        return tuple(torch.load(self.path / "lds_gt.pt", weights_only=True))  # type: ignore[return-value]

    def loo_ground_truth(self) -> tuple[Tensor, Tensor] | None:
        """``(values (n_loo, n_test), removed (n_loo,))`` or None."""
        file = self.path / "loo_gt.pt"
        if not file.exists():
            return None
        return tuple(torch.load(file, weights_only=True))  # type: ignore[return-value]


def prepare(
    setting: Setting,
    cache_dir: Path | None = None,
    data_dir: Path | None = None,
    quick: bool = False,
    verbose: bool = True,
    download: bool = False,
    device: str | None = None,
) -> PreparedSetting:
    """Train the models of a setting and build its LDS (and LOO) ground truth.

    Resumable: pieces already on disk are kept (``verbose`` says so in one line).

    Args:
        setting: the setting (already in its quick version when ``quick``).
        cache_dir: root cache directory (default :func:`default_cache_dir`).
        data_dir: where the dataset files are (for MNIST/CIFAR settings).
        quick: whether this is the quick version (changes the directory name).
        verbose: progress bars.
        download: fetch missing dataset files (MNIST/CIFAR settings).
        device: training device (default: the setting's ``train_config.device``);
            not part of the cache fingerprint.

    Returns:
        The prepared setting.

    Raises:
        MissingDataError: if the dataset files are missing and ``download`` is False.
        ValueError: if the cache directory was prepared for another configuration.
    """
    path = _setting_dir(setting, cache_dir, quick)
    resumed = (path / "manifest.json").exists()
    _check_manifest(path, setting)
    (path / "models").mkdir(exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    if resumed:
        kept = len(list(path.glob("*.pt"))) + len(list((path / "models").glob("*.pt")))
        say(f"[{setting.name}] resuming in {path} ({kept} finished file(s) kept)")

    data_file = path / "data.pt"
    if not data_file.exists():
        x_tr, y_tr, x_te, y_te = _load_data(setting, data_dir, download)
        noisy = torch.zeros(len(y_tr), dtype=torch.bool)
        if setting.noise_ratio > 0:
            flipped, idx = flip_label(y_tr, p=setting.noise_ratio, seed=0)
            y_tr = torch.as_tensor(flipped, dtype=torch.long)
            noisy[torch.as_tensor(idx, dtype=torch.long)] = True
        _save(
            {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "noisy": noisy},
            data_file,
        )
    prepared = PreparedSetting(setting, path)
    x, y = prepared.x_train, prepared.y_train
    n = len(y)
    cfg = setting.train_config if device is None else replace(setting.train_config, device=device)

    # The attributed model and its training trajectory (TracIn checkpoints).
    if not (path / "models" / "full.pt").exists():
        say(f"[{setting.name}] training the model")
        (sd,) = train_models(setting, x, y, torch.ones(1, n), [0], cfg, verbose=verbose)
        _save(sd, path / "models" / "full.pt")
    k_traj = setting.num_tracin_checkpoints
    for k in range(k_traj):
        file = path / "models" / f"traj_{k}.pt"
        if not file.exists():
            epochs = max(1, round(cfg.epochs * (k + 1) / k_traj))
            (sd,) = train_models(
                setting, x, y, torch.ones(1, n), [0], replace(cfg, epochs=epochs), verbose=verbose
            )
            _save(sd, file)

    # Half-subset models for ensembles.
    missing = [
        k for k in range(setting.num_ensemble) if not (path / "models" / f"half_{k}.pt").exists()
    ]
    if missing:
        say(f"[{setting.name}] training {len(missing)} ensemble models")
        masks = torch.zeros(len(missing), n)
        for row, k in enumerate(missing):
            pos = np.random.default_rng(10_000 + k).choice(n, n // 2, replace=False)
            masks[row, pos] = 1
        for k, sd in zip(
            missing, train_models(setting, x, y, masks, missing, cfg, verbose=verbose), strict=True
        ):
            _save(sd, path / "models" / f"half_{k}.pt")

    # LDS ground truth.
    test_loader = DataLoader(
        TensorDataset(prepared.x_test, prepared.y_test), batch_size=len(prepared.y_test)
    )

    def target(ckpt: str, loader: DataLoader) -> Tensor:
        xt, yt = next(iter(loader))
        sd = torch.load(ckpt, weights_only=True)
        return per_sample_test_loss(setting, sd, xt, yt, cfg.device)

    if not (path / "lds_gt.pt").exists():
        say(f"[{setting.name}] LDS ground truth: {setting.num_subsets} subsets")
        if _vectorizable(setting.model_factory()):
            retrain_lds_vectorized(
                setting.model_factory,
                (x, y),
                path / "lds",
                num_subsets=setting.num_subsets,
                subset_ratio=setting.subset_ratio,
                num_runs_per_subset=setting.runs_per_subset,
                seed=0,
                config=cfg,
                verbose=verbose,
            )
        else:
            _retrain_lds_loader(replace(setting, train_config=cfg), x, y, path / "lds", verbose)
        gt = calculate_lds_ground_truth(target, path / "lds", test_loader)
        _save(gt, path / "lds_gt.pt")

    # LOO ground truth (same initialisation as the full model, so that only the
    # removed sample differs).
    if setting.loo and not (path / "loo_gt.pt").exists():
        n_loo = n if setting.loo_size is None else min(n, setting.loo_size)
        say(f"[{setting.name}] LOO ground truth: {n_loo} models")
        masks = torch.ones(n_loo, n)
        masks[torch.arange(n_loo), torch.arange(n_loo)] = 0
        sds = train_models(setting, x, y, masks, [0] * n_loo, cfg, verbose=verbose)
        xt, yt = prepared.x_test, prepared.y_test
        values = torch.stack([per_sample_test_loss(setting, sd, xt, yt, cfg.device) for sd in sds])
        _save((values, torch.arange(n_loo)), path / "loo_gt.pt")
    return prepared


def _retrain_lds_loader(setting: Setting, x: Tensor, y: Tensor, path: Path, verbose: bool) -> None:
    """LDS retraining one model at a time (models with BatchNorm/Dropout)."""
    from dattri.model_util import retrain_lds

    def train_func(loader: DataLoader, seed: int = 0, **_: Any) -> nn.Module:
        return _train_model(setting, setting.train_config, loader, seed, seed, verbose=False)

    loader = DataLoader(TensorDataset(x, y), batch_size=setting.train_config.batch_size or len(y))
    retrain_lds(
        train_func,
        loader,
        str(path),
        num_subsets=setting.num_subsets,
        subset_ratio=setting.subset_ratio,
        num_runs_per_subset=setting.runs_per_subset,
        seed=0,
    )


def load_prepared(
    setting: Setting, cache_dir: Path | None = None, quick: bool = False
) -> PreparedSetting | None:
    """The prepared setting if its ground truth exists, else None."""
    path = _setting_dir(setting, cache_dir, quick)
    if not (path / "lds_gt.pt").exists() or not (path / "manifest.json").exists():
        return None
    _check_manifest(path, setting)
    return PreparedSetting(setting, path)
