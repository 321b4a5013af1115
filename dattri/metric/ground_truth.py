"""Ground truth for LDS and LOO from models written by ``dattri.model_util`` retrainers.

Both builders call ``target_func(ckpt_path, test_dataloader)`` where ``ckpt_path`` is
the path (``str``) of a saved ``state_dict``; the function loads it into a fresh
model (``model.load_state_dict(torch.load(ckpt_path, weights_only=True))``) and
returns a tensor of shape ``(n_test,)`` (e.g. per-sample test loss).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.model_util._data import read_yaml

__all__ = ["calculate_lds_ground_truth", "calculate_loo_ground_truth"]

TargetFunc = Callable[[str, DataLoader], Any]


def _resolve(retrain_dir: Path, entry: str) -> Path:
    """Resolve a metadata path: relative to ``retrain_dir`` (or, legacy, to the CWD)."""
    p = Path(entry)
    if p.is_absolute():
        return p
    candidate = retrain_dir / p
    if not candidate.exists() and p.exists():  # upstream wrote CWD-relative paths
        return p
    return candidate


def _target(target_func: TargetFunc, ckpt: Path, loader: DataLoader) -> torch.Tensor:
    if not ckpt.exists():
        msg = f"Missing checkpoint {ckpt}; finish the retraining run (it is resumable)."
        raise FileNotFoundError(msg)
    out = torch.as_tensor(target_func(str(ckpt), loader)).detach().cpu()
    return out.reshape(-1)


def _stack(values: list[torch.Tensor], what: str) -> torch.Tensor:
    sizes = {v.numel() for v in values}
    if len(sizes) != 1:
        msg = f"target_func returned tensors of different sizes {sorted(sizes)} for {what}."
        raise ValueError(msg)
    return torch.stack(values)


def _read_meta(retrain_dir: Path, mode: str) -> dict[str, Any] | None:
    file = retrain_dir / "metadata.yml"
    if not file.exists():
        return None
    meta = read_yaml(file)
    if meta.get("mode") != mode:
        msg = f"{file} has mode {meta.get('mode')!r}, expected {mode!r}."
        raise ValueError(msg)
    return meta


def calculate_lds_ground_truth(
    target_func: TargetFunc,
    retrain_dir: str | Path,
    test_dataloader: DataLoader,
    *,
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDS ground truth from a :func:`dattri.model_util.retrain_lds` directory.

    For every subset the target is averaged over its runs and **negated** (so
    that with a loss-type target, larger = better and attribution scores should
    correlate positively).

    Args:
        target_func: ``target_func(ckpt_path: str, test_dataloader)`` returning
            ``(n_test,)`` values for the model saved at ``ckpt_path``.
        retrain_dir: Directory written by ``retrain_lds`` /
            ``retrain_lds_vectorized``.
        test_dataloader: Passed to ``target_func`` unchanged.
        verbose: Show a tqdm progress bar.

    Returns:
        ``(values, indices)``: ``values`` of shape ``(num_subsets, n_test)`` and
        ``indices`` (int64) of shape ``(num_subsets, subset_size)`` holding the
        subset positions (rows of the score matrix), in subset-id order.

    Raises:
        FileNotFoundError: If ``metadata.yml`` or a checkpoint is missing.
        ValueError: If the directory is not an LDS retraining directory.
    """
    retrain_dir = Path(retrain_dir)
    meta = _read_meta(retrain_dir, "lds")
    if meta is None:
        msg = (
            f"No metadata.yml in {retrain_dir}; run dattri.model_util.retrain_lds first "
            "(metadata is written once every subset has its models)."
        )
        raise FileNotFoundError(msg)
    num_runs = int(meta["num_runs_per_subset"])
    dir_map = {int(k): v for k, v in meta["subset_dir_map"].items()}
    values, indices = [], []
    for i in tqdm(sorted(dir_map), desc="LDS ground truth", disable=not verbose):
        subset_dir = _resolve(retrain_dir, str(dir_map[i]))
        idx_file = subset_dir / "indices.txt"
        if not idx_file.exists():
            msg = f"Missing {idx_file}."
            raise FileNotFoundError(msg)
        indices.append(np.array([int(t) for t in idx_file.read_text().split()], dtype=np.int64))
        runs = [
            _target(target_func, subset_dir / f"model_weights_{j}.pt", test_dataloader)
            for j in range(num_runs)
        ]
        values.append(_stack(runs, f"subset {i}").mean(0))
    if len({len(ix) for ix in indices}) != 1:
        msg = "Subsets have different sizes; cannot stack indices."
        raise ValueError(msg)
    return -_stack(values, "subsets"), torch.from_numpy(np.stack(indices))


def calculate_loo_ground_truth(
    target_func: TargetFunc,
    retrain_dir: str | Path,
    test_dataloader: DataLoader,
    *,
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOO ground truth from a :func:`dattri.model_util.retrain_loo` directory.

    Unlike upstream (which loaded pickled models and passed the model object),
    ``target_func`` receives the checkpoint path of a ``state_dict``, exactly like
    :func:`calculate_lds_ground_truth`. The values are the raw targets (not
    negated, not differenced), one row per removed training sample.

    Args:
        target_func: ``target_func(ckpt_path: str, test_dataloader)`` returning
            ``(n_test,)`` values.
        retrain_dir: Directory written by ``retrain_loo``.
        test_dataloader: Passed to ``target_func`` unchanged.
        verbose: Show a tqdm progress bar.

    Returns:
        ``(values, removed)``: ``values`` of shape ``(n_models, n_test)`` and
        ``removed`` (int64, shape ``(n_models,)``) the left-out positions in
        increasing order (row ``k`` of ``values`` is the model without sample
        ``removed[k]``). Pass both to :func:`dattri.metric.loo_corr`.

    Raises:
        FileNotFoundError: If no LOO model is found or a checkpoint is missing.
        ValueError: If the directory is not an LOO retraining directory.
    """
    retrain_dir = Path(retrain_dir)
    meta = _read_meta(retrain_dir, "loo")
    if meta is not None:
        dir_map = {int(k): str(v) for k, v in meta["map_index_dir"].items()}
    else:  # legacy layout: scan index_<k> directories
        dir_map = {}
        for d in retrain_dir.iterdir():
            m = re.fullmatch(r"index_(\d+)", d.name)
            if m and d.is_dir():
                dir_map[int(m.group(1))] = d.name
    if not dir_map:
        msg = f"No LOO models found in {retrain_dir}; run dattri.model_util.retrain_loo."
        raise FileNotFoundError(msg)
    removed = sorted(dir_map)
    values = [
        _target(
            target_func,
            _resolve(retrain_dir, dir_map[k]) / "model_weights.pt",
            test_dataloader,
        )
        for k in tqdm(removed, desc="LOO ground truth", disable=not verbose)
    ]
    return _stack(values, "LOO models"), torch.tensor(removed, dtype=torch.int64)
