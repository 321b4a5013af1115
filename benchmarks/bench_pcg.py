"""Plain vs preconditioned CG for the influence-function solve (prints a table).

``IFAttributorCG`` solves ``(H + lambda I) x = g`` for test gradients ``g`` (the mean-loss
Hessian over the whole training set; one "HVP" below = one right-hand side times the
full-data Hessian). For each preconditioner (none, diagonal empirical Fisher, K-FAC,
EK-FAC, damping = lambda) we report the build time of the preconditioner (part of
``cache``), the CG iterations and HVPs to reach relative residual ``--tol`` on every
right-hand side, the solve time, and the difference to the plain solution.

Models are those of ``benchmarks/bench_attributors.py``: digits-mlp (MLP 64-64-10,
1000 train) and mlp-100k (MLP 100-512-96-10, ~100k parameters, 10k random train),
trained with full-batch SGD.

    OMP_NUM_THREADS=1 python benchmarks/bench_pcg.py --settings digits-mlp mlp-100k
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_attributors import _data, _model, _train

from dattri.algorithm import IFAttributorCG
from dattri.task import AttributionTask

KINDS = [None, "diagonal", "kfac", "ekfac"]


def run(setting: str, n_rhs: int, tol: float, reg: float, max_iter: int) -> Iterator[dict]:
    xtr, ytr, xte, yte = _data(setting)
    model = _model(setting)
    _train(model, xtr, ytr)

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=1000)
    rhs = task.per_sample_grads((xte[:n_rhs], yte[:n_rhs]), keep_batch_dim=True, target=True)
    ref = None
    for kind in KINDS:
        att = IFAttributorCG(
            task, max_iter=max_iter, tol=tol, regularization=reg, preconditioner=kind, verbose=False
        )
        t = time.perf_counter()
        att.cache(train)
        build = time.perf_counter() - t
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sol = att.transform_test_rep(0, rhs)
        solve = time.perf_counter() - t
        info = att.last_cg_info
        ref = sol if ref is None else ref
        yield (
            {
                "setting": setting,
                "p": rhs.shape[1],
                "preconditioner": kind or "none",
                "build_s": build,
                "iterations": info.iterations,
                "hvps": info.hvps,
                "solve_s": solve,
                "converged": bool(info.converged.all()),
                "rel_diff": float((sol - ref).norm() / ref.norm()),
                "indefinite": bool(info.negative_curvature.any()),
            }
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "mlp-100k"])
    p.add_argument("--n-rhs", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--regularization", type=float, default=1e-2)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"relative residual {args.tol:g}, lambda {args.regularization:g}, "
        f"{args.n_rhs} right-hand sides, {args.threads} thread(s)\n"
    )
    print(
        "| setting | p | preconditioner | build s | CG iters | HVPs | solve s | total s | "
        "HVPs vs plain | time vs plain | converged | rel. diff to plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        base = None
        for r in run(setting, args.n_rhs, args.tol, args.regularization, args.max_iter):
            base = base or r
            total = r["build_s"] + r["solve_s"]
            base_total = base["build_s"] + base["solve_s"]
            print(
                f"| {r['setting']} | {r['p']} | {r['preconditioner']} | {r['build_s']:.2f} | "
                f"{r['iterations']} | {r['hvps']} | {r['solve_s']:.2f} | {total:.2f} | "
                f"{base['hvps'] / max(r['hvps'], 1):.1f}x | {base_total / total:.1f}x | "
                f"{r['converged']} | {r['rel_diff']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
