"""Benchmark: TRAK at scale (on-disk store, memory budget, torch.distributed).

Synthetic data (``--n-train`` x ``--n-test``, default 200k x 2k, 32 features, 10
classes) on a small random MLP (32-64-10), TRAK with ``proj_dim`` (default 1024).
Configurations, each in a fresh process (so peak RSS is its own):

* ``memory``: features in memory, ``attribute`` returns the full matrix (no budget);
* ``budget``: ``cache_dir`` (float16 store), ``max_memory``, scores to a ``.npy``
  score file (``attribute(..., out=...)``);
* ``budget x2``: the same with 2 processes (``torchrun --nproc_per_node 2``, gloo).

Reported: peak RSS (max over ranks) and its increase over the RSS before ``cache``,
``cache`` throughput (train samples/s) and ``attribute`` throughput (million
train x test pairs/s), disk used (store + score file). Run by hand, e.g.::

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset


def _rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process (one rank under torchrun)."""
    import torch.distributed as dist

    from dattri.algorithm.trak import TRAKAttributor
    from dattri.params.projection import TRAKProjectionParams
    from dattri.task import AttributionTask

    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = args.n_train + args.n_test
    x = torch.randn(n, 32, generator=gen)
    y = (x @ torch.randn(32, 10, generator=gen)).argmax(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def margin(params, data):
        xi, yi = data
        logp = -nn.functional.cross_entropy(
            functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0)
        )
        return logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))

    def prob(params, data):
        xi, yi = data
        return torch.softmax(functional_call(model, params, (xi.unsqueeze(0),)), -1)[0, yi]

    train = DataLoader(TensorDataset(x[: args.n_train], y[: args.n_train]), batch_size=1024)
    test = DataLoader(TensorDataset(x[args.n_train :], y[args.n_train :]), batch_size=1024)
    folder = Path(args.folder)
    budget = args.config != "memory"
    kwargs = {}
    if budget:
        kwargs = {
            "cache_dir": folder / "store",
            "store_dtype": "float16",
            "max_memory": args.max_memory,
        }
    attr = TRAKAttributor(
        AttributionTask(margin, model, model.state_dict()),
        prob,
        TRAKProjectionParams(proj_dim=args.proj_dim),
        regularization=1e-3,
        verbose=False,
        **kwargs,
    )
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    attr.cache(train)
    if world > 1:
        dist.barrier()
    t1 = time.perf_counter()
    out = folder / "scores.npy" if budget else None
    scores = attr.attribute(test, out=out)
    if world > 1:
        dist.barrier()
    t2 = time.perf_counter()
    assert scores.shape == (args.n_train, args.n_test)
    del scores
    result = {
        "rank": rank,
        "world": world,
        "rss_before_mb": rss0,
        "peak_mb": _peak_mb(),
        "cache_s": t1 - t0,
        "attribute_s": t2 - t1,
    }
    print("RESULT " + json.dumps(result), flush=True)
    if world > 1:
        dist.destroy_process_group()


def run_config(config: str, args: argparse.Namespace, nproc: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.tmp))
    base = [
        str(Path(__file__).resolve()),
        "--worker",
        "--config",
        config,
        "--folder",
        str(folder),
        "--n-train",
        str(args.n_train),
        "--n-test",
        str(args.n_test),
        "--proj-dim",
        str(args.proj_dim),
        "--max-memory",
        args.max_memory,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        cmd += base
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"{config} x{nproc} failed:\n{proc.stdout}\n{proc.stderr}")
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    disk = _dir_mb(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "config": config if nproc == 1 else f"{config} x{nproc}",
        "peak_mb": max(r["peak_mb"] for r in rows),
        "delta_mb": max(r["peak_mb"] - r["rss_before_mb"] for r in rows),
        "cache_s": max(r["cache_s"] for r in rows),
        "attribute_s": max(r["attribute_s"] for r in rows),
        "disk_mb": disk,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="memory", help=argparse.SUPPRESS)
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    p.add_argument("--n-train", type=int, default=200_000)
    p.add_argument("--n-test", type=int, default=2_000)
    p.add_argument("--proj-dim", type=int, default=1024)
    p.add_argument("--max-memory", default="512MB", help="budget of the 'budget' runs")
    p.add_argument("--quick", action="store_true", help="20k x 500, proj_dim 256")
    p.add_argument("--tmp", default=None, help="folder for stores and score files")
    p.add_argument("--only", default=None, help="comma-separated subset of configs")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.n_train, args.n_test, args.proj_dim = 20_000, 500, 256
    configs = [("memory", 1), ("budget", 1), ("budget", 2)]
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if f"{c[0]}x{c[1]}" in keep or c[0] in keep]
    print(
        f"TRAK, {args.n_train} train x {args.n_test} test, MLP 32-64-10, proj_dim "
        f"{args.proj_dim}, max_memory {args.max_memory}, OMP_NUM_THREADS=1 per process; "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )
    header = (
        "| config | peak RSS MB | peak - RSS before cache MB | cache s | train samples/s "
        "| attribute s | M pairs/s | disk MB |"
    )
    print(header)
    print("|" + "---|" * 8)
    for config, nproc in configs:
        r = run_config(config, args, nproc)
        pairs = args.n_train * args.n_test / 1e6
        print(
            f"| {r['config']} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} | {r['cache_s']:.1f} "
            f"| {args.n_train / r['cache_s']:.0f} | {r['attribute_s']:.1f} "
            f"| {pairs / r['attribute_s']:.1f} | {r['disk_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
