"""MAGIC vs the other attributors under the fixed-seed ground truth (prints tables).

For each setting: prepare it (``dattri-bench prepare`` cache), build the fixed-seed LDS
ground truth at every removal fraction (:mod:`dattri.benchmark.protocols`: each subset
model starts from the full model's initialisation, same batch order, removed samples
weighted 0), run every method once and score it at each fraction. Also times one
training run of the setting (the full model, same trainer) to express MAGIC's cost as
a multiple of it.

    OMP_NUM_THREADS=1 python benchmarks/bench_magic.py \
        --settings digits-mlp-sgd digits-mlp:quick --drop-fractions 0.01 0.05 0.1 0.5

``--lr`` / ``--float64`` rerun a setting with another step size or in float64 (e.g. to
see whether MAGIC's LDS is limited by the step size or by rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dattri.benchmark.prepare import load_prepared, prepare, train_models
from dattri.benchmark.protocols import evaluate_protocol, format_fraction_table
from dattri.benchmark.settings import get_setting

DEFAULT_METHODS = [
    "magic",
    "if-explicit",
    "if-cg",
    "if-ekfac",
    "if-datainf",
    "trak-10",
    "tracin",
    "grad-dot",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["digits-mlp-sgd", "digits-mlp:quick"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--drop-fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.5])
    p.add_argument("--protocol", default="fixed-seed")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--lr", type=float, default=None, help="override the setting's learning rate (diagnosis)"
    )
    p.add_argument(
        "--float64", action="store_true", help="train, replay and retrain in float64 (diagnosis)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.settings:
        name, _, mode = spec.partition(":")
        quick = mode == "quick"
        setting = get_setting(name, quick=quick)
        if args.lr is not None or args.float64:  # a variant with its own prepared cache
            cfg = setting.train_config
            cfg = dataclasses.replace(
                cfg,
                lr=cfg.lr if args.lr is None else args.lr,
                dtype=torch.float64 if args.float64 else cfg.dtype,
            )
            suffix = f"-lr{cfg.lr:g}" + ("-f64" if args.float64 else "")
            setting = dataclasses.replace(setting, name=name + suffix, train_config=cfg)
        prepared = load_prepared(setting, args.cache_dir, quick=quick) or prepare(
            setting, args.cache_dir, quick=quick, verbose=False
        )
        x, y = prepared.x_train, prepared.y_train
        train_s = float("inf")
        for _ in range(3):  # fastest of three (the machine may be shared)
            t = time.perf_counter()
            train_models(setting, x, y, torch.ones(1, len(y)), [0], verbose=False)
            train_s = min(train_s, time.perf_counter() - t)
        reports = evaluate_protocol(prepared, args.methods, args.protocol, args.drop_fractions)
        label = f"{setting.name}{' (quick)' if quick else ''}: {len(y)} train / {len(prepared.y_test)} test"
        print(format_fraction_table(label, reports, args.drop_fractions, args.protocol))
        print(f"\none training run of the full model (fastest of 3): {train_s:.2f} s")
        for r in reports:
            if r.method == "magic" and not r.error:
                total = r.cache_s + r.attribute_s
                n_test = len(prepared.y_test)
                print(
                    f"MAGIC: {total:.1f} s = {total / train_s:.1f} training runs for {n_test} "
                    f"test samples ({total / train_s / n_test:.2f} runs per test sample)"
                )
        print(flush=True)


if __name__ == "__main__":
    main()
