"""Benchmark the IHVP solvers of dattri.func.hessian (run by hand, prints a markdown table).

Model: MLP 64-128-10 (9,610 parameters, float32) briefly trained on sklearn digits (or
random digits-like data with --random-data). 256 right-hand sides (random test-like
vectors). For each solver we time

* build: the ``ihvp_at_x_*`` constructor (Hessian + factorisation for explicit, Krylov
  basis for Arnoldi; nothing for CG/LiSSA),
* batched: one call on the ``(k, p)`` matrix of right-hand sides,
* loop: the naive alternative, one call per vector (for the slow iterative solvers only
  ``--loop-subset`` vectors are timed and the time is extrapolated to k, marked "*"),

and the relative error ``||X - X_explicit|| / ||X_explicit||`` against the explicit solve.

    python benchmarks/bench_ihvp.py [--n-rhs 256] [--n-train 512] [--device cpu]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from dattri.func.hessian import (
    hvp_at_x,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
)

SIZES = (64, 128, 10)


def unflatten(theta):
    d_in, d_h, d_out = SIZES
    i = 0
    W1 = theta[i : i + d_h * d_in].reshape(d_h, d_in)
    i += d_h * d_in
    b1 = theta[i : i + d_h]
    i += d_h
    W2 = theta[i : i + d_out * d_h].reshape(d_out, d_h)
    i += d_out * d_h
    return W1, b1, W2, theta[i:]


def loss_fn(theta, X, y):
    W1, b1, W2, b2 = unflatten(theta)
    return F.cross_entropy(torch.relu(X @ W1.T + b1) @ W2.T + b2, y)


def make_problem(n_train, random_data, device):
    g = torch.Generator().manual_seed(0)
    if random_data:
        X = torch.rand(n_train, 64, generator=g)
        y = torch.randint(0, 10, (n_train,), generator=g)
    else:
        from sklearn.datasets import load_digits

        Xn, yn = load_digits(return_X_y=True)
        X = torch.tensor(Xn[:n_train] / 16.0, dtype=torch.float32)
        y = torch.tensor(yn[:n_train])
    d_in, d_h, d_out = SIZES
    p = d_h * d_in + d_h + d_out * d_h + d_out
    theta = (0.1 * torch.randn(p, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(theta, X, y)
        loss.backward()
        opt.step()
    return theta.detach().to(device), X.to(device), y.to(device), float(loss.detach())


def top_eig(theta, X, y, iters=30):
    f = hvp_at_x(loss_fn, (theta, X, y))
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1)).to(theta)
    for _ in range(iters):
        v = f(v)
        lam = float(v.norm())
        v = v / lam
    return lam


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-rhs", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--loop-subset", type=int, default=16)
    ap.add_argument("--random-data", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    theta, X, y, loss = make_problem(args.n_train, args.random_data, args.device)
    p = theta.numel()
    lam_max = top_eig(theta, X, y)
    reg = 0.05 * lam_max
    V = torch.randn(args.n_rhs, p, generator=torch.Generator().manual_seed(2)).to(theta)
    print(
        f"MLP {SIZES}, p={p}, n_train={args.n_train}, train loss {loss:.3f}, "
        f"lambda_max(H)={lam_max:.3g}, regularization={reg:.3g}, k={args.n_rhs}, "
        f"threads={torch.get_num_threads()}, device={args.device}\n"
    )
    x = (theta, X, y)
    solvers = {
        "explicit": lambda: ihvp_at_x_explicit(loss_fn, *x, regularization=reg),
        "cg (max_iter=100, tol=1e-4)": lambda: ihvp_at_x_cg(
            loss_fn, *x, max_iter=100, tol=1e-4, regularization=reg
        ),
        "lissa (bs=256, depth=150, s=2*lmax)": lambda: ihvp_at_x_lissa(
            loss_fn,
            *x,
            batch_size=256,
            recursion_depth=150,
            scaling=2 * lam_max,
            damping=reg / (2 * lam_max),
            verbose=False,
        ),
        "arnoldi (max_iter=200, top_k=200)": lambda: ihvp_at_x_arnoldi(
            loss_fn, *x, max_iter=200, top_k=200, regularization=reg
        ),
    }
    rows, ref = [], None
    for name, build in solvers.items():
        f, t_build = timed(build)
        out, t_batch = timed(lambda f=f: f(V))
        if ref is None:
            ref = out
        n_loop = (
            args.n_rhs if name == "explicit" or name.startswith("arnoldi") else args.loop_subset
        )
        looped, t_loop = timed(lambda f=f, n=n_loop: torch.stack([f(v) for v in V[:n]]))
        t_loop *= args.n_rhs / n_loop
        err = float((out - ref).norm() / ref.norm())
        err_loop = float((looped - out[:n_loop]).norm() / out[:n_loop].norm())
        extra = ""
        if hasattr(f, "info") and f.info is not None:
            extra = f" (iters {f.info.iterations}, max res {float(f.info.residuals.max()):.1e})"
        star = "*" if n_loop < args.n_rhs else ""
        rows.append(
            f"| {name}{extra} | {t_build:.2f} | {t_batch:.2f} | {t_loop:.2f}{star} | "
            f"{t_loop / max(t_batch, 1e-9):.1f}x | {err:.2e} | {err_loop:.1e} |"
        )
    print(
        "| solver | build s | batched s | per-vector loop s | loop/batched "
        "| rel. err vs explicit | batched vs loop |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n* loop time extrapolated from --loop-subset vectors.")


if __name__ == "__main__":
    main()
