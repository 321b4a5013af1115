"""Streaming per-test top-k over blocks of training-sample scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TopKAccumulator", "TopKResult"]


@dataclass
class TopKResult:
    """The k most helpful and most harmful training samples of each test sample.

    Attributes:
        helpful_indices: ``(n_test, k)`` training indices, largest score first.
        helpful_scores: ``(n_test, k)`` their scores.
        harmful_indices: ``(n_test, k)`` training indices, smallest score first.
        harmful_scores: ``(n_test, k)`` their scores.
    """

    helpful_indices: Tensor
    helpful_scores: Tensor
    harmful_indices: Tensor
    harmful_scores: Tensor


class TopKAccumulator:
    """Keep the running top-k (largest and smallest) of streamed score blocks.

    Memory is ``O(n_test * k)`` whatever the number of training samples.

    Args:
        k: how many training samples to keep per test sample (per side).
    """

    def __init__(self, k: int) -> None:
        if not isinstance(k, int) or k <= 0:
            msg = f"k must be a positive int, got {k!r}."
            raise ValueError(msg)
        self.k = k
        self._top: tuple[Tensor, Tensor] | None = None
        self._bottom: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def _merge(
        current: tuple[Tensor, Tensor] | None,
        scores: Tensor,
        indices: Tensor,
        k: int,
        largest: bool,
    ) -> tuple[Tensor, Tensor]:
        if current is not None:
            scores = torch.cat([current[0], scores], dim=1)
            indices = torch.cat([current[1], indices], dim=1)
        kk = min(k, scores.shape[1])
        vals, pos = torch.topk(scores, kk, dim=1, largest=largest, sorted=True)
        return vals, torch.gather(indices, 1, pos)

    def update(self, block: Tensor, row_start: int) -> None:
        """Add a block of scores.

        Args:
            block: ``(B_train, n_test)`` scores of training rows
                ``row_start .. row_start + B_train - 1``.
            row_start: global index of the block's first training row.
        """
        scores = block.T  # (n_test, B_train)
        idx = torch.arange(row_start, row_start + block.shape[0], device=block.device)
        idx = idx.unsqueeze(0).expand_as(scores)
        self._top = self._merge(self._top, scores, idx, self.k, largest=True)
        self._bottom = self._merge(self._bottom, scores, idx, self.k, largest=False)

    def result(self, warn: bool = True) -> TopKResult:
        """Return the accumulated top-k (warns if fewer than ``k`` rows were added).

        Raises:
            RuntimeError: if no block was added.
        """
        if self._top is None or self._bottom is None:
            msg = "No score block was added to the top-k accumulator."
            raise RuntimeError(msg)
        from dattri.algorithm.runtime.validation import warn_topk

        if warn:
            warn_topk(self.k, self._top[0].shape[1])
        return TopKResult(
            helpful_indices=self._top[1],
            helpful_scores=self._top[0],
            harmful_indices=self._bottom[1],
            harmful_scores=self._bottom[0],
        )
