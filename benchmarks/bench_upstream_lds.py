"""LDS of every benchmark method, ours against upstream dattri 0.3.0, on OUR prepared settings.

Both libraries score the same prepared setting (``dattri-bench prepare``: the same
data, the same trained model, half-subset models and trajectory checkpoints, the same
LDS ground truth), and the LDS of both is computed here with OUR metric
(:func:`dattri.metric.lds`). Upstream runs in a separate interpreter (its own
virtualenv, never a dependency of ours), one worker process per method, started
outside the repository so that it imports upstream's ``dattri``; the data and models
go to the worker as file paths and the scores come back as a ``.pt`` file.

    python -m venv /tmp/upvenv
    /tmp/upvenv/bin/pip install torch==2.13.0 dattri==0.3.0 scikit-learn
    OMP_NUM_THREADS=1 python benchmarks/bench_upstream_lds.py \
        --upstream-python /tmp/upvenv/bin/python --settings digits-lr digits-mlp

Upstream runs with its defaults, except for the physical quantities our benchmark
also fixes (the IF damping = the setting's ``max(weight decay, ihvp_damping)``, TracIn's
learning-rate weights, the LiSSA depth/batch of our benchmark for time) and, for the
methods whose upstream default collapses (LoGra/FactGraSS damping, DataInf and EK-FAC
damping 0, TRAK regularization 0), an extra "tuned" row: the best of a small sweep,
chosen on the LDS itself (an optimistic figure for upstream). Our rows always use our
defaults (``dattri-bench run``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: upstream variants per method: (label, options understood by ``_upstream_scores``);
#: a ``sweep`` keeps the best LDS (optimistic for upstream)
VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "if-explicit": [("default", {})],
    "if-cg": [("default", {})],
    "if-lissa": [("default", {})],
    "if-arnoldi": [("default", {})],
    "if-ekfac": [("default", {"damping": 0.0}), ("damping=1e-2", {"damping": 1e-2})],
    "if-datainf": [("default", {"regularization": 0.0})],
    "tracin": [("default", {})],
    "grad-dot": [("default", {})],
    "grad-cos": [("default", {})],
    "trak-1": [("default", {}), ("256-d", {"proj_dim": 256})],
    "trak-10": [("default", {}), ("256-d", {"proj_dim": 256})],
    "rps": [("default", {})],
    "knn-shapley": [("default", {})],
    "logra": [("default", {}), ("tuned", {"sweep": [10.0]})],
    "factgrass": [("default", {}), ("tuned", {"sweep": [10.0]})],
}
#: ``--tuned``: wider sweeps (slow: one upstream run per value)
TUNED: dict[str, list[tuple[str, dict]]] = {
    "if-cg": [("max_iter=100", {"max_iter": 100})],
    "if-ekfac": [("tuned", {"sweep": [1e-4, 1e-3]})],
    "if-datainf": [("tuned", {"sweep": [1e-2, 0.1, 1.0]})],
    "logra": [("tuned", {"sweep": [1.0, 10.0, 100.0]})],
    "factgrass": [("tuned", {"sweep": [1.0, 10.0, 100.0]})],
}


# ------------------------------------------------------------------- upstream worker
def _build_model(spec: dict):
    import torch
    from torch import nn

    class LR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(spec["in_dim"], spec["n_classes"])

        def forward(self, x):
            return self.linear(x.flatten(1) if x.dim() > 2 else x)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [spec["in_dim"], *spec["hidden"], spec["n_classes"]]
            for i, (a, b) in enumerate(itertools.pairwise(widths)):
                self.add_module(f"fc{i + 1}", nn.Linear(a, b))
            self.n_layers = len(widths) - 1

        def forward(self, x):
            x = x.flatten(1) if x.dim() > 2 else x
            for i in range(1, self.n_layers):
                x = torch.relu(getattr(self, f"fc{i}")(x))
            return getattr(self, f"fc{self.n_layers}")(x)

    return LR() if spec["kind"] == "lr" else MLP()


def _upstream_scores(spec: dict, method: str, opts: dict):
    """Scores ``(n_train, n_test)`` of one upstream method (runs in the upstream venv)."""
    import torch
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    import dattri.algorithm as A
    from dattri.task import AttributionTask

    data = torch.load(spec["data"], weights_only=True)
    xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    n = len(ytr)
    model = _build_model(spec)
    full = torch.load(spec["models"]["full"], weights_only=True)
    model.load_state_dict(full)
    model.eval()
    full_batch = DataLoader(TensorDataset(xtr, ytr), batch_size=n)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=256)
    test = DataLoader(TensorDataset(xte, yte), batch_size=len(yte))
    damping = spec["damping"]

    def loss_if(params, d):
        x, y = d
        # .long(): upstream's LiSSA collate casts every data tensor (labels too) to float
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y.long())

    def loss_sample(params, d):
        x, y = d
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    def margin_sample(params, d):
        logp = -loss_sample(params, d)
        return logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))

    def prob_sample(params, d):
        return torch.exp(-loss_sample(params, d))

    def eager_loss(m, batch, device):
        x, y = batch
        return nn.functional.cross_entropy(m(x.to(device)), y.to(device))

    def if_scores(cls, **kw):
        task = AttributionTask(loss_func=loss_if, model=model, checkpoints=full)
        attr = cls(task, **kw)
        # one cached batch: upstream sums (H_b + lambda I)^-1 over the cached batches
        attr.cache(full_batch)
        return attr.attribute(train, test)

    if method == "if-explicit":
        return if_scores(A.IFAttributorExplicit, regularization=damping)
    if method == "if-cg":
        return if_scores(A.IFAttributorCG, regularization=damping, **opts)
    if method == "if-lissa":
        # our benchmark's LiSSA depth/batch (upstream's 5000 x batch 1 is far slower);
        # upstream converges to (H + damping * scaling I)^-1
        scaling = 50.0
        return if_scores(
            A.IFAttributorLiSSA,
            batch_size=50,
            recursion_depth=1000,
            scaling=scaling,
            damping=damping / scaling,
        )
    if method == "if-arnoldi":
        return if_scores(A.IFAttributorArnoldi, regularization=damping)
    if method == "if-datainf":
        return if_scores(A.IFAttributorDataInf, regularization=opts["regularization"])
    if method == "if-ekfac":
        return if_scores(A.IFAttributorEKFAC, damping=opts["damping"])
    if method in ("tracin", "grad-dot", "grad-cos"):
        paths = spec["models"]["traj"] if method == "tracin" else [spec["models"]["full"]]
        ckpts = [torch.load(p, weights_only=True) for p in paths]
        weight = spec["lr"] if method == "tracin" else 1.0
        task = AttributionTask(loss_func=loss_sample, model=model, checkpoints=ckpts)
        attr = A.TracInAttributor(
            task,
            weight_list=torch.full((len(ckpts),), weight),
            normalized_grad=method == "grad-cos",
        )
        attr.cache()
        return attr.attribute(train, test)
    if method in ("trak-1", "trak-10"):
        paths = [spec["models"]["full"]] if method == "trak-1" else spec["models"]["half"]
        ckpts = [torch.load(p, weights_only=True) for p in paths]
        task = AttributionTask(loss_func=margin_sample, model=model, checkpoints=ckpts)
        kw = {}
        if "proj_dim" in opts:
            kw["projector_kwargs"] = {"proj_dim": opts["proj_dim"], "proj_max_batch_size": 32}
        attr = A.TRAKAttributor(task, correct_probability_func=prob_sample, **kw)
        attr.cache(train)
        return attr.attribute(test)
    if method == "rps":

        def ce(logits, targets):
            return nn.functional.cross_entropy(logits, targets)

        task = AttributionTask(loss_func=ce, model=model, checkpoints=full, target_func=ce)
        attr = A.RPSAttributor(task, final_linear_layer_name=spec["final_layer"])
        attr.cache(train)
        return attr.attribute(train, test)
    if method == "knn-shapley":
        attr = A.KNNShapleyAttributor(k_neighbors=10)
        attr.cache()
        return attr.attribute(train, test).T
    if method in ("logra", "factgrass"):
        cls = A.LoGraAttributor if method == "logra" else A.FactGraSSAttributor
        task = AttributionTask(loss_func=eager_loss, model=model, checkpoints=full)
        attr = cls(task, damping=opts.get("damping"), offload="none")
        # upstream sets its compressors up by running the model on batch[0][0], one
        # sample: a 1-D feature vector crashes there (IndexError in torch.cat), so the
        # samples are given as (1, d) (the models flatten them back)
        train3 = DataLoader(TensorDataset(xtr.unsqueeze(1), ytr), batch_size=256)
        test3 = DataLoader(TensorDataset(xte.unsqueeze(1), yte), batch_size=len(yte))
        attr.cache(train3)
        return attr.attribute(train3, test3)
    msg = f"unknown method {method!r}"
    raise ValueError(msg)


def _worker(spec_file: str, method: str, opts_json: str, out_file: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(Path(spec_file).read_text())
    opts = json.loads(opts_json)
    t0 = time.perf_counter()
    scores = _upstream_scores(spec, method, opts)
    scores = torch.as_tensor(scores).detach().to(torch.float64).cpu()
    torch.save({"scores": scores, "seconds": time.perf_counter() - t0}, out_file)


# --------------------------------------------------------------------------- driver
def _spec(prepared, setting) -> dict:
    from dattri.benchmark.methods import _Context

    model = prepared.model("full")
    linears = [m for m in model.modules() if type(m).__name__ == "Linear"]
    kind = "lr" if len(linears) == 1 else "mlp"
    return {
        "data": str(prepared.path / "data.pt"),
        "models": {
            "full": str(prepared.path / "models" / "full.pt"),
            "half": prepared.checkpoint_paths("half"),
            "traj": prepared.checkpoint_paths("traj"),
        },
        "kind": kind,
        "in_dim": linears[0].in_features,
        "hidden": [m.out_features for m in linears[:-1]],
        "n_classes": linears[-1].out_features,
        "final_layer": setting.final_layer,
        "damping": _Context(prepared, "cpu", False, 256).damping,
        "lr": setting.train_config.lr,
    }


def _run_upstream(
    python: str, spec_file: Path, method: str, opts: dict, timeout: float, workdir: Path
) -> tuple[object, float, str | None]:
    """Run one upstream worker; returns (scores or None, seconds, error)."""
    import torch

    out = workdir / f"{method}_{abs(hash(json.dumps(opts, sort_keys=True)))}.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [python, os.path.abspath(__file__), "--worker", str(spec_file), method]
    cmd += [json.dumps(opts), str(out)]
    try:
        proc = subprocess.run(
            cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None, timeout, f"timeout after {timeout:.0f}s"
    if proc.returncode != 0 or not out.exists():
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "Exception" in x]
        why = errors[-1] if errors else f"exit code {proc.returncode}"
        return None, math.nan, why[:120]
    res = torch.load(out, weights_only=True)
    return res["scores"], res["seconds"], None


def _lds(scores, prepared) -> float:
    import torch

    from dattri.metric import lds

    if not bool(torch.isfinite(scores).all()):
        return math.nan
    corr, _ = lds(scores.double(), prepared.lds_ground_truth())
    return float(torch.nanmean(corr))


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def main() -> None:
    """Parse arguments, run ours and upstream, print the side-by-side tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream-python", default="/tmp/upvenv/bin/python")
    ap.add_argument("--settings", nargs="+", default=["digits-lr", "digits-mlp"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: all")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per upstream run")
    ap.add_argument("--tuned", action="store_true", help="wider upstream sweeps (slow)")
    ap.add_argument("--skip-upstream-methods", nargs="*", default=[], help="ours only")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-upstream", action="store_true")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()

    from dattri.benchmark.methods import METHODS
    from dattri.benchmark.prepare import load_prepared
    from dattri.benchmark.run import evaluate
    from dattri.benchmark.settings import get_setting

    methods = args.methods or list(METHODS)
    results: dict = {}
    for name in args.settings:
        setting = get_setting(name)
        prepared = load_prepared(setting, Path(args.cache_dir) if args.cache_dir else None)
        if prepared is None:
            print(f"{name}: not prepared; run `dattri-bench prepare {name}` first.")
            continue
        rows = results.setdefault(name, {})
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            spec_file = workdir / "spec.json"
            spec_file.write_text(json.dumps(_spec(prepared, setting)))
            for method in methods:
                row = rows.setdefault(method, {"ours": None, "upstream": {}})
                if not args.skip_ours:
                    rep = evaluate(method, prepared)
                    row["ours"] = rep.lds if rep.error is None else None
                    row["ours_s"] = rep.cache_s + rep.attribute_s
                    print(f"[{name}] ours {method}: {_fmt(row['ours'])}", flush=True)
                if args.skip_upstream or method in args.skip_upstream_methods:
                    continue
                variants = list(VARIANTS.get(method, [("default", {})]))
                if args.tuned:
                    tuned = TUNED.get(method, [])
                    variants = [v for v in variants if v[0] != "tuned" or not tuned] + tuned
                for label, opts in variants:
                    sweep = opts.get("sweep")
                    runs = [{"damping": d, "regularization": d} for d in sweep] if sweep else [opts]
                    best = (None, None, None, None)
                    for o in runs:
                        scores, secs, err = _run_upstream(
                            args.upstream_python, spec_file, method, o, args.timeout, workdir
                        )
                        value = None if scores is None else _lds(scores, prepared)
                        if sweep:
                            print(f"[{name}]   upstream {method} {o}: {_fmt(value)} {err or ''}")
                        if best[0] is None or (value is not None and value > best[0]):
                            best = (value, secs, err, o)
                    value, secs, err, o = best
                    if sweep and value is not None:
                        label = f"tuned ({next(iter(o.values()))})"
                    row["upstream"][label] = {"lds": value, "seconds": secs, "error": err}
                    print(
                        f"[{name}] upstream {method} {label}: {_fmt(value)}"
                        + (f"  ({err})" if err else ""),
                        flush=True,
                    )
    for name, rows in results.items():
        print(f"\n### {name}: LDS, ours (defaults) vs upstream dattri 0.3.0 (same setting)\n")
        print("| method | ours | upstream default | upstream other |")
        print("|---|---|---|---|")
        for method, row in rows.items():
            up = row["upstream"]
            default = up.get("default", {})
            d = _fmt(default.get("lds")) if not default.get("error") else default["error"][:40]
            other = ", ".join(f"{k}: {_fmt(v['lds'])}" for k, v in up.items() if k != "default")
            print(f"| {method} | {_fmt(row['ours'])} | {d} | {other} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:6])
    else:
        main()
