"""TRAK on ResNet-9 with CIFAR-shaped random data: speed and quality vs upstream.

Each library runs in its own worker process with ``cwd`` outside the repository, so
``/tmp/upvenv/bin/python`` imports upstream dattri 0.3.0 and our interpreter imports
this checkout (``PYTHONPATH`` is set to the repository root for ours only). All
workers use ONE torch thread; runs alternate between the libraries so that both see
the same machine load (the 1-minute load average is printed per run). Times are
wall-clock and process CPU time (the latter is robust to other jobs on the box).

``--mode time`` (default): per run, one plain SGD epoch over the training samples
(batch 64), TRAK ``cache`` on ``n_train`` samples and ``attribute`` on ``n_test``.
Upstream regenerates its dense projection for every batch (about a second per
sample on a 2-core CPU), so it is timed on small subsets (``--up-train``, default
``50,100``) and extrapolated linearly per sample; the two sizes check linearity.

``--mode quality``: equal quality without an LDS (random data has none). One model
(ResNet-9, one SGD epoch) and one data set are shared by all workers through a file;
each library computes TRAK scores at ``k``; the driver computes the exact,
unprojected TRAK scores with a Python loop of ``torch.autograd.grad`` (float64 Gram
matrices, push-through identity ``Phi (Phi^T Phi + l I)^-1 phi^T =
(Phi Phi^T + l I)^-1 Phi phi^T``) and prints the correlation of every library's
scores with them. ``l`` is the same for all (a small fraction of the mean diagonal
of the exact kernel), since ``n_train < k`` makes the unregularised kernel singular.

Usage::

    python benchmarks/bench_trak_resnet.py --mode time --n-train 1000 --n-test 100
    python benchmarks/bench_trak_resnet.py --mode quality --n-train 100 --n-test 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = "/tmp/upvenv/bin/python"


# ---------------------------------------------------------------------- worker


def _model(ours: bool):
    if ours:
        from dattri.benchmark.models import ResNet9

        return ResNet9(num_classes=10)
    from dattri.benchmark.models.resnet9.resnet9 import ResNet9

    return ResNet9(num_classes=10, dropout_rate=0.0)


def _worker(cfg: dict) -> dict:
    import torch
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    import dattri
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask

    torch.set_num_threads(1)
    ours = hasattr(dattri, "__version__")
    n_train, n_test = cfg["n_train"], cfg["n_test"]
    torch.manual_seed(0)
    model = _model(ours)
    if cfg.get("shared"):
        blob = torch.load(cfg["shared"], weights_only=True)
        model.load_state_dict(blob["state"])
        x, y = blob["x"], blob["y"]
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=64)
    test_set = TensorDataset(x[n_train : n_train + n_test], y[n_train : n_train + n_test])
    test = DataLoader(test_set, batch_size=64)

    res: dict = {"lib": dattri.__version__ if ours else "0.3.0", "n_train": n_train}
    if not cfg.get("shared"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        for xb, yb in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        res["epoch_s"] = time.perf_counter() - t0
        res["epoch_cpu"] = time.process_time() - c0
    model.eval()

    def margin(params, data):
        xs, ys = data
        logp = -nn.functional.cross_entropy(
            functional_call(model, params, (xs.unsqueeze(0),)), ys.unsqueeze(0)
        )
        return logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))

    def prob(params, data):
        xs, ys = data
        return torch.exp(
            -nn.functional.cross_entropy(
                functional_call(model, params, (xs.unsqueeze(0),)), ys.unsqueeze(0)
            )
        )

    task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
    kw: dict = {"projector_kwargs": {"proj_dim": cfg["k"], "proj_max_batch_size": 32}}
    if ours:
        kw["projector_kwargs"]["proj_type"] = cfg["proj_type"]
        kw["verbose"] = False
    else:
        kw["projector_kwargs"]["device"] = "cpu"
    attr = TRAKAttributor(
        task, correct_probability_func=prob, device="cpu", regularization=cfg["reg"], **kw
    )
    t1, c1 = time.perf_counter(), time.process_time()
    attr.cache(train)
    t2, c2 = time.perf_counter(), time.process_time()
    scores = attr.attribute(test)
    t3, c3 = time.perf_counter(), time.process_time()
    if tuple(scores.shape) != (n_train, n_test):
        msg = f"unexpected score shape {tuple(scores.shape)}"
        raise RuntimeError(msg)
    if cfg.get("out"):
        torch.save(scores.detach().double().cpu(), cfg["out"])
    res.update(
        cache_s=t2 - t1,
        cache_cpu=c2 - c1,
        attribute_s=t3 - t2,
        attribute_cpu=c3 - c2,
        load=os.getloadavg()[0],
    )
    return res


# ---------------------------------------------------------------------- driver


def _run(py: str, cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    if py != UPSTREAM:
        env["PYTHONPATH"] = str(REPO)
    load0 = os.getloadavg()[0]
    out = subprocess.run(
        [py, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
        env=env,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"error": tail, "cfg": cfg}
    res = json.loads(lines[-1])
    res["load0"] = load0
    return res


def _time_mode(args: argparse.Namespace) -> None:
    base = {"k": args.k, "reg": args.reg, "n_test": args.n_test}
    up_sizes = [int(v) for v in args.up_train.split(",") if v]
    runs = []  # alternate: upstream small, ours, upstream larger, ours (other type)
    ours_cfgs = [
        dict(base, n_train=args.n_train, proj_type=t) for t in args.proj_types.split(",") if t
    ]
    up_cfgs = [dict(base, n_train=n, n_test=args.up_test, proj_type="normal") for n in up_sizes]
    while ours_cfgs or up_cfgs:
        if up_cfgs and not args.no_upstream:
            runs.append((UPSTREAM, up_cfgs.pop(0)))
        elif up_cfgs:
            up_cfgs.pop(0)
        if ours_cfgs:
            runs.append((sys.executable, ours_cfgs.pop(0)))
    print(f"TRAK, ResNet-9 (10 classes), CIFAR-shaped random data, k={args.k}, CPU, 1 thread\n")
    head = (
        "| library | proj | n_train / n_test | epoch s (cpu) | cache s (cpu) | attribute s (cpu) "
        "| cache s / train sample (cpu) | attribute s / test sample (cpu) | cache / epoch | load |"
    )
    print(head)
    print("|" + "---|" * 10)
    results = []
    for py, cfg in runs:
        r = _run(py, cfg)
        if "error" in r:
            print(f"| {py} | {cfg['proj_type']} | {cfg['n_train']} | error: {r['error']} |")
            continue
        results.append((cfg, r))
        n, m = cfg["n_train"], cfg["n_test"]
        print(
            f"| dattri {r['lib']} | {cfg['proj_type']} | {n} / {m} "
            f"| {r['epoch_s']:.1f} ({r['epoch_cpu']:.1f}) "
            f"| {r['cache_s']:.1f} ({r['cache_cpu']:.1f}) "
            f"| {r['attribute_s']:.1f} ({r['attribute_cpu']:.1f}) "
            f"| {r['cache_s'] / n:.4f} ({r['cache_cpu'] / n:.4f}) "
            f"| {r['attribute_s'] / m:.4f} ({r['attribute_cpu'] / m:.4f}) "
            f"| {r['cache_s'] / r['epoch_s']:.1f}x | {r['load0']:.1f}-{r['load']:.1f} |",
            flush=True,
        )
    ups = [(c, r) for c, r in results if r["lib"] == "0.3.0"]
    if len(ups) >= 2:
        (c_a, r_a), (c_b, r_b) = ups[0], ups[-1]
        for key in ("cache_s", "cache_cpu"):  # upstream regenerates per batch of 64
            marg = (r_b[key] - r_a[key]) / (c_b["n_train"] - c_a["n_train"])
            print(
                f"\nupstream {key}: {r_a[key] / c_a['n_train']:.3f} s/sample at "
                f"{c_a['n_train']}, {r_b[key] / c_b['n_train']:.3f} at {c_b['n_train']}, "
                f"marginal {marg:.3f} (linearity check)"
            )
    if ups:
        (c_a, r_a), (c_u, r_u) = ups[0], ups[-1]
        per_tr = r_u["cache_cpu"] / c_u["n_train"]
        if c_u["n_train"] > c_a["n_train"]:  # marginal rate: no fixed costs
            per_tr = (r_u["cache_cpu"] - r_a["cache_cpu"]) / (c_u["n_train"] - c_a["n_train"])
        per_te = r_u["attribute_cpu"] / c_u["n_test"]
        est = per_tr * args.n_train + per_te * args.n_test
        print(
            f"upstream extrapolated to {args.n_train}/{args.n_test}: cache+attribute "
            f"~{est:.0f} s CPU ({per_tr:.3f} s/train sample, {per_te:.3f} s/test sample)"
        )
        for c, r in results:
            if r["lib"] != "0.3.0":
                tot = r["cache_cpu"] + r["attribute_cpu"]
                scale = args.n_train / c["n_train"]
                print(
                    f"ours ({c['proj_type']}, {c['n_train']} train): {tot:.0f} s CPU -> "
                    f"{est / (tot * scale):.1f}x faster than upstream (CPU time, "
                    "upstream extrapolated)"
                )


def _exact_scores(blob: dict, n_train: int, n_test: int, reg_frac: float) -> tuple:
    """Exact unprojected TRAK scores and the regularisation used."""
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO))
    from dattri.benchmark.models import ResNet9

    torch.set_num_threads(1)
    model = ResNet9(num_classes=10)
    model.load_state_dict(blob["state"])
    model.eval()
    x, y = blob["x"], blob["y"]
    params = [p for p in model.parameters() if p.requires_grad]
    n_par = sum(p.numel() for p in params)

    def grad_margin(i: int) -> torch.Tensor:
        out = model(x[i : i + 1])
        logp = -nn.functional.cross_entropy(out, y[i : i + 1])
        m = logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))
        gs = torch.autograd.grad(m, params)
        return torch.cat([g.flatten() for g in gs]) / n_par**0.5

    with torch.no_grad():
        p = torch.softmax(model(x[:n_train]), -1)[torch.arange(n_train), y[:n_train]]
    q = (1 - p).double()
    g_tr = torch.empty(n_train, n_par)
    g_te = torch.empty(n_test, n_par)
    for i in range(n_train + n_test):
        (g_tr[i] if i < n_train else g_te[i - n_train]).copy_(grad_margin(i))
    gram = torch.zeros(n_train, n_train, dtype=torch.float64)
    cross = torch.zeros(n_train, n_test, dtype=torch.float64)
    for s in range(0, n_par, 1 << 19):  # float64 products, column blocks (bounded memory)
        a, b = g_tr[:, s : s + (1 << 19)].double(), g_te[:, s : s + (1 << 19)].double()
        gram += a @ a.T
        cross += a @ b.T
    lam = reg_frac * gram.diagonal().mean().item()
    s = torch.linalg.solve(gram + lam * torch.eye(n_train, dtype=gram.dtype), cross)
    return s * q[:, None], lam


def _quality_mode(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from scipy.stats import spearmanr
    from torch import nn

    sys.path.insert(0, str(REPO))
    from dattri.benchmark.models import ResNet9

    torch.set_num_threads(1)
    n, m = args.n_train, args.n_test
    torch.manual_seed(0)
    model = ResNet9(num_classes=10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + m, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n + m,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for s in range(0, n, 64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[s : s + 64]), y[s : s + 64]).backward()
        opt.step()
    tmp = Path(tempfile.mkdtemp(prefix="trak_quality_"))
    blob = {"state": model.state_dict(), "x": x, "y": y}
    torch.save(blob, tmp / "shared.pt")
    t0 = time.perf_counter()
    exact, lam = _exact_scores(blob, n, m, args.reg_frac)
    print(
        f"TRAK quality, ResNet-9, {n} train / {m} test, k={args.k}; exact scores "
        f"({time.perf_counter() - t0:.0f} s), regularization {lam:.3e} for all\n"
    )
    runs = [(sys.executable, t) for t in args.proj_types.split(",")]
    if not args.no_upstream:
        runs.insert(1, (UPSTREAM, "normal"))
    scores = {"exact": exact.numpy()}
    for py, ptype in runs:
        out = tmp / f"{len(scores)}.pt"
        cfg = {
            "n_train": n,
            "n_test": m,
            "k": args.k,
            "reg": lam,
            "proj_type": ptype,
            "shared": str(tmp / "shared.pt"),
            "out": str(out),
        }
        r = _run(py, cfg)
        if "error" in r:
            print(f"{py} {ptype}: error {r['error']}")
            continue
        scores[f"dattri {r['lib']} {ptype}"] = torch.load(out, weights_only=True).numpy()
        print(
            f"dattri {r['lib']} {ptype}: cache {r['cache_s']:.1f} s ({r['cache_cpu']:.1f} s CPU), "
            f"attribute {r['attribute_s']:.1f} s ({r['attribute_cpu']:.1f} s CPU), "
            f"load {r['load0']:.1f}-{r['load']:.1f}",
            flush=True,
        )

    def corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        pear = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        spear = np.mean([spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])])
        return pear, float(spear)

    print("| scores | Pearson vs exact | mean per-test Spearman vs exact |")
    print("|---|---|---|")
    names = list(scores)
    for name in names[1:]:
        p, s = corr(scores[name], scores["exact"])
        print(f"| {name} | {p:.3f} | {s:.3f} |")
    for i, a in enumerate(names[1:], 1):
        for b in names[i + 1 :]:
            p, s = corr(scores[a], scores[b])
            print(f"| {a} vs {b} | {p:.3f} | {s:.3f} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("time", "quality"), default="time")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--proj-types", default="sjlt,normal", help="ours, comma-separated")
    ap.add_argument("--up-train", default="64,128", help="upstream subset sizes (time mode)")
    ap.add_argument("--up-test", type=int, default=64, help="upstream test samples (time mode)")
    ap.add_argument("--reg", type=float, default=1e-6, help="TRAK regularization (time mode)")
    ap.add_argument("--reg-frac", type=float, default=1e-3, help="quality mode, see docstring")
    ap.add_argument("--no-upstream", action="store_true")
    args = ap.parse_args()
    if not Path(UPSTREAM).exists():
        args.no_upstream = True
    if args.mode == "time":
        _time_mode(args)
    else:
        _quality_mode(args)


if __name__ == "__main__":
    main()
