"""Measure attribution methods against retraining ground truth (LDS) with dattri.benchmark.

Uses the Python API behind the ``dattri-bench`` command:

1. ``prepare`` trains the model of a setting and builds its ground truth by retraining on
   random half subsets (linear datamodeling score, LDS) and, for some settings, on
   leave-one-out sets;
2. ``run_benchmark`` runs the chosen attributors and scores them;
3. ``lds`` scores any ``(n_train, n_test)`` matrix of your own against the same ground
   truth (here a nearest-neighbour-style baseline built from raw pixels).

    python examples/lds_benchmark.py                 # digits-lr, small version (~1 min)
    python examples/lds_benchmark.py --full          # the full setting (several minutes)
    python examples/lds_benchmark.py --quick         # a tiny custom setting (CI)

Prepared settings are cached (``--cache-dir``, default ``$DATTRI_BENCH_CACHE`` or
``~/.cache/dattri-bench``), so a second run only re-runs the methods.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from _common import device_from, parser

from dattri.benchmark.datasets import load_digits_dataset
from dattri.benchmark.prepare import default_cache_dir, prepare
from dattri.benchmark.run import format_table, plot_bars, run_benchmark, write_json
from dattri.benchmark.settings import SETTINGS, Setting, get_setting
from dattri.metric import lds

FAST_METHODS = ["if-explicit", "if-datainf", "tracin", "grad-dot", "trak-10", "knn-shapley"]
QUICK_METHODS = ["if-explicit", "grad-dot", "trak-1"]


def tiny_setting(seed: int) -> Setting:
    """A custom setting: 100 training / 20 test digits, 8 LDS subsets, short training."""

    def load(_data_dir: Path | None) -> tuple[torch.Tensor, ...]:
        train, test = load_digits_dataset(n_train=100, n_test=20, seed=seed)
        return (*train.tensors, *test.tensors)

    base = get_setting("digits-lr", quick=True)
    return dataclasses.replace(
        base,
        name=f"digits-lr-tiny-{seed}",
        description="digits LR, 100 train / 20 test (example)",
        load_data=load,
        num_subsets=8,
        num_ensemble=2,
        num_tracin_checkpoints=2,
        loo=False,
        train_config=dataclasses.replace(base.train_config, epochs=60),
    )


def pixel_similarity(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> torch.Tensor:
    """A method of our own: cosine similarity of the raw pixels, signed by label agreement.

    Returns:
        ``(n_train, n_test)``; positive when a similar image carries the same label.
    """
    a = torch.nn.functional.normalize(x_train.double(), dim=1)
    b = torch.nn.functional.normalize(x_test.double(), dim=1)
    sign = (y_train[:, None] == y_test[None, :]).double() * 2 - 1
    return (a @ b.T) * sign


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--setting", default="digits-lr", choices=sorted(SETTINGS))
    p.add_argument("--full", action="store_true", help="the full setting (slow)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {FAST_METHODS}")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON and PNG results")
    args = p.parse_args()
    device = device_from(args.device)

    if args.quick:
        setting, small = tiny_setting(args.seed), True
        methods = args.methods or QUICK_METHODS
    else:
        small = not args.full
        setting = get_setting(args.setting, quick=small)
        methods = args.methods or FAST_METHODS

    prepared = prepare(setting, args.cache_dir, quick=small, verbose=not args.quick)
    print(
        f"{setting.name}: {len(prepared.y_train)} train / {len(prepared.y_test)} test samples, "
        f"{setting.num_subsets} LDS subsets (cached in {prepared.path})"
    )
    reports = run_benchmark(prepared, methods, device=str(device))
    print(format_table(setting.name, reports))

    scores = pixel_similarity(prepared.x_train, prepared.y_train, prepared.x_test, prepared.y_test)
    _, _, ci = lds(scores, prepared.lds_ground_truth(), ci=0.95)
    print(f"\nour own pixel-similarity method: LDS {ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{setting.name}.json", setting.name, reports)
        if plot_bars(args.out / f"{setting.name}.png", setting.name, reports):
            print(f"wrote {args.out / setting.name}.json and .png")
    failed = [r.method for r in reports if r.error]
    if failed:
        raise SystemExit(f"methods that failed: {failed}")


if __name__ == "__main__":
    main()
