"""Time and peak memory of every attributor, ours against upstream dattri 0.3.0.

The same script runs under either library (the API is the same): each (method,
setting) runs in a fresh worker process so that its peak RSS is its own, and when
several interpreters are given the workers alternate between them.

    # upstream in a separate virtualenv (never a dependency of ours):
    python -m venv /tmp/upvenv
    /tmp/upvenv/bin/pip install torch==2.13.0 dattri==0.3.0 scikit-learn
    OMP_NUM_THREADS=1 python benchmarks/bench_attributors.py \
        --python python /tmp/upvenv/bin/python --settings mlp-100k \
        --n-test if-cg=20 --extrapolate if-cg if-lissa if-datainf --out results.json

Settings: digits-lr and digits-mlp (1000 train / 200 test, sklearn digits), mlp-100k
(random data, 10k train / 200 test, an MLP with ~100k parameters). Models are trained
here with plain torch (same code for both libraries); only cache + attribute are timed,
each worker runs with ``--threads`` torch threads (default 1).

``--out FILE.json`` saves one JSON document, rewritten after every cell: ``meta``
(command line, start/end time, CPU model and core count, load average, threads,
``--repeat``, each interpreter's dattri/torch/Python versions, the run's wall and worker
CPU seconds) and ``results``, one entry per (setting, method, library) with the median
of every measure over its ``--repeat`` runs (process CPU and wall seconds of ``cache``
and ``attribute``, peak RSS, import time) and the runs themselves. ``--report FILE ...``
prints the tables of saved files; ``benchmarks/gen_docs_tables.py`` renders the docs'
speed tables from them.

``--n-test METHOD=N`` uses the first N test samples for that method (for every
interpreter alike). ``--extrapolate METHOD ...`` times the *upstream* interpreters'
``attribute`` on the first K1 and K2 training batches only (``--fracs``; ``cache`` always
sees the whole loader) and extrapolates linearly to all batches, printing the per-batch
time at both fractions as the linearity check (upstream recomputes the inverse-HVP of
the test batch for every train batch, so its attribute time is linear in the batches).
The interpreter whose ``dattri`` has no ``__version__`` is upstream 0.3.0; an interpreter
that cannot import ``dattri`` from outside the repository gets the repository on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
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
#: environment variable naming the digits tensors the driver saved for the workers
DIGITS_ENV = "DATTRI_BENCH_DIGITS"
#: per-run measures summarised (median over the runs) in the saved JSON
MEASURES = ("cache_s", "attribute_s", "cache_cpu_s", "attribute_cpu_s", "peak_rss_mb", "import_s")


# --------------------------------------------------------------------------- worker
def _data(setting: str):
    import torch

    if setting.startswith("digits"):
        cached = os.environ.get(DIGITS_ENV)
        if cached:  # written by the driver: the upstream venv needs no scikit-learn
            x, y = torch.load(cached)
        else:
            from sklearn.datasets import load_digits

            x, y = load_digits(return_X_y=True)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(x), generator=g)
        x = torch.as_tensor(x, dtype=torch.float32)[perm] / 16.0
        y = torch.as_tensor(y)[perm]
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


def _torch_func_warm_up() -> None:
    """Trigger torch's one-off lazy imports before timing, in every interpreter alike.

    The first ``torch.func`` grad/vjp in a process imports ``torch._dynamo``, sympy
    and ~800 other modules (~1.9 s here). Upstream dattri imports them in ``import
    dattri`` (6.2 s vs 2.4 s for ours), outside the timed region; without this warm-up
    our first timed call would pay them instead. Import times are reported apart.
    """
    import torch

    def f(w):
        return (w**3).sum()

    torch.func.vjp(torch.func.grad(f), torch.ones(2))
    torch.func.vmap(
        lambda x: torch.nn.functional.cross_entropy(x.unsqueeze(0), torch.zeros(1).long())
    )(torch.ones(2, 3))


def _worker(method: str, setting: str, n_test: int | None, attr_batches: int | None) -> dict:
    import torch
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    t_import = time.perf_counter()
    import dattri
    from dattri import algorithm as A
    from dattri.task import AttributionTask

    import_s = time.perf_counter() - t_import
    ours = hasattr(dattri, "__version__")
    kw = {"verbose": False} if ours else {}
    _torch_func_warm_up()
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _data(setting)
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    model = _model(setting)
    # train once per setting; every later worker (either library) loads the same weights
    path = os.path.join(tempfile.gettempdir(), f"dattri_bench_{setting}_{torch.__version__}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        model.eval()
    else:
        _train(model, xtr, ytr)
        tmp = f"{path}.{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    p = sum(q.numel() for q in model.parameters())
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=500)
    test = DataLoader(TensorDataset(xte, yte), batch_size=200)
    n_batches = len(train)
    k = n_batches if attr_batches is None or method == "trak" else min(attr_batches, n_batches)
    # attribute only over the first k train batches (cache always sees all of them)
    attr_train = DataLoader(TensorDataset(xtr[: k * 500], ytr[: k * 500]), batch_size=500)
    if k == n_batches:  # attribute on the cached loader itself (the usual call)
        attr_train = train

    def loss_if(params, data):  # .long(): upstream LiSSA's collate casts labels to float
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y.long())

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
        return logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))

    ckpt = model.state_dict()
    if method == "if-explicit" and p > 20_000:
        return {"skipped": f"p={p}: a dense p x p Hessian does not fit"}

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
        t0, c0 = time.perf_counter(), time.process_time()
        attr.cache(train)
        t1, c1 = time.perf_counter(), time.process_time()
        scores = attr.attribute(attr_train, test)
    elif method in ("tracin", "grad-dot", "grad-cos"):
        task = AttributionTask(loss_func=loss_sample, model=model, checkpoints=[ckpt])
        attr = A.TracInAttributor(
            task,
            weight_list=torch.ones(1),
            normalized_grad=method == "grad-cos",
            projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32},
            **kw,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        attr.cache() if not ours else attr.cache(train)
        t1, c1 = time.perf_counter(), time.process_time()
        scores = attr.attribute(attr_train, test)
    elif method == "trak":
        task = AttributionTask(loss_func=margin_sample, model=model, checkpoints=[ckpt])
        attr = A.TRAKAttributor(
            task,
            correct_probability_func=prob_sample,
            projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32},
            **kw,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        attr.cache(train)
        t1, c1 = time.perf_counter(), time.process_time()
        scores = attr.attribute(test)
    elif method == "rps":

        def ce(logits, targets):
            return nn.functional.cross_entropy(logits, targets)

        last = "0" if setting == "digits-lr" else str(len(model) - 1)
        if not ours:  # upstream needs a top-level attribute name (in the checkpoint too)
            # a wrapper, not ``model.final = ...``: that would append the layer to the
            # Sequential and run it twice
            body, final = model[: int(last)], model[int(last)]

            class _Wrapped(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.body, self.final = body, final

                def forward(self, x):
                    return self.final(self.body(x))

            model = _Wrapped().eval()
            last = "final"
            ckpt = model.state_dict()
        task = AttributionTask(loss_func=ce, model=model, checkpoints=ckpt, target_func=ce)
        attr = A.RPSAttributor(task, final_linear_layer_name=last, **kw)
        t0, c0 = time.perf_counter(), time.process_time()
        attr.cache(train)
        t1, c1 = time.perf_counter(), time.process_time()
        scores = attr.attribute(attr_train, test)
    else:
        raise ValueError(method)
    t2, c2 = time.perf_counter(), time.process_time()
    assert scores.shape == (min(len(ytr), k * 500), len(yte)), scores.shape
    return {
        "attr_batches": k,
        "n_batches": n_batches,
        "n_test": len(yte),
        "cache_s": t1 - t0,
        "attribute_s": t2 - t1,
        "cache_cpu_s": c1 - c0,
        "attribute_cpu_s": c2 - c1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "import_s": import_s,
        "finite": bool(torch.isfinite(scores).all()),
        "p": p,
    }


# --------------------------------------------------------------------------- driver
def _env_for(python: str) -> dict:
    """Environment in which ``python`` imports a dattri from outside the repository."""
    env = dict(os.environ)
    probe = [python, "-c", "import dattri"]
    kw = {"capture_output": True, "check": False, "cwd": tempfile.gettempdir()}
    if subprocess.run(probe, env=env, **kw).returncode != 0:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _run(
    python: str,
    env: dict,
    method: str,
    setting: str,
    timeout: float,
    n_test: int | None = None,
    attr_batches: int | None = None,
    threads: int = 1,
) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", method, setting]
    cmd += ["--threads", str(threads)]
    if n_test is not None:
        cmd += ["--worker-n-test", str(n_test)]
    if attr_batches is not None:
        cmd += ["--worker-attr-batches", str(attr_batches)]
    try:  # cwd outside the repo: the interpreter must import its own installed dattri
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=tempfile.gettempdir(),
            env={**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode < 0:
        return {"error": f"killed by signal {-out.returncode} (out of memory?)"}
    if out.returncode != 0 or not lines:
        errs = [ln for ln in out.stderr.splitlines() if "Error" in ln or "error" in ln]
        tail = (errs or out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:90]}
    return json.loads(lines[-1])


def _extrapolated(r1: dict, r2: dict) -> dict:
    """Linear extrapolation of the attribute time from two train-batch fractions."""
    if "cache_s" not in r1 or "cache_s" not in r2:
        return r2 if "cache_s" not in r2 else r1
    k1, k2, n = r1["attr_batches"], r2["attr_batches"], r2["n_batches"]
    out = {**r2, "peak_rss_mb": max(r1["peak_rss_mb"], r2["peak_rss_mb"])}
    if k2 == k1 or k2 >= n:
        return out
    for key in ("attribute_s", "attribute_cpu_s"):
        slope = (r2[key] - r1[key]) / (k2 - k1)
        out[key] = r2[key] + slope * (n - k2)
    out["note"] = (
        f"upstream attribute extrapolated from {k1} and {k2} of {n} train batches "
        f"(CPU {r1['attribute_cpu_s'] / k1:.1f} / {r2['attribute_cpu_s'] / k2:.1f} s per batch)"
    )
    return out


def _fmt(r: dict) -> list[str]:
    if "error" in r:
        return [f"error: {r['error']}", "", ""]
    if "skipped" in r:
        return [f"n/a ({r['skipped']})", "", ""]
    cpu = [f" ({r[k]:.2f})" if k in r else "" for k in ("cache_cpu_s", "attribute_cpu_s")]
    return [
        f"{r['cache_s']:.2f}{cpu[0]}",
        f"{r['attribute_s']:.2f}{cpu[1]}",
        f"{r['peak_rss_mb']:.0f}",
    ]


def _speedup(results: list[dict]) -> list[str]:
    """``[speedup wall (cpu), RSS ratio]`` of the second interpreter over the first."""
    if len(results) != 2:
        return []
    if not all("cache_s" in r for r in results):
        return ["", ""]
    wall = [r["cache_s"] + r["attribute_s"] for r in results]
    rss = f"{results[0]['peak_rss_mb'] / results[1]['peak_rss_mb']:.2f}"
    if not all("cache_cpu_s" in r for r in results):
        return [f"{wall[1] / wall[0]:.1f}x", rss]
    cpu = [r["cache_cpu_s"] + r["attribute_cpu_s"] for r in results]
    return [f"{wall[1] / wall[0]:.1f}x ({cpu[1] / cpu[0]:.1f}x)", rss]


def _key_values(items: list[str], what: str) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, val = item.partition("=")
        if not val.isdigit():
            msg = f"{what} entries must look like METHOD=N, got {item!r}."
            raise SystemExit(msg)
        out[name] = int(val)
    return out


def _header(labels: list[str]) -> None:
    cols = ["cache s", "attribute s", "peak RSS MB"]
    head = [f"{lab}: {c}" for lab in labels for c in cols]
    speed = ["speedup (cache+attribute)", "RSS ratio"] if len(labels) == 2 else []
    print("| method | " + " | ".join(head + speed) + " | notes |")
    print("|---|" + "---|" * (len(head) + len(speed) + 1))


def _row(method: str, results: list[dict]) -> None:
    cells = [c for r in results for c in _fmt(r)] + _speedup(results)
    n_tests = {r["n_test"] for r in results if "n_test" in r}
    notes = [f"n_test={min(n_tests)} (both)"] if n_tests and min(n_tests) < 200 else []
    notes += [r["note"] for r in results if r.get("note")]
    if len(results) > 1 and all("import_s" in r for r in results):
        notes.append("import s: " + " / ".join(f"{r['import_s']:.1f}" for r in results))
    print(f"| {method} | " + " | ".join(cells) + f" | {'; '.join(notes)} |", flush=True)


def _report(paths: list[str]) -> None:
    """Print the tables of results saved with ``--out`` (latest result per cell)."""
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    labels: list[str] = []
    for path in paths:
        for r in _read_results(path):
            if r.get("partial"):
                continue
            cells.setdefault((r["setting"], r["method"]), {})[r["label"]] = r
            if r["label"] not in labels:
                labels.append(r["label"])
    labels.sort(key=lambda lab: "upstream" in lab)  # ours first
    print(_LEGEND)
    for setting in SETTINGS:
        methods = [m for m in METHODS if (setting, m) in cells]
        if not methods:
            continue
        print(f"### {setting}\n")
        _header(labels)
        for m in methods:
            _row(m, [cells[setting, m].get(lab, {"error": "not run"}) for lab in labels])
        print()


def _read_results(path: str) -> list[dict]:
    """The results of a saved run: a JSON document (``--out``) or legacy JSON lines."""
    with open(path) as fh:
        text = fh.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(doc, dict) or "results" not in doc:
        msg = f"{path}: not a bench_attributors.py result file (no 'results')."
        raise SystemExit(msg)
    return doc["results"]


def _machine() -> dict:
    """CPU model, core count and platform of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}


def _library(python: str, env: dict) -> dict:
    """Versions of dattri (``None`` for upstream 0.3.0), torch and Python of ``python``."""
    code = (
        "import json, sys, dattri, torch; print(json.dumps({'dattri_version': "
        "getattr(dattri, '__version__', None), 'torch_version': torch.__version__, "
        "'python_version': sys.version.split()[0]}))"
    )
    kw = {"capture_output": True, "text": True, "check": False, "cwd": tempfile.gettempdir()}
    out = subprocess.run([python, "-c", code], env=env, **kw)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        msg = f"--python {python}: cannot import dattri and torch ({tail})."
        raise SystemExit(msg)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    version = info["dattri_version"]
    return {
        "label": f"dattri {version or '0.3.0 (upstream)'}",
        "python": python,
        "upstream": version is None,
        **info,
    }


def _save_digits(settings: list[str]) -> str | None:
    """Save the digits arrays for the workers (so their interpreters need no sklearn)."""
    if not any(s.startswith("digits") for s in settings):
        return None
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    path = os.path.join(tempfile.gettempdir(), f"dattri_bench_digits_{os.getpid()}.pt")
    torch.save((torch.as_tensor(x), torch.as_tensor(y)), path)
    return path


def _summary(runs: list[dict]) -> dict:
    """One cell from its runs: the median of every measure; the first error if any run failed."""
    ok = [r for r in runs if "cache_s" in r]
    if not ok or len(ok) < len(runs):
        bad = next(r for r in runs if "cache_s" not in r)
        return {**bad, "runs": runs}
    out = {k: v for k, v in ok[-1].items() if k not in MEASURES and k != "fractions"}
    out["finite"] = all(r["finite"] for r in ok)
    for key in MEASURES:
        if all(key in r for r in ok):
            out[key] = statistics.median(r[key] for r in ok)
    return {**out, "runs": runs}


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


_LEGEND = "times: wall s (process CPU s); speedup = 2nd / 1st column set; RSS ratio = 1st / 2nd\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "SETTING"))
    ap.add_argument("--worker-n-test", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-attr-batches", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--python", nargs="+", default=[sys.executable])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--settings", nargs="+", default=SETTINGS)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--n-test", nargs="*", default=[], metavar="METHOD=N")
    ap.add_argument("--extrapolate", nargs="*", default=[], metavar="METHOD")
    ap.add_argument("--fracs", nargs=2, type=int, default=[1, 2], metavar=("K1", "K2"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (median saved)")
    ap.add_argument("--out", default=None, help="save the results as one JSON document")
    ap.add_argument("--report", nargs="+", default=None, help="print tables of --out files")
    args = ap.parse_args()
    if args.report:
        _report(args.report)
        return
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = _worker(*args.worker, args.worker_n_test, args.worker_attr_batches)
        print(json.dumps(res))
        return
    n_test = _key_values(args.n_test, "--n-test")
    if args.repeat < 1:
        msg = f"--repeat must be at least 1, got {args.repeat}."
        raise SystemExit(msg)
    if args.extrapolate and not 0 < args.fracs[0] < args.fracs[1]:
        msg = "--fracs K1 K2 needs 0 < K1 < K2."
        raise SystemExit(msg)
    started_wall, started_cpu = time.perf_counter(), _children_cpu()
    digits = _save_digits(args.settings)
    libs, envs = [], []
    for py in args.python:
        env = _env_for(py)
        if digits:
            env[DIGITS_ENV] = digits
        envs.append(env)
        libs.append(_library(py, env))
    labels = [lib["label"] for lib in libs]
    doc = {
        "meta": {
            "command": "python benchmarks/bench_attributors.py " + shlex.join(sys.argv[1:]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "machine": _machine(),
            "threads": args.threads,
            "repeats": args.repeat,
            "measure": "median over the repeats; *_cpu_s: process CPU seconds of the worker",
            "load_average_start": os.getloadavg(),
            "libraries": libs,
        },
        "results": [],
    }
    print(f"threads per worker: {args.threads}; load average {os.getloadavg()}\n")
    print(_LEGEND)
    try:
        for setting in args.settings:
            print(f"### {setting}\n")
            _header(labels)
            for method in args.methods:
                runs: list[list[dict]] = [[] for _ in libs]
                for rep in range(args.repeat):
                    order = range(len(libs)) if rep % 2 == 0 else reversed(range(len(libs)))
                    for i in order:  # alternate which library goes first
                        kw = {"n_test": n_test.get(method), "threads": args.threads}
                        py, env = args.python[i], envs[i]
                        if libs[i]["upstream"] and method in args.extrapolate:
                            k1, k2 = args.fracs
                            r1 = _run(py, env, method, setting, args.timeout, attr_batches=k1, **kw)
                            r2 = _run(py, env, method, setting, args.timeout, attr_batches=k2, **kw)
                            res = {**_extrapolated(r1, r2), "fractions": [r1, r2]}
                        else:
                            res = _run(py, env, method, setting, args.timeout, **kw)
                        runs[i].append(res)
                results = []
                for lib, cell in zip(libs, runs):
                    res = _summary(cell)
                    res.update(method=method, setting=setting, python=lib["python"])
                    res["label"] = lib["label"]
                    results.append(res)
                if args.out:
                    doc["results"] += results
                    _write_json(args.out, doc)
                _row(method, results)
            print(f"\nload average after {setting}: {os.getloadavg()}\n")
    finally:
        if digits:
            os.remove(digits)
    doc["meta"].update(
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average_end=os.getloadavg(),
        wall_s=round(time.perf_counter() - started_wall, 1),
        workers_cpu_s=round(_children_cpu() - started_cpu, 1),
    )
    if args.out:
        _write_json(args.out, doc)
        print(f"saved {args.out}")
    print(f"wall {doc['meta']['wall_s']} s, worker CPU {doc['meta']['workers_cpu_s']} s")


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


if __name__ == "__main__":
    main()
