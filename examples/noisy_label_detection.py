"""Find mislabeled training samples by their self-influence.

Flip 10% of the training labels of scikit-learn's digits, train a logistic regression
with SGD (keeping a few checkpoints along the way), score every training sample against
itself with three attributors and measure how well each ranking finds the flipped
labels (ROC AUC, and the fraction found after inspecting the top 20% of the ranking):

* influence function, explicit Hessian: ``g_i^T (H + lambda I)^-1 g_i``;
* TracInCP over the SGD checkpoints: ``sum_k lr * ||g_i,k||^2``;
* TRAK: the kernel-weighted squared gradient of the margin.

The per-sample training loss is printed as a baseline.

    python examples/noisy_label_detection.py            # ~20 s on 2 CPU cores
    python examples/noisy_label_detection.py --quick    # a few seconds
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from _common import (
    WEIGHT_DECAY,
    device_from,
    digits,
    loader,
    loss_if,
    loss_sample,
    margin_sample,
    parser,
    prob_sample,
)
from torch import nn

from dattri.algorithm import IFAttributorExplicit, TracInAttributor, TRAKAttributor
from dattri.benchmark import flip_label
from dattri.benchmark.models import create_lr_model, train_classifier
from dattri.metric import mislabel_detection_auc
from dattri.params.projection import TracInProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask

LR = 0.05


def train_with_checkpoints(
    x: torch.Tensor, y: torch.Tensor, epochs: int, n_ckpt: int, device: torch.device, seed: int
) -> tuple[nn.Module, list[dict]]:
    """SGD on a logistic regression; returns the final model and ``n_ckpt`` state_dicts."""
    torch.manual_seed(seed)
    model = create_lr_model("digits").to(device)
    ckpts = []
    for _ in range(n_ckpt):
        train_classifier(
            model,
            loader(x, y, batch_size=32),
            epochs=epochs // n_ckpt,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            momentum=0.9,
            seed=seed + len(ckpts),
            device=device,
            verbose=False,
        )
        ckpts.append(copy.deepcopy(model.state_dict()))
    return model, ckpts


def fraction_found(scores: torch.Tensor, noisy: torch.Tensor, budget: float = 0.2) -> float:
    """Fraction of the noisy samples among the top ``budget`` of the ranking."""
    k = int(budget * len(scores))
    top = torch.topk(scores, k).indices
    return float(noisy[top].sum() / noisy.sum())


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    device = device_from(args.device)
    n_train, epochs = (300, 20) if args.quick else (1000, 60)
    x, y_clean, _, _ = digits(n_train, 10, seed=args.seed)
    y, flipped = flip_label(y_clean, p=0.1, seed=args.seed)
    noisy = torch.zeros(n_train, dtype=torch.long)
    noisy[flipped] = 1
    print(f"{n_train} training samples, {len(flipped)} labels flipped")

    model, ckpts = train_with_checkpoints(x, y, epochs, 4, device, args.seed)
    train = loader(x, y)
    results: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], torch.Tensor]) -> None:
        t = time.perf_counter()
        results[name] = fn().detach().cpu().reshape(-1)
        timings[name] = time.perf_counter() - t

    # Influence function (the final model; damping = the training weight decay).
    def run_if() -> torch.Tensor:
        task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=ckpts[-1])
        attr = IFAttributorExplicit(task, regularization=WEIGHT_DECAY, device=device, verbose=False)
        attr.cache(train)
        return attr.self_attribute(train)

    # TracInCP: the checkpoints along the trajectory, each weighted by the learning rate.
    def run_tracin() -> torch.Tensor:
        task = AttributionTask(loss_func=loss_sample(model), model=model, checkpoints=ckpts)
        attr = TracInAttributor(
            task,
            weight_list=torch.full((len(ckpts),), LR),
            normalized_grad=False,
            proj_params=TracInProjectionParams(proj_type="identity", proj_dim=650),
            device=device,
            verbose=False,
        )
        return attr.self_attribute(train)

    # TRAK (one model; a projection to 256 dimensions).
    def run_trak() -> torch.Tensor:
        task = AttributionTask(loss_func=margin_sample(model), model=model, checkpoints=ckpts[-1])
        attr = TRAKAttributor(
            task,
            correct_probability_func=prob_sample(model),
            proj_params=TRAKProjectionParams(proj_dim=256),
            regularization=1e-3,
            device=device,
            verbose=False,
        )
        attr.cache(train)
        return attr.self_attribute()

    def run_loss() -> torch.Tensor:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x.to(device)), y.to(device), reduction="none")

    for name, fn in (
        ("IF (explicit)", run_if),
        ("TracInCP", run_tracin),
        ("TRAK", run_trak),
        ("training loss", run_loss),
    ):
        timed(name, fn)

    print(f"\n{'method':16s} {'AUC':>6s} {'found@20%':>10s} {'seconds':>8s}")
    for name, scores in results.items():
        auc, _ = mislabel_detection_auc(scores, noisy)
        print(
            f"{name:16s} {float(auc):6.3f} {fraction_found(scores, noisy):10.2f} "
            f"{timings[name]:8.2f}"
        )
    print("\n(AUC 0.5 = random ranking; found@20% of a random ranking is 0.20)")


if __name__ == "__main__":
    main()
