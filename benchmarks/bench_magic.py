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

``--oracle M`` adds a reference row: a linear datamodel (ridge regression of each test
target on the 0/1 subset mask, ridge strength picked on a 20 % hold-out) fitted on ``M``
further retrainings per removal fraction under the same protocol, scored on the same
ground-truth subsets. It costs ``M`` training runs per fraction, so it is no attribution
method; it bounds what an additive attribution can reach on the run (up to its own
estimation error).

``--time-blocks 1 8 32 200`` also times MAGIC alone (``cache`` + ``attribute``) for the
first ``k`` test samples in one reverse pass, alternating with training runs of the full
model in the same process (median of ``--rounds``), after one warm-up call: the first
``torch.func`` transform in a process imports ``torch._dynamo`` (~1.7 s once, whatever
the model), which is not a cost of the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from dattri.benchmark.methods import METHODS, _loss_if
from dattri.benchmark.prepare import load_prepared, prepare, train_models
from dattri.benchmark.protocols import evaluate_protocol, format_fraction_table
from dattri.benchmark.settings import get_setting
from dattri.task import AttributionTask

#: MAGIC first, then every other method of ``dattri-bench``
DEFAULT_METHODS = ["magic", *(m for m in METHODS if m != "magic")]


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _task(setting, prepared) -> AttributionTask:
    x, y = prepared.x_train, prepared.y_train
    model = setting.model_factory()
    model.load_state_dict(train_models(setting, x, y, torch.ones(1, len(y)), [0], verbose=False)[0])
    return AttributionTask(loss_func=_loss_if(model), model=model, checkpoints=model.state_dict())


def secant_table(setting, prepared, n_samples: int, n_test: int = 8) -> None:
    """Print how far secants of retraining are from MAGIC's exact derivatives."""
    from dattri.algorithm.magic import MAGICAttributor

    a = MAGICAttributor(
        _task(setting, prepared),
        setting.model_factory,
        setting.train_config,
        init_seed=0,
        verbose=False,
    )
    a.cache((prepared.x_train, prepared.y_train))
    idx = torch.randperm(len(prepared.y_train), generator=torch.Generator().manual_seed(0))
    deltas = (1e-4, 1e-3, 1e-2, 0.1, 1.0)
    test = (prepared.x_test[:n_test], prepared.y_test[:n_test])
    out = a.secant_check(test, idx[:n_samples].tolist(), deltas=deltas)
    sec, sc = out["secants"], out["scores"]
    print(
        f"\nsecants (F(1 - d e_i) - F(1)) / d vs MAGIC ({setting.name}, {n_samples} train x "
        f"{n_test} test samples)"
    )
    print("| d | relative error | median per-sample relative error | correlation |")
    print("|---|---|---|---|")
    for j, d in enumerate(deltas):
        per = (sec[j] - sc).norm(dim=1) / sc.norm(dim=1).clamp_min(1e-30)
        corr = torch.corrcoef(torch.stack([sec[j].flatten(), sc.flatten()]))[0, 1]
        print(
            f"| {d:g} | {float(out['relative_error'][j]):.3f} | {float(per.median()):.3f} "
            f"| {float(corr):.3f} |",
            flush=True,
        )


def _ridge(x: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge coefficients ``(p, n_targets)`` of centred ``v`` on centred ``x``."""
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ v)


def datamodel_report(prepared, fractions: list[float], m: int, protocol: str):
    """A ``MethodReport`` for the ridge datamodel on ``m`` retrainings per fraction."""
    import numpy as np

    from dattri.benchmark.protocols import per_sample_test_loss, subset_ground_truth
    from dattri.benchmark.run import MethodReport
    from dattri.metric import lds

    setting, x, y = prepared.setting, prepared.x_train, prepared.y_train
    n = len(y)
    report = MethodReport(f"datamodel-{m} (oracle)")
    report.extra["lds_by_drop"] = {}
    t = time.perf_counter()
    for f in fractions:
        rng = np.random.default_rng(123_000 + round(f * 1e4))
        masks = torch.ones(m, n)
        for i in range(m):
            masks[i, torch.from_numpy(rng.choice(n, max(1, round(f * n)), replace=False))] = 0
        seeds = [0] * m if protocol == "fixed-seed" else list(range(100_000, 100_000 + m))
        values = []
        for s in range(0, m, 250):
            sds = train_models(setting, x, y, masks[s : s + 250], seeds[s : s + 250], verbose=False)
            values += [
                -per_sample_test_loss(setting, sd, prepared.x_test, prepared.y_test) for sd in sds
            ]
        v = torch.stack(values).double()
        xc, vc = masks.double() - masks.double().mean(0), v - v.mean(0)
        fit = int(0.8 * m)

        lams = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
        held = [
            float(((xc[fit:] @ _ridge(xc[:fit], vc[:fit], lam) - vc[fit:]) ** 2).mean())
            for lam in lams
        ]
        coef = _ridge(xc, vc, lams[int(np.argmin(held))])  # (n_train, n_test)
        gt = subset_ground_truth(prepared, protocol, f)
        report.extra["lds_by_drop"][f"{f:g}"] = [float(lds(coef, gt)[0].nanmean())]
    report.cache_s, report.attribute_s = time.perf_counter() - t, 0.0
    return report


def time_blocks(setting, prepared, ks: list[int], rounds: int) -> None:
    """Print MAGIC's time for one reverse pass over ``k`` test samples vs one training run."""
    from dattri.algorithm.magic import MAGICAttributor

    x, y = prepared.x_train, prepared.y_train
    task = _task(setting, prepared)

    def magic(k: int) -> None:
        a = MAGICAttributor(
            task,
            setting.model_factory,
            setting.train_config,
            init_seed=0,
            test_block_size=k,
            verbose=False,
            check_checkpoint=False,
        )
        a.cache((x, y))
        a.attribute((x, y), (prepared.x_test[:k], prepared.y_test[:k]))

    def train() -> None:
        train_models(setting, x, y, torch.ones(1, len(y)), [0], verbose=False)

    magic(1)  # warm-up: torch.func's one-time import of torch._dynamo
    print(f"\nMAGIC time per reverse pass ({setting.name}, median of {rounds}, alternating)")
    print(
        "| test samples k | MAGIC s (cache + attribute) | one training run s | "
        "training runs | training runs per test sample |"
    )
    print("|---|---|---|---|---|")
    for k in ks:
        k = min(k, len(prepared.y_test))
        m, t = [], []
        for _ in range(rounds):
            t.append(_seconds(train))
            m.append(_seconds(lambda k=k: magic(k)))
        ms, ts = statistics.median(m), statistics.median(t)
        print(f"| {k} | {ms:.2f} | {ts:.3f} | {ms / ts:.1f}x | {ms / ts / k:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["digits-mlp-sgd", "digits-mlp:quick"])
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
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
    p.add_argument(
        "--time-blocks",
        type=int,
        nargs="*",
        default=[],
        help="also time MAGIC for one reverse pass over the first k test samples",
    )
    p.add_argument("--rounds", type=int, default=3, help="repeats of --time-blocks")
    p.add_argument(
        "--oracle",
        type=int,
        default=0,
        metavar="M",
        help="add a linear datamodel fitted on M retrainings per fraction (reference)",
    )
    p.add_argument(
        "--secant-check",
        type=int,
        default=0,
        metavar="N",
        help="also compare MAGIC with secants of retraining for N training samples",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # the first torch.func transform of a process imports torch._dynamo (~1.7 s, once):
    # pay it here, not in whichever method runs first
    torch.func.vmap(torch.sin)(torch.zeros(2))
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
        if args.secant_check:
            secant_table(setting, prepared, args.secant_check)
        if args.time_blocks:
            time_blocks(setting, prepared, args.time_blocks, args.rounds)
        if not args.methods:
            continue
        reports = evaluate_protocol(prepared, args.methods, args.protocol, args.drop_fractions)
        if args.oracle:
            reports.append(
                datamodel_report(prepared, args.drop_fractions, args.oracle, args.protocol)
            )
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
