"""A tiny TRAK/TracIn problem for the feature-store fault tests, and a subprocess worker.

``python -m tests.store_worker <trak|tracin> <cache_dir>`` caches the training
features into ``cache_dir`` with a slow loader that prints ``loaded <i>`` to stdout
before the ``i``-th batch (counted from 1) is computed; progress is committed after
every batch, so when line ``i`` is printed, batches ``1 .. i - 1`` are on disk.
:mod:`tests.test_store_faults` kills it with SIGKILL part-way and resumes in-process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset, default_collate

from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.params.projection import TracInProjectionParams, TRAKProjectionParams
from dattri.task import AttributionTask

N_TRAIN, BATCH, N_TEST = 20, 4, 6  # 5 training batches


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``, float64, 3 classes."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(N_TRAIN + N_TEST, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=gen)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def model_and_checkpoints() -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A 5-8-3 MLP and two checkpoints of it."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    other = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()
    }
    return model, [base, other]


def loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = BATCH,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A fixed-order loader of ``(x, y)``."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, collate_fn=collate_fn)


def make(method: str, cache_dir: Any = None, verbose: bool = False) -> Any:
    """A TRAK or TracIn attributor on the problem (optionally with a feature store)."""
    model, ckpts = model_and_checkpoints()

    def logits(params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),))

    def loss(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(logits(params, x), y.unsqueeze(0))

    if method == "tracin":
        return TracInAttributor(
            AttributionTask(loss, model, ckpts),
            weight_list=[0.5, 1.0],
            normalized_grad=False,
            proj_params=TracInProjectionParams(proj_dim=6, proj_seed=2),
            verbose=verbose,
            cache_dir=cache_dir,
        )

    def margin(params: dict, batch: tuple) -> torch.Tensor:
        logp = -loss(params, batch)
        return logp - torch.log(1 - torch.exp(logp))

    def prob(params: dict, batch: tuple) -> torch.Tensor:
        return torch.exp(-loss(params, batch))

    return TRAKAttributor(
        AttributionTask(margin, model, ckpts),
        prob,
        TRAKProjectionParams(proj_dim=6, proj_seed=2),
        regularization=1e-3,
        verbose=verbose,
        cache_dir=cache_dir,
    )


def scores(attr: Any, train: DataLoader, test: DataLoader) -> torch.Tensor:
    """``(n_train, n_test)`` scores of a cached attributor."""
    if isinstance(attr, TRAKAttributor):
        return attr.attribute(test)
    return attr.attribute(train, test)


def main(method: str, cache_dir: str) -> None:
    """Cache slowly, printing ``loaded <i>`` before the ``i``-th batch is computed."""
    from dattri.algorithm.store.memmap_store import MemmapFeatureStore

    torch.set_num_threads(1)
    MemmapFeatureStore.commit_seconds = 0.0  # progress on disk after every batch
    count = [0]

    def slow_collate(samples: list) -> Any:
        count[0] += 1
        print(f"loaded {count[0]}", flush=True)
        time.sleep(0.2)
        return default_collate(samples)

    x, y, _, _ = data()
    make(method, cache_dir).cache(loader(x, y, collate_fn=slow_collate))
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
