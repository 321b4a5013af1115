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
            sp.add_argument(
                "--protocol",
                choices=("default", "fixed-seed"),
                default=None,
                help="LDS ground truth: subsets from their own init (default) or from the "
                "full model's init and batch order (fixed-seed); see benchmark.protocols",
            )
            sp.add_argument(
                "--drop-fractions",
                type=float,
                nargs="+",
                default=None,
                help="LDS at these removal fractions (e.g. 0.01 0.05 0.1 0.5)",
            )
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

    if args.protocol is not None or args.drop_fractions is not None:
        return _run_protocol(args, setting, prepared, verbose)
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


def _run_protocol(
    args: argparse.Namespace, setting: object, prepared: object, verbose: bool
) -> int:
    """``run --protocol/--drop-fractions``: LDS per removal fraction (benchmark.protocols)."""
    from dattri.benchmark.methods import METHODS
    from dattri.benchmark.protocols import evaluate_protocol, format_fraction_table
    from dattri.benchmark.run import write_json

    protocol = args.protocol or "default"
    fractions = args.drop_fractions or [0.5]
    methods = args.methods or list(METHODS)
    reports = evaluate_protocol(prepared, methods, protocol, fractions, args.device, verbose)
    name = setting.name + (" (quick)" if args.quick else "")
    print(format_fraction_table(name, reports, fractions, protocol))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"{setting.name}{'-quick' if args.quick else ''}-{protocol}"
        write_json(args.out / f"{stem}.json", name, reports)
    return 1 if all(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
