"""Data cleaning: drop the most harmful training samples, retrain, compare with random drops.

A logistic regression is trained on digits whose training labels are 10% corrupted.
Each training sample's total influence on a held-out *validation* set is computed with
an influence function and with Grad-Dot; the samples with the most negative total
(those that raise the validation loss the most) are removed, the model is retrained and
evaluated on a separate *test* set. Removing the same number of random samples is the
baseline. The attribution never sees the test set.

    python examples/data_cleaning.py            # ~30 s on 2 CPU cores
    python examples/data_cleaning.py --quick    # a few seconds
"""

from __future__ import annotations

import torch
from _common import (
    WEIGHT_DECAY,
    device_from,
    digits,
    evaluate,
    loader,
    loss_if,
    loss_sample,
    parser,
    train_lr,
)

from dattri.algorithm import IFAttributorExplicit, TracInAttributor
from dattri.benchmark import flip_label
from dattri.params.projection import TracInProjectionParams
from dattri.task import AttributionTask


def influence_on_validation(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Total helpfulness of each training sample for the validation set, ``(n_train,)``."""
    train, val = loader(x, y), loader(x_val, y_val)
    ckpt = model.state_dict()

    task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=ckpt)
    inf = IFAttributorExplicit(task, regularization=WEIGHT_DECAY, device=device, verbose=False)
    inf.cache(train)
    if_scores = inf.attribute(train, val)  # (n_train, n_val)

    task = AttributionTask(loss_func=loss_sample(model), model=model, checkpoints=ckpt)
    dot = TracInAttributor(
        task,
        weight_list=[1.0],
        normalized_grad=False,
        proj_params=TracInProjectionParams(proj_type="identity", proj_dim=650),
        device=device,
        verbose=False,
    )
    dot_scores = dot.attribute(train, val)
    return {"IF": if_scores.sum(1).cpu(), "Grad-Dot": dot_scores.sum(1).cpu()}


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    device = device_from(args.device)
    n_train, n_val, n_test = (300, 60, 200) if args.quick else (1000, 200, 500)
    fractions = (0.0, 0.05, 0.1) if args.quick else (0.0, 0.025, 0.05, 0.1, 0.15)
    n_random = 2 if args.quick else 5

    x_all, y_all, x_test, y_test = digits(n_train + n_val, n_test, seed=args.seed)
    x, y_clean, x_val, y_val = x_all[:n_train], y_all[:n_train], x_all[n_train:], y_all[n_train:]
    y, flipped = flip_label(y_clean, p=0.1, seed=args.seed)
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    print(f"{n_train} train ({len(flipped)} mislabeled) / {n_val} validation / {n_test} test")

    model = train_lr(x, y, device, seed=args.seed)
    totals = influence_on_validation(model, x, y, x_val, y_val, device)

    def retrain_without(removed: torch.Tensor) -> tuple[float, float]:
        keep = torch.ones(n_train, dtype=torch.bool)
        keep[removed] = False
        return evaluate(train_lr(x[keep], y[keep], device, seed=args.seed), x_test, y_test)

    gen = torch.Generator().manual_seed(args.seed)
    header = (
        f"{'removed':>8s} | "
        + " | ".join(f"{name + ' loss/acc':>18s}  flipped" for name in totals)
        + f" | {'random loss/acc':>18s}"
    )
    print(header)
    print("-" * len(header))
    for frac in fractions:
        k = int(frac * n_train)
        cells = []
        for scores in totals.values():
            removed = torch.argsort(scores)[:k]  # most harmful = most negative total
            loss, acc = retrain_without(removed)
            cells.append(f"{loss:9.4f} / {acc:6.3f}  {int(is_flipped[removed].sum()):7d}")
        rand = torch.tensor(
            [retrain_without(torch.randperm(n_train, generator=gen)[:k]) for _ in range(n_random)]
        ).mean(0)
        print(f"{k:8d} | " + " | ".join(cells) + f" | {rand[0]:9.4f} / {rand[1]:6.3f}")
    print(
        "\nloss/acc: test cross-entropy and accuracy after retraining without the removed "
        "samples;\nflipped: how many of the removed samples had a corrupted label; "
        f"random: mean of {n_random} random removals."
    )


if __name__ == "__main__":
    main()
