"""Small helpers shared by the benchmark settings: label noise and samplers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["SubsetSampler", "flip_label"]

LabelT = TypeVar("LabelT", torch.Tensor, np.ndarray, list)


def _labels_to_numpy(label: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """Return a 1-D integer numpy copy of ``label`` (any supported container)."""
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim != 1:
        msg = f"`label` must be 1-D, got shape {tuple(arr.shape)}; pass a flat vector."
        raise ValueError(msg)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            msg = f"`label` must hold integer class ids, got dtype {arr.dtype}."
            raise TypeError(msg)
    return arr.astype(np.int64, copy=True)


def flip_label(
    label: LabelT,
    label_space: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    p: float = 0.1,
    seed: int | None = None,
) -> tuple[LabelT, list[int]]:
    """Flip exactly ``int(p * n)`` labels, each to a different class.

    The positions to flip are drawn uniformly without replacement; every flipped
    label is replaced by a class drawn uniformly from ``label_space`` minus its
    original class, so a flipped label never equals the original.

    Args:
        label: Class ids of shape ``(n,)``; a ``torch.Tensor``, ``np.ndarray`` or
            list. It is not modified.
        label_space: The classes a label may be flipped to. Defaults to the
            distinct values present in ``label``. Must contain every value of
            ``label`` and at least two classes when anything is flipped.
        p: Fraction of labels to flip, in ``[0, 1]``.
        seed: Seed of the random generator; ``None`` draws fresh entropy
            (non-reproducible, like upstream).

    Returns:
        ``(flipped, noise_indices)``: a copy of ``label`` of the same type (and,
        for tensors, dtype and device) with the flips applied, and the sorted list
        of the ``int(p * n)`` flipped positions.

    Raises:
        ValueError: If ``p`` is outside ``[0, 1]``, ``label`` is not 1-D, a label
            lies outside ``label_space``, or ``label_space`` has fewer than two
            classes while flips are requested.
        TypeError: If ``label`` does not hold integer class ids.
    """
    if not 0.0 <= float(p) <= 1.0:
        msg = f"`p` must be in [0, 1], got {p}."
        raise ValueError(msg)
    arr = _labels_to_numpy(label)
    n = arr.shape[0]
    if label_space is None:
        space = np.unique(arr)
    else:
        if isinstance(label_space, torch.Tensor):
            label_space = label_space.reshape(-1)
        else:
            label_space = np.asarray(label_space).reshape(-1)
        space = np.unique(_labels_to_numpy(label_space))
    if n and not np.all(np.isin(arr, space)):
        bad = np.setdiff1d(np.unique(arr), space)
        msg = (
            f"`label` contains classes {bad.tolist()} that are not in `label_space` "
            f"{space.tolist()}; add them to `label_space`."
        )
        raise ValueError(msg)
    n_flip = int(p * n)
    if n_flip > 0 and space.size < 2:
        msg = (
            f"`label_space` must contain at least two classes to flip labels, got {space.tolist()}."
        )
        raise ValueError(msg)

    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(n, size=n_flip, replace=False))
    flipped = arr.copy()
    if n_flip:
        # Draw an offset among the m-1 other classes, then skip the original one.
        original_rank = np.searchsorted(space, arr[positions])
        draw = rng.integers(0, space.size - 1, size=n_flip)
        draw = draw + (draw >= original_rank)
        flipped[positions] = space[draw]

    noise_indices = positions.tolist()
    if isinstance(label, torch.Tensor):
        out = torch.as_tensor(flipped, device=label.device).to(label.dtype)
        return out, noise_indices
    if isinstance(label, np.ndarray):
        return flipped.astype(label.dtype), noise_indices
    return flipped.tolist(), noise_indices


class SubsetSampler(Sampler[int]):
    """Sampler that yields the given indices in the given order (no shuffling).

    Args:
        indices: Dataset indices, e.g. a list, ``range``, 1-D tensor or array.

    Raises:
        ValueError: If ``indices`` is not one-dimensional.
        TypeError: If ``indices`` does not hold integers.
    """

    def __init__(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> None:
        if isinstance(indices, torch.Tensor):
            arr = indices.detach().cpu().numpy()
        else:
            arr = np.asarray(list(indices) if isinstance(indices, range) else indices)
        if arr.ndim != 1:
            msg = f"`indices` must be 1-D, got shape {tuple(arr.shape)}."
            raise ValueError(msg)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            msg = f"`indices` must hold integers, got dtype {arr.dtype}."
            raise TypeError(msg)
        self.indices: list[int] = arr.astype(np.int64).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
