"""Time LDS ground-truth retraining: vectorised vs sequential (same semantics) vs retrain_lds.

Digits (sklearn, 1000 train / 200 test), 100 subsets of 50 %, L2-regularised
logistic regression and a 64-64-10 MLP trained with SGD + momentum. Reports
wall time for training all subset models (and writing them in the LDS layout),
the largest parameter difference between the vectorised and the sequential
models, and the test accuracy of a full-data model (sanity check of training).

Run: python benchmarks/bench_retrain.py [--device cuda] [--threads 1] [--subsets 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.metric import calculate_lds_ground_truth
from dattri.model_util import (
    SubsetTrainConfig,
    retrain_lds,
    retrain_lds_vectorized,
    train_subset_models,
)


def logreg() -> nn.Module:
    return nn.Linear(64, 10)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


CONFIGS = {
    "logreg": (logreg, dict(epochs=40, lr=0.2, momentum=0.9, weight_decay=1e-3, batch_size=100)),
    "mlp-64-64": (mlp, dict(epochs=40, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=100)),
}


def data():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return (x[:1000], y[:1000]), (x[1000:1200], y[1000:1200])


def make_train_func(factory, cfg: SubsetTrainConfig):
    """Plain DataLoader training loop (what a user would pass to retrain_lds)."""

    def train_func(loader, seed=0):
        torch.manual_seed(seed)
        model = factory().to(cfg.device)
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for _ in range(cfg.epochs):
            for xb, yb in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb.to(cfg.device)), yb.to(cfg.device)).backward()
                opt.step()
        return model

    return train_func


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--skip-dataloader", action="store_true", help="skip the retrain_lds column")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (x, y), (xt, yt) = data()
    n = x.shape[0]
    rows = []
    # warm-up (first vmap call imports torch._dynamo etc.)
    train_subset_models(
        logreg,
        (x, y),
        torch.ones(2, n),
        SubsetTrainConfig(epochs=1, device=args.device),
        verbose=False,
    )
    for name, (factory, kw) in CONFIGS.items():
        cfg = SubsetTrainConfig(**kw, device=args.device)
        with tempfile.TemporaryDirectory() as td:
            td = Path(td)
            sync(args.device)
            t0 = time.perf_counter()
            retrain_lds_vectorized(
                factory,
                (x, y),
                td / "vec",
                num_subsets=args.subsets,
                seed=0,
                config=cfg,
                verbose=False,
            )
            sync(args.device)
            t_vec = time.perf_counter() - t0
            t0 = time.perf_counter()
            retrain_lds_vectorized(
                factory,
                (x, y),
                td / "seq",
                num_subsets=args.subsets,
                seed=0,
                config=cfg,
                vectorized=False,
                verbose=False,
            )
            sync(args.device)
            t_seq = time.perf_counter() - t0
            t_dl = float("nan")
            if not args.skip_dataloader:
                loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size)
                t0 = time.perf_counter()
                retrain_lds(
                    make_train_func(factory, cfg),
                    loader,
                    td / "dl",
                    num_subsets=args.subsets,
                    seed=0,
                    verbose=False,
                )
                sync(args.device)
                t_dl = time.perf_counter() - t0

            def target(ckpt, loader, factory=factory):
                model = factory()
                model.load_state_dict(torch.load(ckpt, weights_only=True))
                with torch.no_grad():
                    return nn.functional.cross_entropy(
                        model(loader[0]), loader[1], reduction="none"
                    )

            gv, _ = calculate_lds_ground_truth(target, td / "vec", (xt, yt))
            gs, _ = calculate_lds_ground_truth(target, td / "seq", (xt, yt))
            max_gt_diff = (gv - gs).abs().max().item()
            max_param_diff = 0.0
            for i in range(args.subsets):
                sv = torch.load(td / "vec" / str(i) / "model_weights_0.pt", weights_only=True)
                ss = torch.load(td / "seq" / str(i) / "model_weights_0.pt", weights_only=True)
                diff = max((sv[k] - ss[k]).abs().max().item() for k in sv)
                max_param_diff = max(max_param_diff, diff)
        (full,) = train_subset_models(factory, (x, y), torch.ones(1, n), cfg, verbose=False)
        model = factory()
        model.load_state_dict(full)
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
            train_loss = nn.functional.cross_entropy(model(x), y).item()
        rows.append((name, t_vec, t_seq, t_dl, max_param_diff, max_gt_diff, acc, train_loss))

    print(
        f"\nLDS ground truth, digits n_train={n}, {args.subsets} subsets x 50 %, "
        f"device={args.device}, torch threads={torch.get_num_threads()}, "
        f"{CONFIGS['logreg'][1]['epochs']} epochs, batch 100"
    )
    hdr = (
        f"{'model':<10} {'vectorised s':>12} {'sequential s':>12} {'retrain_lds s':>13} "
        f"{'speed-up':>9} {'max|dθ|':>9} {'max|dGT|':>9} {'test acc':>8} {'train CE':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, tv, ts, td_, dp, dg, acc, tl in rows:
        print(
            f"{name:<10} {tv:>12.2f} {ts:>12.2f} {td_:>13.2f} {ts / tv:>8.1f}x "
            f"{dp:>9.1e} {dg:>9.1e} {acc:>8.3f} {tl:>8.3f}"
        )


if __name__ == "__main__":
    main()
