"""Ground-truth protocols and LDS at several removal fractions.

Used by ``dattri-bench run SETTING --protocol fixed-seed --drop-fractions 0.01 0.1``.

Protocols (how each subset model is trained; the recipe is always the setting's
:class:`~dattri.model_util.SubsetTrainConfig`, batch order shared through its ``seed``):

* ``"default"``: subset ``i`` starts from its own initialisation (seed ``i``), as the
  setting's standard LDS ground truth does;
* ``"fixed-seed"``: every subset model starts from the full model's initialisation
  (seed 0) and sees the same batch order; removed samples have loss weight 0 (the
  masked batch mean of :func:`~dattri.model_util.train_step.weighted_mean_loss`). This
  is the training function MAGIC differentiates.

For a removal fraction ``f``, subset ``i`` drops ``max(1, round(f n))`` samples chosen by
``numpy.random.default_rng(20_000 + i)``; the LDS ground truth is the negated per-sample
test loss of each subset model and the kept positions. Files are cached under
``<prepared>/protocols/`` (resumable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dattri.benchmark.prepare import PreparedSetting, _save, per_sample_test_loss, train_models
from dattri.benchmark.run import MethodReport, PeakRSS, _fmt
from dattri.metric import lds

__all__ = ["PROTOCOLS", "evaluate_protocol", "format_fraction_table", "subset_ground_truth"]

PROTOCOLS = ("default", "fixed-seed")


def _check(protocol: str, fractions: Sequence[float]) -> None:
    if protocol not in PROTOCOLS:
        msg = f"Unknown protocol {protocol!r}; use one of {PROTOCOLS}."
        raise ValueError(msg)
    bad = [f for f in fractions if not 0 < f < 1]
    if bad:
        msg = f"--drop-fractions must lie in (0, 1); got {bad}."
        raise ValueError(msg)


def subset_ground_truth(
    prepared: PreparedSetting,
    protocol: str,
    drop_fraction: float,
    num_subsets: int | None = None,
    verbose: bool = False,
) -> tuple[Tensor, Tensor]:
    """LDS ground truth ``(values (S, n_test), kept indices (S, n - k))`` of a protocol.

    Args:
        prepared: the prepared setting.
        protocol: ``"default"`` or ``"fixed-seed"``.
        drop_fraction: fraction of training samples removed per subset, in ``(0, 1)``.
        num_subsets: subsets ``S`` (default: the setting's ``num_subsets``).
        verbose: progress bars.
    """
    _check(protocol, [drop_fraction])
    setting = prepared.setting
    s_count = int(num_subsets or setting.num_subsets)
    folder = prepared.path / "protocols"
    folder.mkdir(exist_ok=True)
    file = folder / f"{protocol}_drop{drop_fraction:g}_S{s_count}.pt"
    if file.exists():
        return tuple(torch.load(file, weights_only=True))  # type: ignore[return-value]
    x, y = prepared.x_train, prepared.y_train
    n = len(y)
    k = max(1, round(drop_fraction * n))
    masks = torch.ones(s_count, n)
    kept = []
    for i in range(s_count):
        drop = np.random.default_rng(20_000 + i).choice(n, k, replace=False)
        masks[i, torch.from_numpy(drop)] = 0
        kept.append(torch.nonzero(masks[i]).flatten())
    seeds = [0] * s_count if protocol == "fixed-seed" else list(range(s_count))
    if verbose:
        print(f"[{setting.name}] {protocol} ground truth, drop {drop_fraction:g}: {s_count} models")
    sds = train_models(setting, x, y, masks, seeds, verbose=verbose)
    values = -torch.stack(
        [per_sample_test_loss(setting, sd, prepared.x_test, prepared.y_test) for sd in sds]
    )
    gt = (values, torch.stack(kept))
    _save(gt, file)
    return gt


def evaluate_protocol(
    prepared: PreparedSetting,
    methods: Sequence[str],
    protocol: str,
    fractions: Sequence[float],
    device: str = "cpu",
    verbose: bool = False,
) -> list[MethodReport]:
    """Run each method once and score it at every removal fraction.

    Returns:
        One report per method; ``report.extra["lds_by_drop"]`` maps each fraction to
        ``[mean, ci_low, ci_high]`` and ``report.lds`` is the first fraction's mean.
    """
    from dattri.benchmark.methods import run_method

    _check(protocol, fractions)
    gts = {f: subset_ground_truth(prepared, protocol, f, verbose=verbose) for f in fractions}
    reports = []
    for name in methods:
        if verbose:
            print(f"  running {name} ...", flush=True)
        report = MethodReport(name)
        reason = prepared.setting.inapplicable.get(name)
        if reason is not None:
            report.error, report.applicable = f"not applicable: {reason}", False
            reports.append(report)
            continue
        try:
            with PeakRSS() as mem:
                out = run_method(name, prepared, device=device, verbose=verbose)
        except Exception as exc:  # report and continue with the other methods
            report.error = f"{type(exc).__name__}: {exc}"
            reports.append(report)
            continue
        report.cache_s, report.attribute_s, report.peak_mb = (
            out.cache_s,
            out.attribute_s,
            mem.peak_mb,
        )
        by_drop = {}
        for f, gt in gts.items():
            _, _, ci = lds(out.scores.double(), gt, ci=0.95)
            by_drop[f"{f:g}"] = [ci.mean, ci.low, ci.high]
        report.extra["lds_by_drop"] = by_drop
        report.extra["protocol"] = protocol
        first = by_drop[f"{fractions[0]:g}"]
        report.lds, report.lds_low, report.lds_high = first
        reports.append(report)
    return reports


def format_fraction_table(
    setting: str, reports: Sequence[MethodReport], fractions: Sequence[float], protocol: str
) -> str:
    """Markdown table: LDS (mean) per removal fraction, cache and attribute seconds."""
    cols = [f"LDS drop {f:g}" for f in fractions]
    lines = [
        f"### {setting}, protocol {protocol}",
        "",
        "| method | " + " | ".join(cols) + " | cache s | attribute s |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for r in reports:
        if r.error:
            lines.append(f"| {r.method} | error: {r.error[:80]} |" + " |" * (len(cols) + 1))
            continue
        vals = [r.extra["lds_by_drop"].get(f"{f:g}", [math.nan])[0] for f in fractions]
        lines.append(
            f"| {r.method} | "
            + " | ".join(_fmt(v) for v in vals)
            + f" | {_fmt(r.cache_s, 2)} | {_fmt(r.attribute_s, 2)} |"
        )
    return "\n".join(lines)
