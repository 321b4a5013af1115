"""``dattri-bench run``: run attribution methods on a prepared setting and score them."""

from __future__ import annotations

import json
import math
import os
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dattri.benchmark.methods import METHODS, run_method
from dattri.benchmark.prepare import PreparedSetting
from dattri.metric import lds, loo_corr, mislabel_detection_auc

__all__ = ["MethodReport", "PeakRSS", "format_table", "run_benchmark"]


class PeakRSS:
    """Sample the process's resident set size in a thread; report the peak increase.

    Usage: ``with PeakRSS() as m: ...; m.peak_mb``.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> float:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page / 2**20
        except OSError:  # not Linux: fall back to the lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss() - self.base_mb)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base_mb = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss() - self.base_mb)


@dataclass
class MethodReport:
    """Quality and cost of one method on one setting."""

    method: str
    lds: float = math.nan
    lds_low: float = math.nan
    lds_high: float = math.nan
    loo: float = math.nan
    auc: float = math.nan
    cache_s: float = math.nan
    attribute_s: float = math.nan
    peak_mb: float = math.nan
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.double()))


def evaluate(
    name: str,
    prepared: PreparedSetting,
    device: str = "cpu",
    verbose: bool = False,
) -> MethodReport:
    """Run one method and compute its LDS (with 95% CI), LOO correlation and AUC."""
    report = MethodReport(name)
    reason = prepared.setting.inapplicable.get(name)
    if reason is not None:
        report.error = f"not applicable: {reason}"
        return report
    try:
        with PeakRSS() as mem:
            out = run_method(name, prepared, device=device, verbose=verbose)
    except Exception as exc:  # report and continue with the other methods
        report.error = f"{type(exc).__name__}: {exc}"
        if verbose:
            traceback.print_exc()
        return report
    report.cache_s, report.attribute_s, report.peak_mb = out.cache_s, out.attribute_s, mem.peak_mb
    scores = out.scores.double()
    _, _, ci = lds(scores, prepared.lds_ground_truth(), ci=0.95)
    report.lds, report.lds_low, report.lds_high = ci.mean, ci.low, ci.high
    loo_gt = prepared.loo_ground_truth()
    if loo_gt is not None:
        values, removed = loo_gt
        corr, _ = loo_corr(scores[removed.long()], (values, removed))
        report.loo = _nanmean(corr)
    if bool(prepared.noisy.any()) and out.self_scores is not None:
        auc, _ = mislabel_detection_auc(out.self_scores.double(), prepared.noisy.long())
        report.auc = float(auc)
    return report


def run_benchmark(
    prepared: PreparedSetting,
    methods: Sequence[str] | None = None,
    device: str = "cpu",
    verbose: bool = False,
) -> list[MethodReport]:
    """Evaluate several methods (default: all) on a prepared setting."""
    names = list(METHODS) if not methods else list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        msg = f"Unknown method(s) {unknown}; available: {list(METHODS)}."
        raise ValueError(msg)
    reports = []
    for name in names:
        if verbose:
            print(f"  running {name} ...", flush=True)
        reports.append(evaluate(name, prepared, device=device, verbose=verbose))
    return reports


def _fmt(x: float, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_table(setting: str, reports: Sequence[MethodReport]) -> str:
    """Markdown table of reports."""
    lines = [
        f"### {setting}",
        "",
        "| method | LDS | LDS 95% CI | LOO | noisy AUC | cache s | attribute s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        if r.error:
            lines.append(f"| {r.method} | error: {r.error[:80]} | | | | | | |")
            continue
        lines.append(
            f"| {r.method} | {_fmt(r.lds)} | [{_fmt(r.lds_low)}, {_fmt(r.lds_high)}] | "
            f"{_fmt(r.loo)} | {_fmt(r.auc)} | {_fmt(r.cache_s, 2)} | {_fmt(r.attribute_s, 2)} | "
            f"{_fmt(r.peak_mb, 0)} |"
        )
    return "\n".join(lines)


def write_json(path: Path, setting: str, reports: Sequence[MethodReport]) -> None:
    """Write the reports as JSON."""
    path.write_text(
        json.dumps({"setting": setting, "results": [r.__dict__ for r in reports]}, indent=2)
    )


def plot_bars(path: Path, setting: str, reports: Sequence[MethodReport]) -> bool:
    """Bar chart of LDS with CI error bars (needs matplotlib, the ``bench`` extra).

    Returns:
        True if the PNG was written, False if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in reports if r.error is None]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(ok) + 1), 3.5))
    xs = range(len(ok))
    vals = [r.lds for r in ok]
    err = [[r.lds - r.lds_low for r in ok], [r.lds_high - r.lds for r in ok]]
    ax.bar(xs, vals, yerr=err, capsize=3, color="#4c72b0")
    ax.set_xticks(list(xs), [r.method for r in ok], rotation=45, ha="right")
    ax.set_ylabel("LDS (95% CI)")
    ax.set_title(setting)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
