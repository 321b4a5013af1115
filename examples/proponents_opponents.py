"""Picture: the top proponents and opponents of a few test digits.

Trains a logistic regression on digits, computes influence-function scores with the
streaming ``attribute_topk`` (the full ``(n_train, n_test)`` matrix is never kept) and
draws, for each test image, the training images that help its prediction most
(proponents, largest scores) and hurt it most (opponents, most negative scores).

    python examples/proponents_opponents.py --out proponents.png
    python examples/proponents_opponents.py --quick --out /tmp/p.png
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import WEIGHT_DECAY, device_from, loader, loss_if, parser, train_lr

from dattri.algorithm import IFAttributorExplicit, TopKResult
from dattri.benchmark.datasets import load_digits_dataset
from dattri.task import AttributionTask


def plot(
    path: Path,
    test_img: torch.Tensor,
    test_lbl: torch.Tensor,
    top: TopKResult,
    train_img: torch.Tensor,
    train_lbl: torch.Tensor,
    k: int,
) -> None:
    """Grid: one row per test image, its ``k`` proponents then its ``k`` opponents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_test = len(test_lbl)
    fig, axes = plt.subplots(n_test, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.55 * n_test))
    axes = axes.reshape(n_test, 2 * k + 1)
    for j in range(n_test):
        cells = [(test_img[j], f"test: {int(test_lbl[j])}", "black")]
        for side, color in (("helpful", "tab:green"), ("harmful", "tab:red")):
            indices = getattr(top, f"{side}_indices")[j].tolist()
            scores = getattr(top, f"{side}_scores")[j].tolist()
            for idx, s in zip(indices, scores):
                cells.append((train_img[idx], f"{int(train_lbl[idx])}  {s:+.3g}", color))
        for ax, (img, title, color) in zip(axes[j], cells):
            ax.imshow(img.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 1].annotate(
        "proponents (help) →", (0, 1.45), xycoords="axes fraction", color="tab:green", fontsize=9
    )
    axes[0, k + 1].annotate(
        "opponents (hurt) →", (0, 1.45), xycoords="axes fraction", color="tab:red", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("proponents_opponents.png"), help="PNG path")
    p.add_argument("--k", type=int, default=5, help="images per side (default 5)")
    args = p.parse_args()
    device = device_from(args.device)
    n_train, n_test = (300, 2) if args.quick else (1200, 4)

    # Same split twice: standardised features for the model, [0, 1] pixels for the plot.
    train, test = load_digits_dataset(n_train=n_train, n_test=n_test, seed=args.seed)
    raw_train, raw_test = load_digits_dataset(
        n_train=n_train, n_test=n_test, seed=args.seed, standardize=False
    )
    x, y = train.tensors
    x_test, y_test = test.tensors
    model = train_lr(x, y, device, seed=args.seed)

    task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=model.state_dict())
    attributor = IFAttributorExplicit(
        task, regularization=WEIGHT_DECAY, device=device, verbose=False
    )
    train_loader = loader(x, y)
    attributor.cache(train_loader)
    top = attributor.attribute_topk(train_loader, loader(x_test, y_test), k=args.k)

    for j in range(n_test):
        print(
            f"test {j} (label {int(y_test[j])}): proponents {top.helpful_indices[j].tolist()} "
            f"labels {y[top.helpful_indices[j].cpu()].tolist()}; opponents "
            f"{top.harmful_indices[j].tolist()} labels {y[top.harmful_indices[j].cpu()].tolist()}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(
        args.out,
        raw_test.tensors[0],
        y_test,
        top,
        raw_train.tensors[0],
        y,
        args.k,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
