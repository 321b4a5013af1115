"""TRAK on ResNet-9 with CIFAR-shaped random data, against one training epoch.

Runs under our dattri or upstream dattri 0.3.0 (same API); each library in its own
process, alternating when several interpreters are given::

    python benchmarks/bench_trak_resnet.py --python python /tmp/upvenv/bin/python \
        --n-train 1000 --n-test 100 --k 2048

The table gives, per library: one plain SGD training epoch over the training samples
(batch 64), TRAK ``cache`` and ``attribute`` times, and the time per training sample.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _worker(n_train: int, n_test: int, k: int, device: str, proj_type: str) -> dict:
    import torch
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    import dattri
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask

    ours = hasattr(dattri, "__version__")
    torch.manual_seed(0)
    if ours:
        from dattri.benchmark.models import ResNet9

        model = ResNet9(num_classes=10)
    else:
        from dattri.benchmark.models.resnet9.resnet9 import create_resnet9_model

        model = create_resnet9_model(num_classes=10)
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=64)
    test = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=64)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    sync()
    t0 = time.perf_counter()
    for xb, yb in train:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
        opt.step()
    sync()
    epoch_s = time.perf_counter() - t0
    model.eval()

    def margin(params, data):
        xs, ys = data
        logp = -nn.functional.cross_entropy(
            functional_call(model, params, (xs.unsqueeze(0),)), ys.unsqueeze(0)
        )
        return logp - torch.log(-torch.expm1(logp).clamp_min(1e-12))

    def prob(params, data):
        xs, ys = data
        return torch.exp(
            -nn.functional.cross_entropy(
                functional_call(model, params, (xs.unsqueeze(0),)), ys.unsqueeze(0)
            )
        )

    task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
    kwargs = {"projector_kwargs": {"proj_dim": k, "proj_max_batch_size": 32, "device": device}}
    if ours:
        kwargs = {"projector_kwargs": {"proj_dim": k, "proj_type": proj_type}, "verbose": False}
    attr = TRAKAttributor(task, correct_probability_func=prob, device=device, **kwargs)
    sync()
    t1 = time.perf_counter()
    attr.cache(train)
    sync()
    t2 = time.perf_counter()
    scores = attr.attribute(test)
    sync()
    t3 = time.perf_counter()
    assert scores.shape == (n_train, n_test)
    return {
        "epoch_s": epoch_s,
        "cache_s": t2 - t1,
        "attribute_s": t3 - t2,
        "per_sample_s": (t2 - t1) / n_train,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--python", nargs="+", default=[sys.executable])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--proj-type", default="normal", help="ours only (upstream CPU: normal)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.n_train, args.n_test, args.k, args.device, args.proj_type)))
        return
    print(f"TRAK, ResNet-9, {args.n_train} train / {args.n_test} test, k={args.k}, {args.device}\n")
    print(
        "| library | train epoch s | TRAK cache s | attribute s | s / train sample | cache / epoch |"
    )
    print("|---|---|---|---|---|---|")
    for py in args.python:
        cmd = [
            py,
            os.path.abspath(__file__),
            "--worker",
            "--n-train",
            str(args.n_train),
            "--n-test",
            str(args.n_test),
            "--k",
            str(args.k),
            "--device",
            args.device,
            "--proj-type",
            args.proj_type,
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir()
        )
        label = subprocess.run(
            [py, "-c", "import dattri; print(getattr(dattri, '__version__', '0.3.0'))"],
            capture_output=True,
            text=True,
            check=False,
            cwd=tempfile.gettempdir(),
        ).stdout.strip()
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            print(
                f"| dattri {label} | error: {(out.stderr.strip().splitlines() or ['?'])[-1][:80]} |||||"
            )
            continue
        r = json.loads(lines[-1])
        print(
            f"| dattri {label} | {r['epoch_s']:.2f} | {r['cache_s']:.2f} | {r['attribute_s']:.2f} | "
            f"{r['per_sample_s']:.4f} | {r['cache_s'] / r['epoch_s']:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
