"""``dattri-bench prepare SETTING --export-upstream DIR``: a prepared setting in upstream's layout.

Writes ``DIR/benchmark/<identifier>/`` so that
``dattri.benchmark.load.load_benchmark(model, dataset, metric, download_path=DIR)``
loads it offline (``<identifier>`` is the setting name with ``-`` replaced by
``_``: ``digits-lr`` -> ``digits_lr``, i.e. ``dataset="digits", model="lr"``)::

    models_full/0/model_weights_0.pt    the attributed model (state_dict)
    models_half/<k>/model_weights_0.pt  the half-subset ensemble models
    models_traj/<k>/model_weights_0.pt  checkpoints along training (TracIn; ours)
    lds/indices_lds.pt                  (S, subset_size) int64 positions
    lds/target_values_lds.pt            (S, n_test) negated mean test loss
    loo/indices_loo.pt                  (n_loo,) removed positions (if the setting has LOO)
    loo/target_values_loo.pt            (n_loo, n_test) test loss without each sample
    data.pt                             x_train, y_train, x_test, y_test, noisy (as prepared)
    dattri_export.json                  setting name, quick flag, sizes
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dattri.benchmark.prepare import PreparedSetting

__all__ = ["export_upstream", "upstream_identifier"]


def upstream_identifier(setting_name: str) -> str:
    """``"<dataset>_<model>"`` of a setting: its name with ``-`` replaced by ``_``.

    Args:
        setting_name: A setting name such as ``"mnist-lr"``.

    Returns:
        The identifier, e.g. ``"mnist_lr"`` (upstream's own id for that setting).
    """
    return setting_name.replace("-", "_")


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _save(obj: object, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, dest)


def export_upstream(
    prepared: PreparedSetting, out_dir: str | os.PathLike, quick: bool = False
) -> Path:
    """Write a prepared setting in upstream's benchmark layout.

    An existing export of the same identifier in ``out_dir`` is replaced.

    Args:
        prepared: The prepared setting (``dattri.benchmark.prepare.prepare``).
        out_dir: The ``download_path`` to give ``load_benchmark``.
        quick: Whether ``prepared`` is the quick version of its setting
            (recorded so that ``load_benchmark`` rebuilds the same setting).

    Returns:
        The benchmark folder ``out_dir/benchmark/<identifier>``.
    """
    setting = prepared.setting
    identifier = upstream_identifier(setting.name)
    root = Path(out_dir).expanduser() / "benchmark" / identifier
    if root.exists():
        shutil.rmtree(root)
    models = prepared.path / "models"
    _copy(models / "full.pt", root / "models_full" / "0" / "model_weights_0.pt")
    for prefix, folder in (("half", "models_half"), ("traj", "models_traj")):
        for k, file in enumerate(prepared.checkpoint_paths(prefix)):
            _copy(Path(file), root / folder / str(k) / "model_weights_0.pt")
    values, indices = prepared.lds_ground_truth()
    _save(values, root / "lds" / "target_values_lds.pt")
    _save(indices.long(), root / "lds" / "indices_lds.pt")
    loo = prepared.loo_ground_truth()
    if loo is not None:
        _save(loo[0], root / "loo" / "target_values_loo.pt")
        _save(loo[1].long(), root / "loo" / "indices_loo.pt")
    _save(
        {
            "x_train": prepared.x_train,
            "y_train": prepared.y_train,
            "x_test": prepared.x_test,
            "y_test": prepared.y_test,
            "noisy": prepared.noisy,
        },
        root / "data.pt",
    )
    manifest = {
        "format": "dattri-upstream-export",
        "version": 1,
        "setting": setting.name,
        "quick": bool(quick),
        "identifier": identifier,
        "n_train": len(prepared.y_train),
        "n_test": len(prepared.y_test),
        "data": "data.pt",
        "source": str(prepared.path),
    }
    (root / "dattri_export.json").write_text(json.dumps(manifest, indent=2))
    return root
