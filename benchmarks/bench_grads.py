"""Per-sample gradients + projection to ``k`` dims vs one training epoch (run by hand).

Usage::

    PYTHONPATH=. python benchmarks/bench_grads.py                 # MLP and ResNet-9, CPU
    PYTHONPATH=. python benchmarks/bench_grads.py --models mlp --n 2048
    PYTHONPATH=. python benchmarks/bench_grads.py --dense         # + dense normal projection
    PYTHONPATH=. python benchmarks/bench_grads.py --device cuda --threads 0

For each model, on ``n`` random samples (CIFAR-shaped for ResNet-9, MNIST-shaped for
the MLP) in batches of ``--batch`` (64):

- ``train epoch``: one plain SGD epoch (forward, backward, step) over the same samples;
- ``grads vmap`` / ``grads auto``: :func:`per_sample_grad` with ``route="vmap"`` and
  ``route="auto"`` (layer hooks; BatchNorm via per-sample copies in the same pass);
- ``grads auto + sjlt`` (and ``+ normal`` with ``--dense``): the gradients projected
  to ``k`` dims by :func:`dattri.func.projection.make_random_projector` (the projector
  is built and its randomness generated once, before timing);
- ``LoGra kron``: :func:`per_sample_kron_projected` on every Linear/Conv2d layer,
  ``k_in x k_out`` per layer with the per-layer dims summing to about ``k``; the full
  per-sample gradient is never formed.

Timing: ONE torch thread by default (``--threads``). The box may be shared, so every
method is timed ``--reps`` times, each repetition right after a training epoch
(alternating), and the table gives the minimum process CPU time (user + system,
robust to other jobs) and the minimum wall time; ``x epoch`` is CPU time over the
minimum epoch CPU time. The 1-minute load average is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dattri.func.per_sample_grad import per_sample_grad, per_sample_kron_projected
from dattri.func.projection import make_random_projector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_case(
    name: str, n: int, gen: torch.Generator
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model and random data: ``mlp`` (784-128-128-10) or ``resnet9`` (10 classes)."""
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        x = torch.randn(n, 1, 28, 28, generator=gen)
    elif name == "resnet9":
        from dattri.benchmark.models import ResNet9

        model = ResNet9(num_classes=10)
        x = torch.randn(n, 3, 32, 32, generator=gen)
    else:
        msg = f"unknown model {name!r} (mlp, resnet9)"
        raise ValueError(msg)
    y = torch.randint(0, 10, (n,), generator=gen)
    return model, x, y


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    """One SGD epoch (momentum 0.9) over ``x`` in batches; weights restored after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for s in range(0, len(x), batch):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[s : s + batch]), y[s : s + batch]).backward()
        opt.step()
    model.load_state_dict(state)
    model.eval()


def kron_dims(model: nn.Module, k: int) -> dict[str, tuple[int, int, int, int]]:
    """Per-layer ``(k_in, d_in, k_out, d_out)`` with ``sum(k_in * k_out)`` close to ``k``."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    layers.sort(key=lambda nm: nm[1].weight.shape[0])  # small layers first
    dims, left = {}, k
    for i, (n, m) in enumerate(layers):
        per = max(1, left // (len(layers) - i))
        d_out = m.weight.shape[0]
        d_in = m.weight[0].numel() + (m.bias is not None)
        k_out = min(d_out, max(1, math.isqrt(per)))
        k_in = min(d_in, max(1, per // k_out))
        dims[n] = (k_in, d_in, k_out, d_out)
        left -= k_in * k_out
    return dims


def _clock(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(cpu_s, wall_s)`` of one call."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.process_time() - c0, time.perf_counter() - t0


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> tuple[int, list]:
    gen = torch.Generator().manual_seed(0)
    n = args.n or (1024 if name == "mlp" else 128)
    model, x, y = make_case(name, n, gen)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    p_total = sum(p.numel() for p in model.parameters())
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, sample: tuple) -> torch.Tensor:
        xs, ys = sample
        out = functional_call(model, p, (xs.unsqueeze(0),))
        return F.cross_entropy(out, ys.unsqueeze(0))

    batches = [(x[s : s + args.batch], y[s : s + args.batch]) for s in range(0, n, args.batch)]
    projectors = {}
    for ptype in ["sjlt"] + (["normal"] if args.dense else []):
        proj = make_random_projector(
            [p_total], args.batch, args.k, args.batch, device, proj_seed=0, proj_type=ptype
        )
        setup = _clock(
            lambda proj=proj: proj.project(torch.zeros(1, p_total, device=device)), device
        )
        projectors[ptype] = (proj, setup)

    def grads(route: str, ptype: str | None = None) -> Callable[[], None]:
        def fn() -> None:
            for b in batches:
                g = per_sample_grad(model, loss, params, b, route=route, chunk_size=args.chunk)
                if ptype is not None:
                    projectors[ptype][0].project(g, 0)
                del g

        return fn

    dims = kron_dims(model, args.k)
    pg = torch.Generator(device=device).manual_seed(1)
    p_in = {
        m: torch.randn(ki, di, generator=pg, device=device) for m, (ki, di, _, _) in dims.items()
    }
    p_out = {
        m: torch.randn(ko, do, generator=pg, device=device) for m, (_, _, ko, do) in dims.items()
    }
    k_tot = sum(ki * ko for ki, _, ko, _ in dims.values())

    def kron() -> None:
        for b in batches:
            per_sample_kron_projected(
                model, loss, params, b, list(dims), p_in, p_out, chunk_size=args.chunk
            )

    methods: list[tuple[str, Callable[[], None]]] = []
    for route in args.routes.split(","):
        if route == "vmap" and name == "resnet9" and not args.vmap_resnet:
            continue
        methods.append((f"grads {route}", grads(route)))
    methods.append((f"grads auto + sjlt k={args.k}", grads("auto", "sjlt")))
    if args.dense:
        methods.append((f"grads auto + normal k={args.k}", grads("auto", "normal")))
    methods.append((f"LoGra kron ({len(dims)} layers, k={k_tot})", kron))

    # warm-up (probe caches, allocator, first-call costs), then alternate with epochs
    train_epoch(model, x[: args.batch], y[: args.batch], args.batch)
    for _, fn in methods:
        fn()
    epochs: list[tuple[float, float]] = []
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in methods}
    for _ in range(args.reps):
        for label, fn in methods:
            epochs.append(_clock(lambda: train_epoch(model, x, y, args.batch), device))
            times[label].append(_clock(fn, device))
    ep_cpu = min(c for c, _ in epochs)
    ep_wall = min(w for _, w in epochs)
    rows = [(f"train epoch (SGD, batch {args.batch})", ep_cpu, ep_wall, 1.0)]
    for ptype, (_, (c, w)) in projectors.items():
        rows.append((f"  (one-off projector setup {ptype}, k={args.k})", c, w, c / ep_cpu))
    for label, ts in times.items():
        c, w = min(t[0] for t in ts), min(t[1] for t in ts)
        rows.append((label, c, w, c / ep_cpu))
    return p_total, n, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,resnet9")
    ap.add_argument("--n", type=int, default=0, help="samples (default: mlp 1024, resnet9 128)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None, help="chunk_size")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--routes", default="vmap,auto")
    ap.add_argument("--dense", action="store_true", help="also time dense normal projection")
    ap.add_argument("--vmap-resnet", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"batch={args.batch} reps={args.reps} load={os.getloadavg()[0]:.1f}\n"
    )
    print("| model | p | n | method | CPU s | wall s | x epoch (CPU) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name in args.models.split(","):
        p_total, n, rows = run_case(name, args, device)
        for label, cpu, wall, ratio in rows:
            print(
                f"| {name} | {p_total:,} | {n} | {label} | {cpu:.3f} | {wall:.3f} | {ratio:.2f} |",
                flush=True,
            )
    print(f"\nload at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
