"""Brittleness: how many top proponents must be removed to flip a prediction?

For a few correctly classified test digits, rank the training samples by their
influence-function score (most helpful first), remove the top ``k`` for growing ``k``,
retrain and check whether the test prediction flips (``dattri.metric.brittleness``).
A good attribution method flips predictions with small ``k``; a random ranking is the
baseline. ``None`` means no ``k`` in the search space flipped the prediction.

    python examples/brittleness.py            # ~30 s on 2 CPU cores
    python examples/brittleness.py --quick    # a few seconds
"""

from __future__ import annotations

import torch
from _common import (
    WEIGHT_DECAY,
    device_from,
    digits,
    loader,
    loss_if,
    parser,
    train_lr,
)
from torch.utils.data import DataLoader

from dattri.algorithm import IFAttributorExplicit
from dattri.metric import brittleness
from dattri.task import AttributionTask


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    device = device_from(args.device)
    n_train, n_test = (150, 2) if args.quick else (500, 6)
    search_space = [0, 10, 20, 40] if args.quick else [0, 5, 10, 20, 30, 40, 60, 80, 120]

    x, y, x_pool, y_pool = digits(n_train, 100, seed=args.seed)
    model = train_lr(x, y, device, seed=args.seed)

    # Test samples: correct predictions spread from the least to the most confident.
    with torch.no_grad():
        probs = torch.softmax(model(x_pool.to(device)), -1).cpu()
    correct = probs.argmax(-1) == y_pool
    margin = probs[torch.arange(len(y_pool)), y_pool]
    candidates = torch.nonzero(correct).flatten()
    ranked = candidates[torch.argsort(margin[candidates])]
    chosen = ranked[torch.linspace(0, (len(ranked) - 1) // 2, n_test).long()]
    x_test, y_test = x_pool[chosen], y_pool[chosen]

    train, test = loader(x, y), loader(x_test, y_test, batch_size=1)
    task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=model.state_dict())
    attributor = IFAttributorExplicit(
        task, regularization=WEIGHT_DECAY, device=device, verbose=False
    )
    attributor.cache(train)
    scores = attributor.attribute(train, test).cpu()  # (n_train, n_test)

    def train_func(data: DataLoader) -> torch.nn.Module:
        xs, ys = zip(*data)
        return train_lr(torch.cat(xs), torch.cat(ys), device, seed=args.seed)

    def eval_func(trained: torch.nn.Module, data: DataLoader) -> torch.Tensor:
        ((xb, _),) = list(data)
        with torch.no_grad():
            return trained(xb.to(device)).argmax(-1)

    gen = torch.Generator().manual_seed(args.seed)
    random_scores = torch.rand(scores.shape, generator=gen)
    results = {}
    for name, s in (("IF", scores), ("random", random_scores)):
        out = brittleness(
            train, test, s, train_func, eval_func, device=device, search_space=search_space
        )
        results[name] = out if isinstance(out, list) else [out]

    print(f"{n_train} training samples; search space {search_space}")
    print(f"{'test':>4s} {'label':>5s} {'p(label)':>8s} {'IF k':>6s} {'random k':>9s}")
    for j in range(n_test):
        print(
            f"{j:4d} {int(y_test[j]):5d} {float(margin[chosen[j]]):8.3f} "
            f"{results['IF'][j]!s:>6s} {results['random'][j]!s:>9s}"
        )


if __name__ == "__main__":
    main()
