"""The ``dattri-bench`` command (also ``python -m dattri.benchmark``).

Examples::

    dattri-bench list
    dattri-bench prepare digits-lr
    dattri-bench run digits-lr --methods if-explicit trak-10 --out results/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dattri-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list settings and methods")
    for name, helptext in (
        ("prepare", "train the models and build LDS/LOO ground truth"),
        ("run", "run attribution methods and print a table (prepares first if needed)"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("setting", help="a setting name (see `dattri-bench list`)")
        sp.add_argument("--cache-dir", type=Path, default=None, help="cache root directory")
        sp.add_argument("--data-dir", type=Path, default=None, help="dataset files (MNIST/CIFAR)")
        sp.add_argument("--quick", action="store_true", help="small sizes (smoke test, CI)")
        sp.add_argument("--quiet", action="store_true", help="no progress output")
        if name == "run":
            sp.add_argument("--methods", nargs="+", default=None, help="methods (default: all)")
            sp.add_argument("--device", default="cpu")
            sp.add_argument("--out", type=Path, default=None, help="folder for JSON and PNG")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dattri-bench``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    args = _parser().parse_args(argv)
    from dattri.benchmark.methods import METHODS
    from dattri.benchmark.settings import SETTINGS, get_setting

    if args.command == "list":
        print("Settings:")
        for s in SETTINGS.values():
            print(f"  {s.name:18s} {s.description}")
            for method, reason in s.inapplicable.items():
                print(f"  {'':18s}   not applicable: {method} ({reason})")
        print("Methods:")
        print("  " + ", ".join(METHODS))
        return 0

    from dattri.benchmark.prepare import load_prepared, prepare

    setting = get_setting(args.setting, quick=args.quick)
    verbose = not args.quiet
    prepared = load_prepared(setting, args.cache_dir, quick=args.quick)
    if prepared is None or args.command == "prepare":
        prepared = prepare(
            setting, args.cache_dir, args.data_dir, quick=args.quick, verbose=verbose
        )
        if verbose:
            print(f"prepared {setting.name} in {prepared.path}")
    if args.command == "prepare":
        return 0

    from dattri.benchmark.run import format_table, plot_bars, run_benchmark, write_json

    reports = run_benchmark(prepared, args.methods, device=args.device, verbose=verbose)
    name = setting.name + (" (quick)" if args.quick else "")
    print(format_table(name, reports))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = setting.name + ("-quick" if args.quick else "")
        write_json(args.out / f"{stem}.json", name, reports)
        if plot_bars(args.out / f"{stem}.png", name, reports) and verbose:
            print(f"wrote {args.out / (stem + '.png')}")
    return 1 if all(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
