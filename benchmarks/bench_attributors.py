"""Time and peak memory of every attributor, ours against upstream dattri 0.3.0.

The same script runs under either library (the API is the same): each (method,
setting) runs in a fresh worker process so that its peak RSS is its own, and when
several interpreters are given the workers alternate between them.

    # upstream in a separate virtualenv (never a dependency of ours):
    python -m venv /tmp/upvenv
    /tmp/upvenv/bin/pip install torch==2.13.0 dattri==0.3.0 scikit-learn
    python benchmarks/bench_attributors.py --python python /tmp/upvenv/bin/python

Settings: digits-lr and digits-mlp (1000 train / 200 test, sklearn digits), mlp-100k
(random data, 10k train / 200 test, an MLP with ~100k parameters). Models are trained
here with plain torch (same code for both libraries); only cache + attribute are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

METHODS = [
    "if-explicit",
    "if-cg",
    "if-lissa",
    "if-arnoldi",
    "if-datainf",
    "if-ekfac",
    "tracin",
    "grad-dot",
    "grad-cos",
    "trak",
    "rps",
]
SETTINGS = ["digits-lr", "digits-mlp", "mlp-100k"]


# --------------------------------------------------------------------------- worker
def _data(setting: str):
    import torch

    if setting.startswith("digits"):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(x), generator=g)
        x = torch.tensor(x, dtype=torch.float32)[perm] / 16.0
        y = torch.tensor(y)[perm]
        return x[:1000], y[:1000], x[1000:1200], y[1000:1200]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_200, 100, generator=g)
    w = torch.randn(100, 10, generator=g)
    y = (x @ w).argmax(1)
    return x[:10_000], y[:10_000], x[10_000:], y[10_000:]


def _model(setting: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if setting == "digits-lr":
        return nn.Sequential(nn.Linear(64, 10))
    if setting == "digits-mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 96), nn.ReLU(), nn.Linear(96, 10)
    )


def _train(model, x, y, steps: int = 300) -> None:
    import torch
    from torch import nn

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def _worker(method: str, setting: str) -> dict:
    import torch
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    import dattri
    from dattri.task import AttributionTask

    ours = hasattr(dattri, "__version__")
    kw = {"verbose": False} if ours else {}
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _data(setting)
    model = _model(setting)
    _train(model, xtr, ytr)
    p = sum(q.numel() for q in model.parameters())
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=500)
    test = DataLoader(TensorDataset(xte, yte), batch_size=200)

    def loss_if(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def loss_sample(params, data):
        x, y = data
        return nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)
        )

    def prob_sample(params, data):
        _x, _y = data
        return torch.exp(-loss_sample(params, data))

    def margin_sample(params, data):
        logp = -loss_sample(params, data)
        return logp - torch.log(-torch.expm1(logp).clamp_min(1e-12))

    ckpt = model.state_dict()
    if method == "if-explicit" and p > 20_000:
        return {"skipped": f"p={p}: a dense p x p Hessian does not fit"}
    from dattri import algorithm as A

    if method.startswith("if-"):
        task = AttributionTask(loss_func=loss_if, model=model, checkpoints=ckpt)
        cls, args = {
            "if-explicit": (A.IFAttributorExplicit, {"regularization": 1e-2}),
            "if-cg": (A.IFAttributorCG, {"regularization": 1e-2, "max_iter": 10}),
            "if-lissa": (A.IFAttributorLiSSA, {"recursion_depth": 100, "batch_size": 50}),
            "if-arnoldi": (
                A.IFAttributorArnoldi,
                {"regularization": 1e-2, "proj_dim": 50, "max_iter": 100},
            ),
            "if-datainf": (A.IFAttributorDataInf, {"regularization": 0.1}),
            "if-ekfac": (A.IFAttributorEKFAC, {"damping": 1e-2}),
        }[method]
        attr = cls(task, **args, **kw)
        t0 = time.perf_counter()
        attr.cache(train)
        t1 = time.perf_counter()
        scores = attr.attribute(train, test)
    elif method in ("tracin", "grad-dot", "grad-cos"):
        task = AttributionTask(loss_func=loss_sample, model=model, checkpoints=[ckpt])
        attr = A.TracInAttributor(
            task,
            weight_list=torch.ones(1),
            normalized_grad=method == "grad-cos",
            projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32},
            **kw,
        )
        t0 = time.perf_counter()
        attr.cache() if not ours else attr.cache(train)
        t1 = time.perf_counter()
        scores = attr.attribute(train, test)
    elif method == "trak":
        task = AttributionTask(loss_func=margin_sample, model=model, checkpoints=[ckpt])
        attr = A.TRAKAttributor(
            task,
            correct_probability_func=prob_sample,
            projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32},
            **kw,
        )
        t0 = time.perf_counter()
        attr.cache(train)
        t1 = time.perf_counter()
        scores = attr.attribute(test)
    elif method == "rps":

        def ce(logits, targets):
            return nn.functional.cross_entropy(logits, targets)

        task = AttributionTask(loss_func=ce, model=model, checkpoints=ckpt, target_func=ce)
        last = "0" if setting == "digits-lr" else str(len(model) - 1)
        if not ours:  # upstream needs a top-level attribute name
            model.final = model[int(last)]
            last = "final"
        attr = A.RPSAttributor(task, final_linear_layer_name=last, **kw)
        t0 = time.perf_counter()
        attr.cache(train)
        t1 = time.perf_counter()
        scores = attr.attribute(train, test)
    else:
        raise ValueError(method)
    t2 = time.perf_counter()
    assert scores.shape == (len(ytr), len(yte)), scores.shape
    return {
        "cache_s": t1 - t0,
        "attribute_s": t2 - t1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finite": bool(torch.isfinite(scores).all()),
        "p": p,
    }


# --------------------------------------------------------------------------- driver
def _run(python: str, method: str, setting: str, timeout: float) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", method, setting]
    try:  # cwd outside the repo: the interpreter must import its own installed dattri
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:90]}
    return json.loads(lines[-1])


def _cell(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if "skipped" in r:
        return "skipped"
    return f"{r['cache_s'] + r['attribute_s']:.2f} s / {r['peak_rss_mb']:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "SETTING"))
    ap.add_argument("--python", nargs="+", default=[sys.executable])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return
    labels = []
    for py in args.python:
        out = subprocess.run(
            [py, "-c", "import dattri; print(getattr(dattri, '__version__', '0.3.0 (upstream)'))"],
            capture_output=True,
            text=True,
            check=False,
            cwd=tempfile.gettempdir(),
        )
        labels.append(f"dattri {out.stdout.strip()}")
    print("cache+attribute time / peak RSS (whole process, incl. torch) per method\n")
    for setting in args.settings:
        print(f"### {setting}\n")
        print("| method | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for method in args.methods:
            cells = [_cell(_run(py, method, setting, args.timeout)) for py in args.python]
            print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
        print()


if __name__ == "__main__":
    main()
