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
from typing import Any

import torch

from dattri.benchmark.methods import METHODS, run_method
from dattri.benchmark.prepare import PreparedSetting
from dattri.metric import lds, loo_corr, mislabel_detection_auc

__all__ = [
    "MethodReport",
    "PeakRSS",
    "format_table",
    "plot_bars",
    "plot_lds_vs_time",
    "read_json",
    "run_benchmark",
    "run_metadata",
    "save_results",
    "write_json",
]


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
    applicable: bool = True

    @property
    def failed(self) -> bool:
        """An error of a method that applies (a not-applicable method is not a failure)."""
        return self.error is not None and self.applicable


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
        report.applicable = False
        return report
    try:
        with PeakRSS() as mem:
            out = run_method(name, prepared, device=device, verbose=verbose)
    except Exception as exc:  # report and continue with the other methods
        report.error = f"{type(exc).__name__}: {exc}"
        report.extra["traceback"] = traceback.format_exc()  # kept in the saved JSON
        if verbose:
            print(f"  {name} failed: {report.error}", flush=True)
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


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (one line, no column separators)."""
    return " ".join(text.split()).replace("|", "\\|")


def format_table(setting: str, reports: Sequence[MethodReport]) -> str:
    """Markdown table of reports (a failed method's row shows its error)."""
    lines = [
        f"### {setting}",
        "",
        "| method | LDS | LDS 95% CI | LOO | noisy AUC | cache s | attribute s | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        if r.error:
            err = _cell(r.error)
            err = err if len(err) <= 120 else err[:117] + "..."
            lines.append(f"| {r.method} | error: {err} | | | | | | |")
            continue
        lines.append(
            f"| {r.method} | {_fmt(r.lds)} | [{_fmt(r.lds_low)}, {_fmt(r.lds_high)}] | "
            f"{_fmt(r.loo)} | {_fmt(r.auc)} | {_fmt(r.cache_s, 2)} | {_fmt(r.attribute_s, 2)} | "
            f"{_fmt(r.peak_mb, 0)} |"
        )
    return "\n".join(lines)


def _strict(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _strict(value.tolist())
    return value


def run_metadata(**extra: Any) -> dict[str, Any]:
    """Where a result comes from: library versions, platform, UTC time, plus ``extra``."""
    import platform
    from datetime import datetime, timezone

    import dattri

    return {
        "dattri_version": dattri.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }


def write_json(
    path: Path, setting: str, reports: Sequence[MethodReport], meta: dict | None = None
) -> None:
    """Write the reports as strict JSON (a missing value, e.g. NaN, is ``null``).

    Args:
        path: the file to write.
        setting: the setting's display name.
        reports: one report per method.
        meta: provenance, e.g. :func:`run_metadata` (stored under ``"meta"``).
    """
    doc = {"setting": setting, "results": [dict(r.__dict__) for r in reports]}
    if meta is not None:
        doc["meta"] = meta
    Path(path).write_text(json.dumps(_strict(doc), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> tuple[str, list[MethodReport], dict]:
    """Read a file written by :func:`write_json`.

    Returns:
        ``(setting, reports, meta)``; a ``null`` number becomes NaN again.
    """
    doc = json.loads(Path(path).read_text())
    reports = []
    for row in doc["results"]:
        kw = {
            k: (math.nan if v is None and k not in ("error", "extra") else v)
            for k, v in row.items()
        }
        kw["extra"] = kw.get("extra") or {}
        reports.append(MethodReport(**kw))
    return doc["setting"], reports, doc.get("meta", {})


def _pyplot() -> Any:
    """Matplotlib's pyplot on the file-only Agg backend, or None if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _ok(reports: Sequence[MethodReport]) -> list[MethodReport]:
    return [r for r in reports if r.error is None and math.isfinite(r.lds)]


def plot_bars(path: Path, setting: str, reports: Sequence[MethodReport]) -> bool:
    """Bar chart of LDS with its 95% CI per method, best first (matplotlib, Agg).

    Returns:
        True if the PNG was written, False if matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return False
    ok = sorted(_ok(reports), key=lambda r: -r.lds)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(ok) + 1.5), 4.0))
    xs = list(range(len(ok)))
    err = [[r.lds - r.lds_low for r in ok], [r.lds_high - r.lds for r in ok]]
    ax.bar(xs, [r.lds for r in ok], yerr=err, capsize=3, color="#4c72b0")
    ax.set_xticks(xs, [r.method for r in ok], rotation=45, ha="right")
    ax.set_ylabel("LDS (mean over test samples, 95% CI)")
    ax.set_ylim(min(0.0, *(r.lds_low for r in ok)) if ok else 0.0, 1.0)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{setting}: LDS by method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _place_labels(fig: Any, ax: Any, points: list) -> None:
    """Label each ``(time, report)`` point where a label fits without overlapping."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    taken: list = []
    for t, r in points:  # the markers and error bars are taken too
        (x0, y0), (_, y1) = ax.transData.transform([(t, r.lds_low), (t, r.lds_high)])
        taken.append(Bbox([[x0 - 4, y0], [x0 + 4, y1]]))
    offsets = [(6, 4), (6, -12), (-6, 4), (-6, -12), (6, 14), (-6, 14), (6, -22), (-6, -22)]
    for t, r in sorted(points, key=lambda p: -p[1].lds):
        for dx, dy in offsets:
            text = ax.annotate(
                r.method,
                (t, r.lds),
                textcoords="offset points",
                xytext=(dx, dy),
                fontsize=8,
                ha="left" if dx > 0 else "right",
            )
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in taken):
                break
            text.remove()
        else:  # no free place: the legend names the point
            continue
        taken.append(box)


def plot_lds_vs_time(path: Path, setting: str, reports: Sequence[MethodReport]) -> bool:
    """LDS (with its 95% CI) against cache + attribute seconds, log time axis.

    The quality/cost picture to choose a method from: up and to the left is better.

    Returns:
        True if the PNG was written, False if matplotlib is missing.
    """
    plt = _pyplot()
    if plt is None:
        return False
    ok = [r for r in _ok(reports) if math.isfinite(r.cache_s + r.attribute_s)]
    fig, ax = plt.subplots(figsize=(9.0, 5.0))
    floor = 1e-3  # seconds: a method faster than the timer's resolution sits here
    points = []
    for i, r in enumerate(ok):
        t = max(r.cache_s + r.attribute_s, floor)
        ax.errorbar(
            t,
            r.lds,
            yerr=[[r.lds - r.lds_low], [r.lds_high - r.lds]],
            fmt="osD^v"[(i // 10) % 5],
            color=plt.cm.tab10(i % 10),
            capsize=3,
            markersize=6,
            label=r.method,
        )
        points.append((t, r))
    ax.set_xscale("log")
    ax.set_xlabel("cache + attribute time (s, log scale)")
    ax.set_ylabel("LDS (95% CI)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{setting}: quality against cost (up and left is better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()  # before the labels: they are placed in the final display coordinates
    _place_labels(fig, ax, points)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save_results(
    out_dir: Path,
    stem: str,
    setting: str,
    reports: Sequence[MethodReport],
    meta: dict | None = None,
) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the two plots into ``out_dir``.

    Args:
        out_dir: the folder (created if missing).
        stem: file name stem, e.g. ``"digits-lr-quick"``.
        setting: the setting's display name.
        reports: one report per method.
        meta: provenance stored in the JSON (see :func:`run_metadata`).

    Returns:
        The files written (the plots only if matplotlib is installed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_json(written[0], setting, reports, meta)
    written[1].write_text(format_table(setting, reports) + "\n")
    for suffix, plot in (("lds", plot_bars), ("lds-vs-time", plot_lds_vs_time)):
        file = out_dir / f"{stem}-{suffix}.png"
        if plot(file, setting, reports):
            written.append(file)
    return written
