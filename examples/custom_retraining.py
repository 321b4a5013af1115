"""LDS ground truth with your own training function, then score attributors against it.

``dattri.model_util.retrain_lds`` calls *your* ``train_func(loader, seed=...)`` on random
half subsets of the training set and saves each model's state_dict;
``dattri.metric.calculate_lds_ground_truth`` evaluates *your* ``target_func(ckpt_path,
test_loader)`` on every saved model; ``dattri.metric.lds`` compares attribution scores
with that ground truth (Spearman correlation per test sample).

Here the model is a small MLP trained with Adam and minibatches (any training code
works), and the retraining is split into two "jobs" with ``start_id`` /
``total_num_subsets``, as you would spread it over machines.

    python examples/custom_retraining.py                       # ~1 min on 2 CPU cores
    python examples/custom_retraining.py --quick               # a few seconds
    python examples/custom_retraining.py --retrain-dir runs/   # keep (and resume) the models
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from _common import device_from, digits, loader, loss_if, loss_sample, parser
from torch import nn
from torch.utils.data import DataLoader

from dattri.algorithm import IFAttributorExplicit, TracInAttributor
from dattri.metric import calculate_lds_ground_truth, lds
from dattri.model_util import retrain_lds
from dattri.params.projection import TracInProjectionParams
from dattri.task import AttributionTask

DAMPING = 0.05  # the MLP's Hessian is indefinite: damp it (see the method-choice guide)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def make_train_func(epochs: int, device: torch.device) -> Callable[..., nn.Module]:
    """Your training code: Adam, minibatches from the loader ``retrain_lds`` builds."""

    def train_func(data: DataLoader, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)  # initialisation and shuffling depend on the run seed
        model = make_model().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(epochs):
            for xb, yb in data:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
                opt.step()
        return model.eval()

    return train_func


def make_target_func(device: torch.device) -> Callable[[str, DataLoader], torch.Tensor]:
    """Your target: per-sample test loss of the model saved at ``ckpt_path``, ``(n_test,)``."""

    def target_func(ckpt_path: str, test_loader: DataLoader) -> torch.Tensor:
        model = make_model().to(device)
        model.load_state_dict(torch.load(ckpt_path, map_location=device, weights_only=True))
        model.eval()
        with torch.no_grad():
            return torch.cat(
                [
                    nn.functional.cross_entropy(
                        model(xb.to(device)), yb.to(device), reduction="none"
                    )
                    for xb, yb in test_loader
                ]
            ).cpu()

    return target_func


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--retrain-dir", type=Path, default=None, help="default: a temporary folder")
    args = p.parse_args()
    device = device_from(args.device)
    n_train, n_test, n_subsets, epochs = (100, 20, 8, 15) if args.quick else (400, 100, 40, 30)

    x, y, x_test, y_test = digits(n_train, n_test, seed=args.seed)
    train, test = loader(x, y, batch_size=32), loader(x_test, y_test)
    train_func = make_train_func(epochs, device)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.retrain_dir or Path(tmp) / "lds"
        half = n_subsets // 2
        for start in (0, half):  # two jobs; the one that finishes last writes metadata.yml
            retrain_lds(
                train_func,
                train,
                path,
                num_subsets=half,
                subset_ratio=0.5,
                start_id=start,
                total_num_subsets=n_subsets,
                seed=args.seed,
                verbose=not args.quick,
            )
        ground_truth = calculate_lds_ground_truth(make_target_func(device), path, test)
    values, indices = ground_truth
    print(f"ground truth: {tuple(values.shape)} targets, {tuple(indices.shape)} subset indices")

    model = train_func(train, seed=args.seed)  # the model we explain
    ckpt = model.state_dict()
    task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=ckpt)
    inf = IFAttributorExplicit(task, regularization=DAMPING, device=device, verbose=False)
    inf.cache(train)
    n_params = sum(t.numel() for t in model.parameters())
    dot = TracInAttributor(
        AttributionTask(loss_func=loss_sample(model), model=model, checkpoints=ckpt),
        weight_list=[1.0],
        normalized_grad=False,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=n_params),
        device=device,
        verbose=False,
    )
    gen = torch.Generator().manual_seed(args.seed)
    scores = {
        "IF (explicit)": inf.attribute(train, test),
        "Grad-Dot": dot.attribute(train, test),
        "random": torch.randn(n_train, n_test, generator=gen),
    }
    print(f"{'method':14s} {'LDS':>6s}  95% CI")
    for name, s in scores.items():
        _, _, ci = lds(s.cpu().double(), ground_truth, ci=0.95)
        print(f"{name:14s} {ci.mean:6.3f}  [{ci.low:.3f}, {ci.high:.3f}]")


if __name__ == "__main__":
    main()
