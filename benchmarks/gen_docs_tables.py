"""Write the results tables of the docs from saved benchmark runs.

Every results table in ``docs/`` and ``README.md`` sits between two marker comments::

    <!-- BEGIN GENERATED TABLE digits-lr-quick -->
    ...
    <!-- END GENERATED TABLE digits-lr-quick -->

and is rendered by this script from the JSON a ``dattri-bench run`` saved under
``docs/data/`` (``TABLES`` below lists them). Nothing between the markers is typed
by hand. ``tests/test_cli_docs_tables.py`` checks that the committed tables equal
this script's output and that the committed JSON is what the current code computes.

    python benchmarks/gen_docs_tables.py            # rewrite the tables from docs/data/
    python benchmarks/gen_docs_tables.py --check    # exit 1 if a table is stale
    python benchmarks/gen_docs_tables.py --run      # rerun the benchmarks first

``--run`` executes, for each table's source, the command stored in ``TABLES``
(e.g. ``dattri-bench run digits-lr --quick``) into a temporary cache and copies the
saved JSON to ``docs/data/``.

The speed-and-memory tables against upstream dattri 0.3.0 (``SPEED_TABLES``) are
rendered the same way from the JSON that ``benchmarks/bench_attributors.py --out``
saved under ``docs/data/`` (process CPU seconds, peak RSS, machine, versions and the
command line). ``--run`` does not redo them (minutes per setting, and the figures
belong to the machine): rerun the command stored in the JSON's ``meta.command``, e.g.

    python benchmarks/bench_attributors.py --python python /path/to/upstream/bin/python \
        --settings digits-lr --repeat 2 --out docs/data/speed-digits-lr.json

then this script. A table whose header names CPU seconds, a speed-up, peak RSS or MB
counts as a results table too: it must be generated.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"

if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dattri.benchmark.run import MethodReport, read_json  # noqa: E402


@dataclass(frozen=True)
class Table:
    """One generated table.

    Attributes:
        key: marker name.
        doc: the Markdown file (relative to the repository root).
        source: the saved run (relative to ``docs/data``).
        argv: the ``dattri-bench`` arguments that produce ``source``.
    """

    key: str
    doc: str
    source: str
    argv: tuple[str, ...]


TABLES = [
    Table(
        key="digits-lr-quick",
        doc="docs/guide/choosing-a-method.md",
        source="digits-lr-quick.json",
        argv=("run", "digits-lr", "--quick"),
    ),
]


@dataclass(frozen=True)
class SpeedTable:
    """One generated speed-and-memory table (``benchmarks/bench_attributors.py --out``).

    Attributes:
        key: marker name.
        doc: the Markdown file (relative to the repository root).
        source: the saved run (relative to ``docs/data``).
        setting: the ``--settings`` value of the run (one setting per file).
        reruns: later runs (``--methods ...``) of the same setting whose cells
            replace those of ``source``, e.g. after a fix in the benchmark script.
    """

    key: str
    doc: str
    source: str
    setting: str
    reruns: tuple[str, ...] = ()


#: speed tables; their runs take minutes and depend on the machine, so ``--run``
#: does not redo them: rerun the command in each JSON's ``meta.command`` instead
SPEED_TABLES = [
    SpeedTable(
        key=f"speed-{setting}",
        doc="docs/guide/benchmark.md",
        source=f"speed-{setting}.json",
        setting=setting,
        # upstream RPS failed in the first run (the script ran the last layer twice)
        reruns=(f"speed-{setting}-rps.json",),
    )
    for setting in ("digits-lr", "digits-mlp")
]

BEGIN = "<!-- BEGIN GENERATED TABLE {key} -->"
END = "<!-- END GENERATED TABLE {key} -->"


def _f(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def caption(setting: str, meta: dict, command: str) -> str:
    """One paragraph: what was measured (sizes from the run's metadata) and with what."""
    parts = [
        f"`{setting}`: {meta['n_train']} training / {meta['n_test']} test samples, "
        f"{meta['num_params']:,} parameters; LDS over {meta['num_subsets']} models retrained "
        f"on random {meta['subset_ratio']:.0%} subsets (mean over test samples, bootstrap "
        "95% CI)"
    ]
    if meta.get("num_loo"):
        parts.append(
            "LOO: Pearson correlation with leave-one-out retraining of the first "
            f"{meta['num_loo']} training samples"
        )
    parts.append(f"dattri {meta['dattri_version']}, torch {meta['torch_version']}, `{command}`")
    return "; ".join(parts) + "."


def render_lds_table(reports: list[MethodReport], source: str) -> str:
    """Markdown table of LDS (95% CI) and LOO per method, best LDS first.

    Failed methods are listed last with their error. Times are left out: they belong
    to the machine that ran the benchmark (they are in the JSON).
    """
    ok = sorted((r for r in reports if not r.error), key=lambda r: -r.lds)
    lines = [
        "| method | LDS | LDS 95% CI | LOO |",
        "|---|---|---|---|",
        *(
            f"| {r.method} | {_f(r.lds)} | [{_f(r.lds_low)}, {_f(r.lds_high)}] | {_f(r.loo)} |"
            for r in ok
        ),
        *(f"| {r.method} | failed: {r.error.splitlines()[0]} | | |" for r in reports if r.error),
    ]
    return "\n".join(
        [
            f"<!-- generated by benchmarks/gen_docs_tables.py from docs/data/{source}; "
            "do not edit -->",
            *lines,
        ]
    )


def render(table: Table, data_dir: Path = DATA) -> str:
    """The block between the markers of ``table`` (markers excluded)."""
    setting, reports, meta = read_json(data_dir / table.source)
    lines = render_lds_table(reports, table.source).split("\n")
    command = "dattri-bench " + " ".join(table.argv)
    if not meta.get("command", "").startswith(command + " "):
        msg = f"{table.source} was not made by `{command}` (its command: {meta.get('command')})."
        raise ValueError(msg)
    return "\n".join([lines[0], "", caption(setting, meta, command), "", *lines[1:]])


def _secs(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _cpu_cell(r: dict) -> str:
    if "cache_cpu_s" not in r:
        reason = r.get("skipped") or r.get("error", "?")
        return ("n/a: " if "skipped" in r else "failed: ") + reason.replace("|", "/")
    total = r["cache_cpu_s"] + r["attribute_cpu_s"]
    approx = "≈" if r.get("note") else ""
    return f"{_secs(r['cache_cpu_s'])} + {approx}{_secs(r['attribute_cpu_s'])} = {approx}{_secs(total)}"


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}"


def _import_range(results: list[dict], label: str) -> str:
    """``"label lo–hi"`` of the import wall seconds over every run of ``label``."""
    runs = [run for r in results if r["label"] == label for run in r.get("runs", [r])]
    values = [run["import_s"] for run in runs if "import_s" in run]
    return f"{label} {_range(values)}" if values else ""


#: ``bench_attributors.py`` loads the training set in batches of this size
BENCH_BATCH_SIZE = 500


def render_speed_table(doc: dict, source: str) -> str:
    """Markdown table of process CPU seconds and peak RSS per method, ours against upstream.

    ``doc`` is the JSON that ``benchmarks/bench_attributors.py --out`` saved for one
    setting. Rows follow the run's method order; a failed or skipped cell shows its
    reason; the speed-up is upstream's CPU seconds over ours (cache + attribute).
    """
    meta, results = doc["meta"], doc["results"]
    libs = sorted(meta["libraries"], key=lambda lib: lib["upstream"])  # ours first
    settings = {r["setting"] for r in results}
    if len(settings) != 1:
        msg = f"{source}: expected the results of one setting, got {sorted(settings)}."
        raise ValueError(msg)
    (setting,) = settings
    cells: dict[str, dict[str, dict]] = {}
    for r in results:
        cells.setdefault(r["method"], {})[r["label"]] = r
    labels = [lib["label"] for lib in libs]
    pair = len(libs) == 2 and [lib["upstream"] for lib in libs] == [False, True]
    head = [f"{lab}: CPU s, cache + attribute" for lab in labels]
    head += ["speed-up (CPU)"] if pair else []
    head += [f"peak RSS MB ({' / '.join(labels)})", "notes"]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for method, by_label in cells.items():
        row = [by_label.get(lab, {"error": "not run"}) for lab in labels]
        cols = [_cpu_cell(r) for r in row]
        ok = all("cache_cpu_s" in r for r in row)
        if pair:
            cpu = [r["cache_cpu_s"] + r["attribute_cpu_s"] for r in row] if ok else None
            cols.append(f"{cpu[1] / cpu[0]:.1f}x" if ok and cpu[0] > 0 else "–")
        rss = [f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "–" for r in row]
        cols.append(" / ".join(rss))
        notes = [r["note"] for r in row if r.get("note")]
        n_test = {r["n_test"] for r in row if "n_test" in r}
        notes += (
            [f"first {min(n_test)} test samples (both)"] if n_test and min(n_test) < 200 else []
        )
        cols.append("; ".join(notes).replace("|", "/"))
        lines.append(f"| {method} | " + " | ".join(cols) + " |")
    first = next((r for r in results if "p" in r), {})
    imports = [_import_range(results, lab) for lab in labels]
    machine = meta["machine"]
    versions = ", ".join(
        f"{lib['label']} (torch {lib['torch_version']}, Python {lib['python_version']})"
        for lib in libs
    )
    load = meta.get("load_average_start", [None])[0]
    caption = (
        f"`{setting}`: {first.get('n_batches', 0) * BENCH_BATCH_SIZE:,} training / "
        f"{first.get('n_test', '?')} test samples, {first.get('p', 0):,} parameters. "
        f"Process CPU seconds of `cache()` + `attribute()` and the worker's peak RSS, median of "
        f"{meta['repeats']} run(s) per cell, each in a fresh process with {meta['threads']} "
        f"torch thread(s), libraries alternating; CPU: {machine['cpu']}, "
        f"{machine['cpu_count']} cores"
        + (f" (load average {load:.1f} at the start: a shared machine)" if load else "")
        + f"; {versions}. Import wall seconds (not timed above): {', '.join(filter(None, imports)) or '–'}. "
        f"Run {meta['started']} – {meta['finished']}: `{meta['command']}`."
    )
    for rerun in meta.get("reruns", []):
        caption += (
            f" Rows {', '.join(rerun['methods'])} from a rerun ({rerun['started']}, "
            f"docs/data/{rerun['source']}): `{rerun['command']}`."
        )
    return "\n".join(
        [
            f"<!-- generated by benchmarks/gen_docs_tables.py from docs/data/{source}; "
            "do not edit -->",
            "",
            caption,
            "",
            *lines,
        ]
    )


def _load_speed_run(source: str, setting: str, data_dir: Path) -> dict:
    doc = json.loads((data_dir / source).read_text())
    if doc["meta"].get("finished") is None:
        msg = f"{source}: the run did not finish (meta.finished is null); rerun it."
        raise ValueError(msg)
    argv = shlex.split(doc["meta"]["command"])
    settings = argv[argv.index("--settings") + 1 :] if "--settings" in argv else []
    settings = settings[: next((i for i, a in enumerate(settings) if a.startswith("--")), None)]
    if settings != [setting]:
        msg = (
            f"{source} was not made by `bench_attributors.py --settings {setting}` "
            f"(its command: {doc['meta']['command']})."
        )
        raise ValueError(msg)
    return doc


def speed_doc(table: SpeedTable, data_dir: Path = DATA) -> dict:
    """The run of ``table`` with the cells of its ``reruns`` put in place of the old ones.

    ``meta["reruns"]`` lists each rerun's ``meta`` and the methods it replaced.
    """
    doc = _load_speed_run(table.source, table.setting, data_dir)
    results = {(r["method"], r["label"]): r for r in doc["results"]}
    reruns = []
    for source in table.reruns:
        later = _load_speed_run(source, table.setting, data_dir)
        for r in later["results"]:
            if (r["method"], r["label"]) not in results:
                msg = f"{source}: {r['method']} / {r['label']} is not a cell of {table.source}."
                raise ValueError(msg)
            results[r["method"], r["label"]] = r
        methods = list(dict.fromkeys(r["method"] for r in later["results"]))
        reruns.append({**later["meta"], "source": source, "methods": methods})
    return {"meta": {**doc["meta"], "reruns": reruns}, "results": list(results.values())}


def render_speed(table: SpeedTable, data_dir: Path = DATA) -> str:
    """The block between the markers of a speed ``table`` (markers excluded)."""
    return render_speed_table(speed_doc(table, data_dir), table.source)


def render_any(table: Table | SpeedTable, data_dir: Path = DATA) -> str:
    """The block between the markers of any registered table."""
    if isinstance(table, SpeedTable):
        return render_speed(table, data_dir)
    return render(table, data_dir)


def _span(text: str, key: str, doc: str) -> tuple[int, int]:
    begin, end = BEGIN.format(key=key), END.format(key=key)
    if text.count(begin) != 1 or text.count(end) != 1:
        msg = f"{doc}: expected one {begin!r} and one {end!r} marker line."
        raise ValueError(msg)
    start = text.index(begin) + len(begin)
    stop = text.index(end)
    if stop < start:
        msg = f"{doc}: the END marker of {key!r} comes before its BEGIN marker."
        raise ValueError(msg)
    return start, stop


def committed_block(table: Table, root: Path = ROOT) -> str:
    """The text currently between the markers of ``table`` in its document."""
    text = (root / table.doc).read_text()
    start, stop = _span(text, table.key, table.doc)
    return text[start:stop].strip("\n")


def update(check: bool = False, root: Path = ROOT, data_dir: Path = DATA) -> list[str]:
    """Rewrite (or with ``check`` only compare) every table.

    Returns:
        ``"doc: key"`` of every table that was (or would be) changed.
    """
    changed = []
    for table in [*TABLES, *SPEED_TABLES]:
        path = root / table.doc
        text = path.read_text()
        start, stop = _span(text, table.key, table.doc)
        new = "\n" + render_any(table, data_dir) + "\n"
        if text[start:stop] != new:
            changed.append(f"{table.doc}: {table.key}")
            if not check:
                path.write_text(text[:start] + new + text[stop:])
    return changed


def rerun(data_dir: Path = DATA) -> None:
    """Run each table's benchmark command (fresh cache) and store its JSON."""
    from dattri.benchmark.cli import main

    data_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted({t.source for t in TABLES}):
        table = next(t for t in TABLES if t.source == source)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            argv = [*table.argv, "--quiet", "--cache-dir", str(Path(tmp) / "cache")]
            argv += ["--out", str(out)]
            code = main(argv)
            if code != 0:
                msg = f"dattri-bench {' '.join(table.argv)} exited with {code}"
                raise SystemExit(msg)
            (saved,) = out.glob("*.json")
            shutil.copyfile(saved, data_dir / source)


#: a Markdown table's header cell naming a benchmark quality measure
RESULTS_CELL = re.compile(r"^\s*(LDS|LOO|AUC|noisy AUC|LDS 95% CI)\b")
#: a Markdown table's header cell naming a speed or memory measure
SPEED_CELL = re.compile(r"(\bCPU s\b|\bs\b\s*$|speed-?up|peak RSS|\bMB\b)", re.IGNORECASE)
SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")


def results_tables_outside_markers(root: Path = ROOT) -> list[str]:
    """``file:line`` of every results table not between markers.

    A results table is a Markdown table whose header has an LDS, LOO or AUC column,
    or a speed/memory column (CPU seconds, speed-up, peak RSS, MB).
    """
    found = []
    for path in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        inside = False
        lines = path.read_text().splitlines()
        for no, line in enumerate(lines, 1):
            if line.startswith("<!-- BEGIN GENERATED TABLE "):
                inside = True
            elif line.startswith("<!-- END GENERATED TABLE "):
                inside = False
            elif (
                not inside
                and line.startswith("|")
                and no < len(lines)
                and SEPARATOR.match(lines[no])
                and any(
                    RESULTS_CELL.match(cell) or SPEED_CELL.search(cell)
                    for cell in line.strip().strip("|").split("|")
                )
            ):
                found.append(f"{path.relative_to(root)}:{no}")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report stale tables (exit 1)")
    ap.add_argument("--run", action="store_true", help="rerun the benchmarks first")
    args = ap.parse_args(argv)
    if args.run:
        rerun()
    changed = update(check=args.check)
    for item in changed:
        print(("stale: " if args.check else "updated: ") + item)
    stray = results_tables_outside_markers()
    for item in stray:
        print(f"hand-typed results table (put it between markers): {item}")
    return 1 if (args.check and changed) or stray else 0


if __name__ == "__main__":
    sys.exit(main())
