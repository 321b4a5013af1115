"""LDS (95% CI), time and peak memory of every method on the generative settings.

Prepares the setting (trains the attributed model, its trajectory and ensemble
checkpoints and the LDS ground-truth models; cached and resumable) and runs every
benchmark method on it, printing one markdown table::

    OMP_NUM_THREADS=2 python benchmarks/bench_generative.py --quick
    OMP_NUM_THREADS=2 python benchmarks/bench_generative.py --json corpus.json

Times: ``prepare`` (wall clock, only when it had to run), each method's ``cache`` and
``attribute`` (plus self-attribution) seconds; peak MB is the method's peak increase of
the process's resident set size. Methods that do not apply to the setting are listed
with the reason.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dattri.benchmark.prepare import load_prepared, prepare
from dattri.benchmark.run import format_table, run_benchmark
from dattri.benchmark.settings import get_setting


def main() -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="corpus-nanogpt")
    p.add_argument("--quick", action="store_true", help="the setting's --quick sizes")
    p.add_argument("--methods", nargs="+", default=None, help="default: all")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="write the reports here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()

    setting = get_setting(args.setting, quick=args.quick)
    t0 = time.perf_counter()
    prepared = load_prepared(setting, args.cache_dir, quick=args.quick)
    if prepared is None:
        prepared = prepare(setting, args.cache_dir, quick=args.quick, verbose=args.verbose)
        print(f"prepare: {time.perf_counter() - t0:.1f} s")
    else:
        print("prepare: cached")
    t1 = time.perf_counter()
    reports = run_benchmark(prepared, args.methods, device=args.device, verbose=args.verbose)
    name = setting.name + (" (quick)" if args.quick else "")
    print(format_table(name, reports))
    print(f"\nall methods: {time.perf_counter() - t1:.1f} s")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"setting": name, "results": [r.__dict__ for r in reports]}, indent=2)
        )


if __name__ == "__main__":
    main()
