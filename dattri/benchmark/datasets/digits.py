"""scikit-learn's bundled 8x8 digits (1797 samples): an offline benchmark dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dattri.benchmark.datasets._optional import import_optional

__all__ = ["N_DIGITS", "load_digits_binary_dataset", "load_digits_dataset"]

#: Number of samples in scikit-learn's digits data.
N_DIGITS = 1797


def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    sklearn_datasets = import_optional(
        "sklearn.datasets", "The digits dataset needs scikit-learn: pip install scikit-learn."
    )
    bunch = sklearn_datasets.load_digits()
    return bunch.data.astype(np.float64), bunch.target.astype(np.int64)


def _split(
    x: np.ndarray,
    y: np.ndarray,
    n_train: int,
    n_test: int,
    seed: int,
    standardize: bool,
    dtype: torch.dtype,
) -> tuple[TensorDataset, TensorDataset]:
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int | np.integer) or value < 1:
            msg = f"`{name}` must be a positive int, got {value!r}."
            raise ValueError(msg)
    if n_train + n_test > len(x):
        msg = (
            f"`n_train + n_test` = {n_train + n_test} exceeds the {len(x)} available "
            "samples; lower one of them."
        )
        raise ValueError(msg)
    if not dtype.is_floating_point:
        msg = f"`dtype` must be a floating dtype, got {dtype}."
        raise TypeError(msg)
    order = np.random.default_rng(seed).permutation(len(x))
    train_idx, test_idx = order[:n_train], order[n_train : n_train + n_test]
    x_train, x_test = x[train_idx], x[test_idx]
    if standardize:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # constant pixels (e.g. image corners) stay at 0
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    else:
        x_train, x_test = x_train / 16.0, x_test / 16.0
    train = TensorDataset(torch.as_tensor(x_train, dtype=dtype), torch.as_tensor(y[train_idx]))
    test = TensorDataset(torch.as_tensor(x_test, dtype=dtype), torch.as_tensor(y[test_idx]))
    return train, test


def load_digits_dataset(
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[TensorDataset, TensorDataset]:
    """Deterministic train/test split of scikit-learn's digits (10 classes).

    A seeded permutation of the 1797 samples gives the first ``n_train`` to the
    train set and the next ``n_test`` to the test set (disjoint).

    Args:
        n_train: Number of training samples.
        n_test: Number of test samples.
        seed: Seed of the split permutation.
        standardize: Standardise each pixel with the train mean/std (constant
            pixels are only centred). Otherwise pixels are scaled to ``[0, 1]``.
        dtype: Floating dtype of the features.

    Returns:
        ``(train_ds, test_ds)`` yielding ``(x (64,), label int64 in 0..9)``.

    Raises:
        ValueError: If ``n_train + n_test > 1797`` or a size is not positive.
    """
    x, y = _load_digits_arrays()
    return _split(x, y, n_train, n_test, seed, standardize, dtype)


def load_digits_binary_dataset(
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
    classes: tuple[int, int] | None = None,
) -> tuple[TensorDataset, TensorDataset]:
    """Binary variant of :func:`load_digits_dataset`.

    With ``classes=None`` every sample is kept and labelled by parity (odd
    digit = 1). With ``classes=(a, b)`` only digits ``a`` and ``b`` are kept
    (about 360 samples), labelled ``a -> 0`` and ``b -> 1``.

    Args:
        n_train: Number of training samples.
        n_test: Number of test samples.
        seed: Seed of the split permutation.
        standardize: See :func:`load_digits_dataset`.
        dtype: Floating dtype of the features.
        classes: Two distinct digits to keep, or ``None`` for odd-vs-even.

    Returns:
        ``(train_ds, test_ds)`` yielding ``(x (64,), label int64 in {0, 1})``.

    Raises:
        ValueError: If ``classes`` is not two distinct digits, or the sizes do
            not fit in the kept samples.
    """
    x, y = _load_digits_arrays()
    if classes is None:
        y = y % 2
    else:
        if len(classes) != 2 or classes[0] == classes[1] or not set(classes) <= set(range(10)):
            msg = f"`classes` must be two distinct digits in 0..9, got {classes}."
            raise ValueError(msg)
        keep = np.isin(y, classes)
        x, y = x[keep], (y[keep] == classes[1]).astype(np.int64)
    return _split(x, y, n_train, n_test, seed, standardize, dtype)
