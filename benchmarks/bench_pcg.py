"""Plain vs preconditioned CG for the influence-function solve (prints a table).

``IFAttributorCG`` solves ``(H + lambda I) x = g`` for test gradients ``g`` (the mean-loss
Hessian over the whole training set; one "HVP" below = one right-hand side times the
full-data Hessian). For each preconditioner (none, diagonal empirical Fisher, K-FAC,
EK-FAC with damping = lambda, and the spectral preconditioner: top eigenspace of
``H + lambda I`` from ``--rank`` batched HVPs; and the split kinds ``kfac-spectral``,
``ekfac-spectral``, ``gkfac-spectral``: spectral deflation of the K-FAC / EK-FAC /
true-Fisher-K-FAC split-preconditioned operator, same ``--rank``) we report

* build: HVPs and process CPU seconds spent in ``cache`` on the preconditioner (the
  spectral one is built once and reused for every right-hand side; diagonal/K-FAC/EK-FAC
  cost per-sample gradients instead of HVPs, reported as 0 HVPs). "build products" are
  the batched products of the build's operator, "build HVPs" their cost in full-data
  HVPs (products x sampled fraction of the training data, for a sub-sampled build);
* solve: HVPs per right-hand side to reach relative residual ``--tol`` on every row,
  and process CPU seconds of the batched solve of all ``--n-rhs`` rows (median over
  ``--rounds`` alternating runs: plain, P1, P2, ..., then reversed, ...);
* "incl. build": per right-hand side with the build amortised over ``--amortize`` test
  vectors (default ``--n-rhs``; each row's CG is independent of the others, so the
  per-row products and seconds measured on ``--n-rhs`` rows hold for any number);
* "test vectors for 5x": the fewest test vectors sharing one build for which the
  preconditioned solve, build included, takes 5x fewer HVPs / seconds than plain CG
  ("never" if the solve alone does not);
* the solution's relative difference to the plain one, and the LDS of the resulting
  influence scores (``--lds-subsets`` models retrained on random halves, same recipe).

Spectral variants: a kind ``spectral:r<rank>:k<keep>:s<fraction>`` (any subset of the
fields, e.g. ``spectral:r1024:s0.1``) overrides ``--rank`` / ``--keep`` / ``--subsample``
for that row: Krylov basis of ``rank`` products, ``keep`` Ritz pairs kept (largest
``|eig(H)|``), built from the Hessian of a seeded ``fraction`` of the training batches
(``IFAttributorCG(preconditioner_rank=, preconditioner_keep=, preconditioner_subsample=)``).

``--density`` prints eigenvalue counts of ``H`` (stochastic Lanczos quadrature): how many
pairs a deflation must remove to bring the rest of ``A``'s spectrum under a given
condition number (``--spectrum`` prints the exact spectra, small models only).

Models are those of ``benchmarks/bench_attributors.py``: digits-mlp (MLP 64-64-10,
1000 train) and mlp-100k (MLP 100-512-96-10, ~100k parameters, 10k random train),
trained with full-batch SGD.

    OMP_NUM_THREADS=1 python benchmarks/bench_pcg.py --settings digits-mlp mlp-100k
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_attributors import _data, _model, _train

from dattri.algorithm import IFAttributorCG
from dattri.algorithm.solve.preconditioners import PRECONDITIONERS
from dattri.metric import lds
from dattri.task import AttributionTask

KINDS = [None, *PRECONDITIONERS]


def _variant(kind: str | None, args: argparse.Namespace):
    """``(preconditioner, rank, keep, subsample)`` of a kind (``spectral:r..:k..:s..``)."""
    if kind is None:
        return None, args.rank, None, None
    base, *fields = kind.split(":")
    spectral = base == "spectral"
    opt = {
        "r": args.rank,
        "k": args.keep if spectral else None,
        "s": args.subsample if spectral else None,
    }
    for f in fields:
        if f[:1] not in opt or not spectral:
            msg = f"bad kind {kind!r}: use spectral:r<rank>:k<keep>:s<fraction>"
            raise SystemExit(msg)
        opt[f[0]] = float(f[1:]) if f[0] == "s" else int(f[1:])
    return base, opt["r"], opt["k"], opt["s"]


def _ground_truth(setting: str, xtr, ytr, xte, yte, n_subsets: int):
    """Negated test losses of models retrained (same recipe) on random halves."""
    g = torch.Generator().manual_seed(1)
    n = len(xtr)
    idx = torch.stack([torch.randperm(n, generator=g)[: n // 2] for _ in range(n_subsets)])
    values = []
    for i, sub in enumerate(idx):
        model = _model(setting)
        _train(model, xtr[sub], ytr[sub])
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(xte), yte, reduction="none")
        values.append(-loss)
        print(f"  ground truth {i + 1}/{n_subsets}", file=sys.stderr, end="\r", flush=True)
    return torch.stack(values), idx


def _spectrum(rows: dict, kinds: list, p: int, reg: float) -> None:
    """Explicit spectra of ``A = H + reg I`` and of ``P^{1/2} A P^{1/2}`` (float64)."""
    op = rows[kinds[0]]["att"]._inverses[0].op
    eye = torch.eye(p)

    def dense(f):
        m = torch.cat([f(eye[i : i + 256]) for i in range(0, p, 256)]).double()
        return 0.5 * (m + m.T)

    a = dense(op)
    ev_h = torch.linalg.eigvalsh(a) - reg
    print(
        f"\nH: {int((ev_h < 0).sum())} of {p} eigenvalues < 0 (min {float(ev_h.min()):.3g}); "
        f"|eig| > 10 lambda: {int((ev_h.abs() > 10 * reg).sum())}, > lambda: "
        f"{int((ev_h.abs() > reg).sum())}, < lambda / 10: {int((ev_h.abs() < reg / 10).sum())}",
        file=sys.stderr,
    )
    print("| preconditioner | eig(PA) min / 1% / 50% / 99% / max | cond | # > 10x median |")
    print("|---|---|---|---|")
    for kind in kinds:
        pre = rows[kind]["att"]._inverses[0].preconditioner
        if pre is None:
            e = torch.linalg.eigvalsh(a)
        else:
            chol = torch.linalg.cholesky(dense(lambda m, f=pre: f(m)))
            e = torch.linalg.eigvalsh(chol.T @ a @ chol)
        q = torch.quantile(e, torch.tensor([0, 0.01, 0.5, 0.99, 1.0], dtype=e.dtype))
        print(
            f"| {kind or 'none'} | {' / '.join(f'{x:.3g}' for x in q.tolist())} | "
            f"{float(e.max() / e.min()):.3g} | {int((e > 10 * e.median()).sum())} |",
            flush=True,
        )
    print()


def _density(op, p: int, reg: float, probes: int = 4, steps: int = 150) -> None:
    """Eigenvalue counts of ``H`` by stochastic Lanczos quadrature (prints a table).

    ``probes`` Gaussian start vectors, ``steps`` Lanczos steps each (batched: ``steps``
    products of ``probes`` rows, full reorthogonalisation); the count above ``t`` is ``p``
    times the Gauss-quadrature weight of the Ritz values above ``t`` (mean over probes,
    with the spread over probes). Resolution: the quadrature smears the density over the
    gaps between its ``steps`` nodes, so counts at nearby thresholds are approximate.
    """
    g = torch.Generator().manual_seed(0)
    q = torch.randn(probes, p, generator=g)
    q = q / q.norm(dim=1, keepdim=True)
    basis, alphas, betas = [q], [], []
    for _ in range(steps):
        w = op(basis[-1]) - reg * basis[-1]
        alphas.append((w * basis[-1]).sum(1))
        qs = torch.stack(basis, 1)
        for _ in range(2):
            w = w - torch.einsum("kj,kjp->kp", torch.einsum("kjp,kp->kj", qs, w), qs)
        betas.append(w.norm(dim=1))
        basis.append(w / betas[-1][:, None])
    a, b = torch.stack(alphas, 1).double(), torch.stack(betas, 1).double()
    mult = [-0.2, -0.1, 0.5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 50]
    counts = torch.zeros(probes, len(mult))
    for i in range(probes):
        t = torch.diag(a[i]) + torch.diag(b[i, :-1], 1) + torch.diag(b[i, :-1], -1)
        theta, y = torch.linalg.eigh(t)
        w = p * y[0] ** 2
        for j, m in enumerate(mult):
            sel = theta < m * reg if m < 0 else theta > m * reg
            counts[i, j] = w[sel].sum()
    print(
        f"\nSLQ ({probes} probes x {steps} Lanczos steps): eigenvalues of H (p = {p}), mean "
        "[min, max] over probes"
    )
    print("| eig(H) | count |")
    print("|---|---|")
    for j, m in enumerate(mult):
        c = counts[:, j]
        print(
            f"| {'<' if m < 0 else '>'} {m:g} lambda | {float(c.mean()):.0f} "
            f"[{float(c.min()):.0f}, {float(c.max()):.0f}] |"
        )
    print()


def run(args: argparse.Namespace, setting: str) -> list[dict]:
    xtr, ytr, xte, yte = _data(setting)
    xte, yte = xte[: args.n_rhs], yte[: args.n_rhs]
    model = _model(setting)
    _train(model, xtr, ytr)

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=args.train_batch_size)
    test = DataLoader(TensorDataset(xte, yte), batch_size=len(xte))
    rhs = task.per_sample_grads((xte, yte), keep_batch_dim=True, target=True)
    kinds = [None if k == "none" else k for k in args.kinds]
    rows = {}
    for kind in kinds:
        base, rank, keep, sub = _variant(kind, args)
        att = IFAttributorCG(
            task,
            max_iter=args.max_iter,
            tol=args.tol,
            regularization=args.regularization,
            preconditioner=base,
            preconditioner_rank=rank,
            preconditioner_keep=keep,
            preconditioner_subsample=sub,
            verbose=False,
        )
        t = time.process_time()
        att.cache(train)
        rows[kind] = {"att": att, "build_s": time.process_time() - t, "solve_s": []}
        pre = att._inverses[0].preconditioner
        if hasattr(pre, "level"):  # spectral: how fast |eig(H)| decays
            mag = (pre.eigenvalues - args.regularization).abs()
            at = [i for i in (1, 10, 50, 100, 200, 400, 800, 1600) if i <= len(mag)]
            res = pre.residual_norms
            print(
                f"{setting} {kind}: Ritz |eig(H)| (residual) at rank {at}: "
                + ", ".join(
                    f"{float(mag[i - 1]):.3g}"
                    + ("" if res is None else f" ({float(res[i - 1]):.2g})")
                    for i in at
                )
                + f"; level {pre.level:.3g}; most negative Ritz eig(H) "
                + f"{float(pre.eigenvalues.min()) - args.regularization:.3g}",
                file=sys.stderr,
            )
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            row = rows[kind]
            t = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                row["sol"] = row["att"].transform_test_rep(0, rhs)
            row["solve_s"].append(time.process_time() - t)
            row["info"] = row["att"].last_cg_info
    if args.spectrum:
        _spectrum(rows, kinds, rhs.shape[1], args.regularization)
    if args.density:
        _density(rows[kinds[0]]["att"]._inverses[0].op, rhs.shape[1], args.regularization)
    gt = None
    if args.lds_subsets:
        gt = _ground_truth(setting, xtr, ytr, xte, yte, args.lds_subsets)
    ref = rows[kinds[0]]["sol"]
    out = []
    for kind in kinds:
        row = rows[kind]
        info = row["info"]
        lds_mean = float("nan")
        if gt is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scores = row["att"].attribute(train, test)
            lds_mean = float(lds(scores, gt)[0].nanmean())
        out.append(
            {
                "setting": setting,
                "p": rhs.shape[1],
                "preconditioner": kind or "none",
                "build_products": info.preconditioner_hvps,
                "build_hvps": float(
                    getattr(
                        row["att"]._inverses[0].preconditioner,
                        "hvp_equivalents",
                        info.preconditioner_hvps,
                    )
                ),
                "build_s": row["build_s"],
                "hvps": info.hvps / rhs.shape[0],
                "solve_s": statistics.median(row["solve_s"]),
                "iterations": info.iterations,
                "max_res": float(info.residuals.max()),
                "rel_diff": float((row["sol"] - ref).norm() / ref.norm()),
                "lds": lds_mean,
            }
        )
    return out


def _break_even(build: float, per_rhs: float, base_per_rhs: float, goal: float = 5.0) -> str:
    """Fewest test vectors sharing one build for ``goal``x less than plain, incl. build."""
    room = base_per_rhs / goal - per_rhs
    if room <= 0:
        return "never"
    return f">= {math.ceil(build / room)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["digits-mlp", "mlp-100k"])
    p.add_argument("--kinds", nargs="+", default=["none", *KINDS[1:]])
    p.add_argument("--n-rhs", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--regularization", type=float, default=1e-2)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--rank", type=int, default=192, help="HVPs of the spectral build")
    p.add_argument("--keep", type=int, default=None, help="Ritz pairs kept (spectral)")
    p.add_argument(
        "--subsample",
        type=float,
        default=None,
        help="fraction of training batches whose Hessian builds 'spectral'",
    )
    p.add_argument(
        "--train-batch-size",
        type=int,
        default=1000,
        help="batches of the cached training data (the unit of --subsample)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lds-subsets", type=int, default=32)
    p.add_argument(
        "--amortize", type=int, default=None, help="test vectors sharing one build (default n-rhs)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--spectrum",
        action="store_true",
        help="also print the explicit spectra of A and PA (small models only)",
    )
    p.add_argument(
        "--density",
        action="store_true",
        help="also print eigenvalue counts of H by stochastic Lanczos quadrature (600 HVPs)",
    )
    args = p.parse_args()
    args.amortize = args.amortize or args.n_rhs
    torch.set_num_threads(args.threads)
    print(
        f"relative residual {args.tol:g}, lambda {args.regularization:g}, {args.n_rhs} "
        f"right-hand sides, spectral rank {args.rank}, {args.threads} thread(s), process CPU "
        f"time (median of {args.rounds} alternating runs), LDS over {args.lds_subsets} "
        f"half-data retrainings, build amortised over {args.amortize} test vectors\n"
    )
    for setting in args.settings:
        rows = run(args, setting)
        print(
            "| setting | p | preconditioner | build products | build HVPs | build s | "
            "CG iters | HVPs/rhs | "
            "HVPs/rhs incl. build | solve ms/rhs | ms/rhs incl. build | "
            "HVPs vs plain (excl./incl. build) | time vs plain (excl./incl. build) | "
            "test vectors for 5x (HVPs / time) | max rel. residual | rel. diff to plain | "
            "LDS |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = rows[0]
        for r in rows:
            incl = r["hvps"] + r["build_hvps"] / args.amortize
            base_incl = base["hvps"] + base["build_hvps"] / args.amortize
            per = 1e3 * r["solve_s"] / args.n_rhs
            base_per = 1e3 * base["solve_s"] / args.n_rhs
            tot = per + 1e3 * r["build_s"] / args.amortize
            base_tot = base_per + 1e3 * base["build_s"] / args.amortize
            print(
                f"| {r['setting']} | {r['p']} | {r['preconditioner']} | "
                f"{r['build_products']} | {r['build_hvps']:.1f} | "
                f"{r['build_s']:.2f} | {r['iterations']} | {r['hvps']:.1f} | {incl:.1f} | "
                f"{per:.1f} | {tot:.1f} | {base['hvps'] / r['hvps']:.1f}x / "
                f"{base_incl / incl:.1f}x | {base_per / per:.1f}x / "
                f"{base_tot / tot:.1f}x | "
                f"{_break_even(r['build_hvps'], r['hvps'], base['hvps'])} / "
                f"{_break_even(r['build_s'], per / 1e3, base_per / 1e3)} | "
                f"{r['max_res']:.1e} | {r['rel_diff']:.1e} | "
                f"{r['lds']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
