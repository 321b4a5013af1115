"""Brittleness of test predictions under removal of top-attributed training samples.

The brittleness of a test sample is the smallest number of top-scored training
samples whose removal (and retraining) flips its prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.model_util._data import (
    loader_dataset_indices,
    loader_shuffles,
    make_subset_loader,
)

__all__ = ["brittleness", "check_if_flip"]

DEFAULT_SEARCH_SPACE = tuple(range(0, 200, 20))


def _label_of(batch: Any) -> torch.Tensor:
    """Label tensor of a batch: ``batch[1]`` for tuples, ``label(s)`` key for dicts."""
    if isinstance(batch, dict):
        for key in ("label", "labels", "y", "target"):
            if key in batch:
                return torch.as_tensor(batch[key])
        msg = "Dict test batches must hold the label under 'label', 'labels', 'y' or 'target'."
        raise ValueError(msg)
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return torch.as_tensor(batch[1])
    msg = "Test batches must be (inputs, labels) tuples or dicts with a 'label' key."
    raise ValueError(msg)


def _test_labels(test_loader: DataLoader) -> torch.Tensor:
    return torch.cat([_label_of(b).reshape(-1).cpu() for b in test_loader])


def _flips(
    train_loader: DataLoader,
    train_ds_idx: list[int],
    test_loader: DataLoader,
    label: torch.Tensor,
    remove_positions: Sequence[int],
    train_func: Callable[[DataLoader], Any],
    eval_func: Callable[[Any, DataLoader], Any],
    device: str | torch.device,
) -> bool:
    removed = {int(p) for p in remove_positions}
    keep = [d for p, d in enumerate(train_ds_idx) if p not in removed]
    loader = make_subset_loader(train_loader, keep, shuffle=loader_shuffles(train_loader), seed=0)
    model = train_func(loader)
    if isinstance(model, nn.Module):
        model = model.to(device)
    pred = torch.as_tensor(eval_func(model, test_loader)).reshape(-1).cpu()
    if pred.numel() != 1:
        msg = f"eval_func must return one prediction for a single test sample; got {pred.numel()}."
        raise ValueError(msg)
    return bool(pred.item() != label.item())


def check_if_flip(
    train_loader: DataLoader,
    test_loader: DataLoader,
    indices_to_remove: Sequence[int] | torch.Tensor,
    train_func: Callable[[DataLoader], Any],
    eval_func: Callable[[Any, DataLoader], Any],
    device: str | torch.device = "cpu",
) -> bool:
    """Retrain without some training samples and check if the test prediction flips.

    Args:
        train_loader: Loader over the training set; ``indices_to_remove`` are
            positions in its sample order (rows of the score matrix). The new
            loader keeps its batch size and shuffles iff it shuffled.
        test_loader: Loader holding exactly one test sample ``(x, y)``.
        indices_to_remove: Train positions to drop.
        train_func: ``train_func(loader)`` returning a trained model.
        eval_func: ``eval_func(model, test_loader)`` returning the predicted label
            (one element).
        device: Device the retrained model is moved to before ``eval_func``.

    Returns:
        True if the prediction differs from the test label.

    Raises:
        ValueError: If the test loader does not hold exactly one sample.
    """
    labels = _test_labels(test_loader)
    if labels.numel() != 1:
        msg = f"`test_loader` must hold exactly one test sample; got {labels.numel()}."
        raise ValueError(msg)
    if isinstance(indices_to_remove, torch.Tensor):
        indices_to_remove = indices_to_remove.reshape(-1).tolist()
    return _flips(
        train_loader,
        loader_dataset_indices(train_loader),
        test_loader,
        labels,
        indices_to_remove,
        train_func,
        eval_func,
        device,
    )


def brittleness(
    train_loader: DataLoader,
    test_loader: DataLoader,
    scores: torch.Tensor,
    train_func: Callable[[DataLoader], Any],
    eval_func: Callable[[Any, DataLoader], Any],
    device: str | torch.device = "cpu",
    search_space: Sequence[int] | None = None,
    *,
    verbose: bool = False,
) -> int | list[int | None] | None:
    """Smallest number of top-scored training samples whose removal flips a prediction.

    Returns the smallest ``k`` in ``search_space`` such that removing the top-``k``
    training samples (by score) and retraining flips the test prediction away
    from its label.

    Test samples are handled one at a time: for test sample ``j`` the training
    positions are ranked by ``scores[:, j]`` (descending) and ``eval_func`` gets a
    loader holding only that test sample. Values of ``k`` are tried in order
    (linear search, since flipping need not be monotone in ``k``). The train
    loader's sampler does not need an ``indices`` attribute.

    Args:
        train_loader: Loader over the training set (its order = score rows).
        test_loader: Loader over ``n_test`` test samples ``(x, y)`` (or dicts with
            a ``label`` key).
        scores: ``(n_train,)`` or ``(n_train, n_test)`` attribution scores.
        train_func: ``train_func(loader)`` returning a trained model.
        eval_func: ``eval_func(model, single_test_loader)`` returning the
            predicted label of the single test sample.
        device: Device retrained models are moved to before ``eval_func``.
        search_space: Increasing removal counts to try (default
            ``0, 20, ..., 180``).
        verbose: Show a tqdm progress bar over test samples.

    Returns:
        With a single test sample (upstream behaviour): the smallest flipping
        ``k`` or ``None``. With several: a list with one such value per test
        sample.

    Raises:
        ValueError: On shape mismatches or an invalid search space.
    """
    train_ds_idx = loader_dataset_indices(train_loader)
    n_train = len(train_ds_idx)
    test_ds_idx = loader_dataset_indices(test_loader)
    n_test = len(test_ds_idx)
    scores = torch.as_tensor(scores).detach().cpu()
    if scores.dim() == 1:
        scores = scores[:, None]
    if scores.dim() != 2 or scores.shape[0] != n_train or scores.shape[1] != n_test:
        msg = (
            f"`scores` must have shape (n_train, n_test) = ({n_train}, {n_test}) "
            f"matching the loaders; got {tuple(scores.shape)}."
        )
        raise ValueError(msg)
    space = list(DEFAULT_SEARCH_SPACE if search_space is None else search_space)
    if any(int(k) != k or k < 0 or k > n_train for k in space):
        msg = f"`search_space` values must be integers in [0, {n_train}]; got {space}."
        raise ValueError(msg)
    if space != sorted(space):
        msg = "`search_space` must be increasing."
        raise ValueError(msg)

    results: list[int | None] = []
    for j in tqdm(range(n_test), desc="brittleness", disable=not verbose):
        single = make_subset_loader(test_loader, [test_ds_idx[j]], shuffle=False, seed=None)
        label = _test_labels(single)
        order = torch.argsort(scores[:, j], descending=True, stable=True).tolist()
        found = None
        for k in space:
            if _flips(
                train_loader,
                train_ds_idx,
                single,
                label,
                order[: int(k)],
                train_func,
                eval_func,
                device,
            ):
                found = int(k)
                break
        results.append(found)
    return results[0] if n_test == 1 else results
