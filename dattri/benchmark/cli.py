"""The ``dattri-bench`` command (also ``python -m dattri.benchmark``).

Examples::

    dattri-bench list
    dattri-bench prepare digits-lr
    dattri-bench prepare digits-lr --quick --export-upstream ~/.dattri
    dattri-bench run digits-lr --methods if-explicit trak-10 --out results/

Exit codes: 0 success; 1 a method failed (its error is in the table) or the setting
could not be prepared (missing data files, damaged cache); 2 a usage error (unknown
setting, method or option). Errors are one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]

_DESCRIPTION = (
    "Benchmark data-attribution methods against retraining ground truth "
    "(LDS, leave-one-out, noisy-label detection)."
)
_EPILOG = """\
examples:
  dattri-bench list
  dattri-bench prepare digits-lr
  dattri-bench run digits-lr --quick
  dattri-bench run digits-lr --methods if-explicit trak-10 --out results/

exit codes: 0 success; 1 a method failed (its error is in the table) or the
setting could not be prepared; 2 a usage error (unknown setting, method or option)
"""
DEFAULT_OUT = Path("dattri-bench-results")


class _Usage(Exception):
    """A usage error: reported as one line on stderr, exit code 2."""


def _version() -> str:
    import dattri

    return f"dattri-bench (dattri {dattri.__version__})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dattri-bench",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list settings and methods")
    for name, helptext in (
        ("prepare", "train the models and build LDS/LOO ground truth"),
        ("run", "run attribution methods and print a table (prepares first if needed)"),
    ):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("setting", help="a setting name (see: dattri-bench list)")
        sp.add_argument("--cache-dir", type=Path, default=None, help="cache root directory")
        sp.add_argument(
            "--data-dir", type=Path, default=None, help="dataset files (see: dattri-bench list)"
        )
        sp.add_argument("--quick", action="store_true", help="small sizes (smoke test, CI)")
        sp.add_argument("--quiet", action="store_true", help="no progress output")
        if name == "prepare":
            sp.add_argument(
                "--device", default=None, help="training device (default: the setting's, cpu)"
            )
            sp.add_argument(
                "--export-upstream",
                type=Path,
                default=None,
                metavar="DIR",
                help="also write upstream's load_benchmark layout under DIR/benchmark/",
            )
        if name == "run":
            sp.add_argument("--methods", nargs="+", default=None, help="methods (default: all)")
            sp.add_argument("--device", default="cpu")
            sp.add_argument(
                "--out",
                type=Path,
                default=None,
                help="folder for the results: JSON, Markdown table and plots "
                f"(default: a new folder under ./{DEFAULT_OUT}/)",
            )
            sp.add_argument(
                "--no-save", action="store_true", help="only print the table, save nothing"
            )
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
        sp.add_argument(
            "--download",
            action="store_true",
            help="download missing dataset files (settings that need files)",
        )
    return p


def _error(message: str) -> None:
    """Print one ``dattri-bench: error: ...`` line on stderr."""
    print(f"dattri-bench: error: {' '.join(str(message).split())}", file=sys.stderr)


def _note(message: str) -> None:
    """Print one status line on stderr (stdout keeps the table)."""
    print(message, file=sys.stderr, flush=True)


def _check_names(args: argparse.Namespace) -> None:
    """Raise :class:`_Usage` for an unknown setting or method."""
    from dattri.benchmark.methods import METHODS
    from dattri.benchmark.settings import SETTINGS

    if args.setting not in SETTINGS:
        msg = f"unknown setting {args.setting!r}; choose from: {', '.join(SETTINGS)}"
        raise _Usage(msg)
    unknown = [m for m in (getattr(args, "methods", None) or []) if m not in METHODS]
    if unknown:
        msg = (
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(METHODS)}"
        )
        raise _Usage(msg)
    device = getattr(args, "device", "cpu")
    if device is not None:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            msg = f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
            raise _Usage(msg) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            msg = f"--device {device}: CUDA is not available on this machine; use --device cpu"
            raise _Usage(msg)


def _prepare(args: argparse.Namespace, setting: object, verbose: bool) -> object:
    """Load or build the prepared setting, saying in one line which it was."""
    from dattri.benchmark.prepare import load_prepared, prepare

    prepared = load_prepared(setting, args.cache_dir, quick=args.quick)
    if prepared is not None and args.command == "run":
        _note(
            f"reusing the prepared {setting.name}{' (quick)' if args.quick else ''} in "
            f"{prepared.path} (delete that folder to rebuild it)"
        )
        return prepared
    prepared = prepare(
        setting,
        args.cache_dir,
        args.data_dir,
        quick=args.quick,
        verbose=verbose,
        download=args.download,
        device=args.device,
    )
    _note(f"prepared {setting.name} in {prepared.path}")
    return prepared


#: errors of reading a damaged or truncated cache file
_DAMAGED = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def _damaged(args: argparse.Namespace, setting: object, exc: BaseException) -> int:
    """One line naming the cache folder to delete; exit code 1."""
    from dattri.benchmark.prepare import _setting_dir

    folder = _setting_dir(setting, args.cache_dir, args.quick)
    _error(
        f"could not load or prepare {setting.name}: {type(exc).__name__}: {exc}. If the "
        f"cache is damaged, delete {folder} or pass another --cache-dir."
    )
    return 1


def _sizes(prepared: object) -> dict:
    """The sizes a reader of the results needs (samples, parameters, ground truth)."""
    s = prepared.setting
    loo = prepared.loo_ground_truth()
    return {
        "n_train": len(prepared.y_train),
        "n_test": len(prepared.y_test),
        "num_params": sum(p.numel() for p in prepared.model("full").parameters()),
        "num_subsets": s.num_subsets,
        "subset_ratio": s.subset_ratio,
        "num_loo": None if loo is None else len(loo[1]),
        "noisy": int(prepared.noisy.sum()),
    }


def _default_out(stem: str) -> Path:
    """A new folder ``./dattri-bench-results/<stem>-<UTC time>`` (never overwrites)."""
    base = DEFAULT_OUT / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _run(args: argparse.Namespace) -> int:
    from dattri.benchmark.methods import METHODS
    from dattri.benchmark.prepare import MissingDataError
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

    _check_names(args)
    setting = get_setting(args.setting, quick=args.quick)
    verbose = not args.quiet
    try:
        prepared = _prepare(args, setting, verbose)
    except MissingDataError as exc:
        _error(
            f"{setting.name} needs dataset files: "
            f"{exc.detail.split('. Pass download=True')[0].rstrip('.')}. "
            "Pass --data-dir DIR (a folder holding the files) or --download to fetch them."
        )
        return 1
    except ValueError as exc:  # e.g. a cache prepared for another configuration
        _error(str(exc))
        return 1
    except _DAMAGED as exc:
        return _damaged(args, setting, exc)
    if args.command == "prepare":
        if args.export_upstream is not None:
            from dattri.benchmark.export import export_upstream

            out = export_upstream(prepared, args.export_upstream, quick=args.quick)
            if verbose:
                print(f"exported {setting.name} in upstream's layout to {out}")
        return 0

    if args.protocol is not None or args.drop_fractions is not None:
        return _run_protocol(args, setting, prepared, verbose)

    from dattri.benchmark.run import format_table, run_benchmark, save_results

    try:  # the methods' own errors are caught per method; these are ground-truth files
        reports = run_benchmark(prepared, args.methods, device=args.device, verbose=verbose)
    except _DAMAGED as exc:
        return _damaged(args, setting, exc)
    name = setting.name + (" (quick)" if args.quick else "")
    print(format_table(name, reports), flush=True)

    def write(out: Path, stem: str, meta: dict) -> list[Path]:
        files = save_results(out, stem, name, reports, meta)
        if not any(f.suffix == ".png" for f in files):
            _note("plots skipped: matplotlib is not installed (pip install 'dattri[bench]')")
        return files

    if not _save(args, setting, "", write, **_sizes(prepared)):
        return 1
    return _exit_code(reports)


def _save(
    args: argparse.Namespace,
    setting: object,
    suffix: str,
    write: Callable[[Path, str, dict], list[Path]],
    **extra: object,
) -> bool:
    """Write a run's results with its metadata (unless ``--no-save``).

    Args:
        args: The parsed command line.
        setting: The benchmark setting that was run.
        suffix: Appended to the file stem ``<setting>[-quick]``.
        write: ``write(out_dir, stem, meta)`` writes the files and returns them.
        **extra: More metadata fields.

    Returns:
        False (after printing the error) if the files could not be written.
    """
    if args.no_save:
        return True
    from dattri.benchmark.run import run_metadata

    stem = setting.name + ("-quick" if args.quick else "") + suffix
    out = args.out if args.out is not None else _default_out(stem)
    meta = run_metadata(
        command="dattri-bench " + " ".join(args.argv),
        setting=setting.name,
        quick=args.quick,
        device=args.device,
        **extra,
    )
    try:
        files = write(out, stem, meta)
    except OSError as exc:
        _error(f"could not save the results in {out}: {exc}")
        return False
    _note(f"results saved in {out}/ ({', '.join(f.name for f in files)})")
    return True


def _exit_code(reports: Sequence) -> int:
    """1 (after naming the failed methods) if a method failed, else 0."""
    failed = [r.method for r in reports if r.failed]
    if failed:
        _error(f"{len(failed)} of {len(reports)} method(s) failed: {', '.join(failed)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dattri-bench``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 success, 1 a failed method or preparation, 2 a
        usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    args.argv = argv
    try:
        return _run(args)
    except _Usage as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


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
    print(format_fraction_table(name, reports, fractions, protocol), flush=True)

    def write(out: Path, stem: str, meta: dict) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{stem}.json", name, reports, meta)
        return [out / f"{stem}.json"]

    saved = _save(args, setting, f"-{protocol}", write, protocol=protocol, drop_fractions=fractions)
    return _exit_code(reports) if saved else 1


if __name__ == "__main__":
    sys.exit(main())
