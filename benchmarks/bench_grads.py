"""Per-sample gradients + projection vs one training epoch (run by hand).

Usage::

    python benchmarks/bench_grads.py                     # MLP and ResNet-9, CPU
    python benchmarks/bench_grads.py --models mlp --n 512
    python benchmarks/bench_grads.py --device cuda --n 512

For each model, on ``n`` random samples in batches of ``--batch``:

- ``train epoch``: one SGD epoch (forward, backward, step) over the same samples;
- ``grads vmap`` / ``grads auto``: :func:`per_sample_grad` with ``route="vmap"`` and
  ``route="auto"`` (layer hooks; BatchNorm via per-sample copies in the same pass);
- ``+ proj``: the same gradients projected to ``k`` dims with
  ``dattri.func.projection`` (timed separately and added; skipped if the module is
  missing or ``--no-full-proj``);
- ``LoGra kron``: :func:`per_sample_kron_projected` on every Linear/Conv2d layer,
  ``k_in x k_out`` per layer with the per-layer dims summing to about ``k``; the
  full per-sample gradient is never formed.

Prints a markdown table; ``x epoch`` is time / train-epoch time.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dattri.func.per_sample_grad import per_sample_grad, per_sample_kron_projected


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _resnet9(num_classes=10):
    try:
        from dattri.benchmark.models import ResNet9
    except ImportError:  # standalone fallback
        return _LocalResNet9(num_classes)
    return ResNet9(num_classes=num_classes)


class _LocalResNet9(nn.Module):
    def __init__(self, num_classes):
        super().__init__()

        def block(i, o, s=1):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.net = nn.Sequential(
            block(3, 64),
            block(64, 128),
            block(128, 128),
            block(128, 256, 2),
            block(256, 512, 2),
            block(512, 512),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.net(x)


def make_case(name, n, gen):
    if name == "mlp":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        x = torch.randn(n, 1, 28, 28, generator=gen)
    else:
        model = _resnet9(10)
        x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return model, x, y


def train_epoch(model, x, y, batch):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for s in range(0, len(x), batch):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[s : s + batch]), y[s : s + batch]).backward()
        opt.step()


def kron_dims(model, k):
    """Per-layer (k_in, d_in, k_out, d_out) with sum(k_in * k_out) close to k."""
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


def full_projector(example, k, proj_type, device):
    """Return ``project(grads) -> (B, k)`` from dattri.func.projection, or None."""
    try:
        from dattri.func import projection
    except ImportError:
        return None
    if hasattr(projection, "make_random_projector"):
        proj = projection.make_random_projector(
            param_shape_list=[example.shape[1]],
            feature_batch_size=example.shape[0],
            proj_dim=k,
            proj_max_batch_size=example.shape[0],
            device=device,
            proj_seed=0,
            proj_type=proj_type,
            dtype=example.dtype,
        )
        return lambda g: proj.project(g, ensemble_id=0)
    return None


def run_case(name, args, device):
    gen = torch.Generator().manual_seed(0)
    model, x, y = make_case(name, args.n, gen)
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    p_total = sum(p.numel() for p in model.parameters())
    rows = []

    # warm-up + train epoch
    train_epoch(model, x[: args.batch], y[: args.batch], args.batch)
    _sync(device)
    t = time.perf_counter()
    train_epoch(model, x, y, args.batch)
    _sync(device)
    t_epoch = time.perf_counter() - t
    rows.append((f"train epoch (SGD, batch {args.batch})", t_epoch))

    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, sample):
        xs, ys = sample
        out = functional_call(model, p, (xs.unsqueeze(0),))
        return F.cross_entropy(out, ys.unsqueeze(0))

    batches = [(x[s : s + args.batch], y[s : s + args.batch]) for s in range(0, args.n, args.batch)]
    proj = None
    if args.full_proj:  # build the projector once; first call generates its matrix
        _sync(device)
        t = time.perf_counter()
        example = torch.zeros(args.batch, p_total, device=device)
        proj = full_projector(example, args.k, args.proj_type, device)
        if proj is not None:
            proj(example)
        _sync(device)
        del example
        if proj is not None:
            rows.append(
                (f"projector setup ({args.proj_type}, k={args.k})", time.perf_counter() - t)
            )
        else:
            rows.append(("projector (dattri.func.projection n/a)", float("nan")))
    for route in args.routes:
        if route == "vmap" and name == "resnet9" and not args.vmap_resnet:
            continue
        t_grad = t_proj = 0.0
        per_sample_grad(model, loss, params, batches[0], route=route, chunk_size=args.chunk)
        for xb, yb in batches:
            _sync(device)
            t = time.perf_counter()
            g = per_sample_grad(model, loss, params, (xb, yb), route=route, chunk_size=args.chunk)
            _sync(device)
            t_grad += time.perf_counter() - t
            if proj is not None:
                t = time.perf_counter()
                proj(g)
                _sync(device)
                t_proj += time.perf_counter() - t
            del g
        rows.append((f"grads {route}", t_grad))
        if proj is not None:
            rows.append((f"grads {route} + proj {args.proj_type} k={args.k}", t_grad + t_proj))

    dims = kron_dims(model, args.k)
    pg = torch.Generator(device=device).manual_seed(1)
    p_in = {
        n: torch.randn(ki, di, generator=pg, device=device) for n, (ki, di, _, _) in dims.items()
    }
    p_out = {
        n: torch.randn(ko, do, generator=pg, device=device) for n, (_, _, ko, do) in dims.items()
    }
    k_tot = sum(ki * ko for ki, _, ko, _ in dims.values())
    per_sample_kron_projected(model, loss, params, batches[0], list(dims), p_in, p_out)
    _sync(device)
    t = time.perf_counter()
    for b in batches:
        per_sample_kron_projected(
            model, loss, params, b, list(dims), p_in, p_out, chunk_size=args.chunk
        )
    _sync(device)
    rows.append((f"LoGra kron ({len(dims)} layers, k={k_tot})", time.perf_counter() - t))
    return p_total, t_epoch, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,resnet9")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=None, help="chunk_size")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--routes", default="vmap,auto")
    ap.add_argument("--proj-type", default="normal")
    ap.add_argument("--no-full-proj", dest="full_proj", action="store_false")
    ap.add_argument("--vmap-resnet", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.routes = args.routes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}"
        f" n={args.n} batch={args.batch}\n"
    )
    print("| model | p | method | time (s) | x epoch |")
    print("|---|---:|---|---:|---:|")
    for name in args.models.split(","):
        p_total, t_epoch, rows = run_case(name, args, device)
        for label, sec in rows:
            print(
                f"| {name} | {p_total:,} | {label} | {sec:.3f} | {sec / t_epoch:.2f} |", flush=True
            )


if __name__ == "__main__":
    main()
