"""Featurizer of the inner-product attributors (the influence-function family).

:class:`TrainRepFeaturizer` wraps a
:class:`~dattri.algorithm.base.BaseInnerProductAttributor` as a featurizer of the shared
store (:func:`~dattri.algorithm.store.scaled.collect_features_scaled`): a batch becomes
the ``(B, d)`` rows ``T_train,k(g_k(z))`` (``transform_train_rep`` of the per-sample
loss gradients at checkpoint ``k``: the gradients themselves for the influence
functions, their Ritz-space projection for Arnoldi). Its :meth:`settings` name what the
rows depend on, so a store written under other settings is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dattri.algorithm.base import BaseInnerProductAttributor

__all__ = ["TrainRepFeaturizer", "tensor_digest"]


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the bytes of ``tensors`` (e.g. the state a train transform uses)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class TrainRepFeaturizer:
    """The training rows of an inner-product attributor, batch by batch.

    Args:
        attributor: the attributor (cached: its train transform is ready).
    """

    def __init__(self, attributor: BaseInnerProductAttributor) -> None:
        self.attributor = attributor
        self.task = attributor.task
        self.device = attributor.device
        self._out_dim: int | None = None

    @property
    def out_dim(self) -> int:
        """Row width ``d`` (from a zero gradient through ``transform_train_rep``)."""
        if self._out_dim is None:
            a = self.attributor
            cols, dtype, device = self.task.grad_layout(a.layer_name)
            zero = torch.zeros(1, cols, dtype=dtype, device=device)
            self._out_dim = int(a.transform_train_rep(0, zero).shape[1])
        return self._out_dim

    def __call__(self, ckpt_idx: int, batch: Any, target: bool = False, where: str = "") -> Tensor:
        """``(B, d)`` rows of ``batch`` at checkpoint ``ckpt_idx`` (``target`` unused)."""
        a = self.attributor
        return a.transform_train_rep(ckpt_idx, a.generate_train_rep(ckpt_idx, batch))

    def reuse_buffers(self) -> contextlib.AbstractContextManager[None]:
        """No buffer is reused: stored rows must outlive the next batch."""
        return contextlib.nullcontext()

    def settings(self) -> dict[str, Any]:
        """What the rows depend on besides the data and checkpoints."""
        a = self.attributor
        return {
            "attributor": type(a).__name__,
            "layer_name": repr(a.layer_name),
            "train_transform": [a.train_transform_digest(k) for k in range(a.num_checkpoints)],
        }
