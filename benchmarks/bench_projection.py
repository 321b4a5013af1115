"""Benchmark: random projection of a (B, p) batch to k dimensions, every type.

Compares :mod:`dattri.func.projection` against an upstream-style baseline that
regenerates a dense N(0, 1) matrix in blocks of 100 columns (``torch.manual_seed``
per block) on every call and computes ``X @ P / sqrt(k)``.

Reported per (type, k): time of the first call (includes generating/caching the
random matrix), steady-state time per sample (process CPU time on CPU, so use ``--threads 1``;
wall time on CUDA), speed-up over the baseline, the
mean relative error of pairwise distances within the batch (accuracy), and the
cache size. Run by hand, e.g.::

    python benchmarks/bench_projection.py --device cpu --threads 1
    python benchmarks/bench_projection.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dattri.func.projection import DEFAULT_MAX_MEMORY_BYTES, make_random_projector

TYPES = ["normal", "rademacher", "sjlt", "grass", "random_mask", "identity"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def baseline_project(x: torch.Tensor, k: int, seed: int, block: int = 100) -> torch.Tensor:
    """Upstream-style dense projection: blocks regenerated on every call."""
    out = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    for b, start in enumerate(range(0, k, block)):
        stop = min(k, start + block)
        torch.manual_seed(seed + 1000 * b)
        mat = torch.randn(x.shape[1], stop - start, dtype=x.dtype, device=x.device)
        out[:, start:stop] = x @ mat
    return out / math.sqrt(k)


def dist_error(y: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Mean relative error of pairwise distances, raw and after one global rescale.

    The second number ignores a common scale factor (``random_mask`` and the
    mask stage of ``grass`` are not rescaled, as upstream).
    """
    dx = torch.cdist(x.double(), x.double())
    dy = torch.cdist(y.double(), y.double())
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    ratio = dy[off] / dx[off]
    raw = (ratio - 1).abs().mean().item()
    scale_free = (ratio / ratio.mean() - 1).abs().mean().item()
    return raw, scale_free


def time_calls(fn, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for ``fn`` over the batches: process CPU time on CPU (robust to other
    jobs on a shared box; with one torch thread it equals the busy time), wall time
    on CUDA."""
    _sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    for xb in batches:
        fn(xb)
    _sync(device)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per type")
    parser.add_argument("--baseline-batches", type=int, default=1)
    parser.add_argument("--ks", default="512,2048")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=DEFAULT_MAX_MEMORY_BYTES / 2**30,
        help="projector cache budget (default: the library default)",
    )
    parser.add_argument(
        "--big-cache-gib",
        type=float,
        default=0.0,
        help="if > 0, also time dense types with this cache budget",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    p, bsz = args.dim, args.batch
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(bsz, p, generator=gen).to(device) for _ in range(max(args.batches, 1))]
    print(
        f"device={device} threads={torch.get_num_threads()} p={p} batch={bsz} "
        f"timed batches={args.batches} cache budget={args.max_memory_gib:g} GiB\n"
    )
    rows = []
    for k in [int(v) for v in args.ks.split(",")]:
        base_batches = batches[: max(args.baseline_batches, 1)]
        t_base = time_calls(lambda xb, k=k: baseline_project(xb, k, 0), base_batches, device)
        base_ps = t_base / (len(base_batches) * bsz)
        base_err = dist_error(baseline_project(batches[0], k, 0), batches[0])
        rows.append(("baseline normal", k, float("nan"), base_ps, 1.0, *base_err, 0.0))
        configs = [(t, args.max_memory_gib) for t in args.types.split(",")]
        if args.big_cache_gib > 0:
            configs += [
                (t, args.big_cache_gib)
                for t in ("normal", "rademacher")
                if t in args.types.split(",")
            ]
        for ptype, budget in configs:
            proj = make_random_projector(
                [p],
                bsz,
                k,
                bsz,
                device,
                proj_seed=0,
                proj_type=ptype,
                max_memory_bytes=int(budget * 2**30),
            )
            t_first = time_calls(lambda xb, proj=proj: proj.project(xb, 0), batches[:1], device)
            t = time_calls(lambda xb, proj=proj: proj.project(xb, 0), batches, device)
            per_sample = t / (len(batches) * bsz)
            err = dist_error(proj.project(batches[0], 0), batches[0])
            label = ptype if budget == args.max_memory_gib else f"{ptype} ({budget:g} GiB cache)"
            cached = proj.engine.cached_bytes() / 2**20
            rows.append((label, k, t_first, per_sample, base_ps / per_sample, *err, cached))
            proj.free_memory()
            del proj
    header = [
        "type",
        "k",
        "first call (s)",
        "per sample (ms)",
        "speed-up",
        "dist. err",
        "scale-free err",
        "cache MiB",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, k, first, per, speed, err, err_sf, cached in rows:
        cells = [
            label,
            str(k),
            "-" if math.isnan(first) else f"{first:.2f}",
            f"{per * 1e3:.3f}",
            f"{speed:.1f}x",
            f"{err:.4f}",
            f"{err_sf:.4f}",
            f"{cached:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
