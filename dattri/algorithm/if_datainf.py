"""DataInf influence functions (Kwon et al., 2024; upstream ``IFAttributorDataInf``).

The parameters are split into layers (consecutive selected parameters of the same
module, e.g. ``fc1.weight`` and ``fc1.bias``; root parameters ``weight``/``bias`` form
one layer). Per layer ``l`` the inverse Hessian is
approximated by the average of Sherman–Morrison inverses of damped rank-one Fishers,

    H_l^{-1} v ~ (1/n) sum_i (g_il g_il^T + r_l I)^{-1} v
               = (1/n) sum_i (v - (g_il . v) / (r_l + ||g_il||^2) g_il) / r_l,

with the per-sample training-loss gradients ``g_il`` of the cached data. The default
``regularization=0.0`` (upstream divides by zero there) selects the paper's layer-wise
``r_l = 0.1 * mean_i ||g_il||^2 / p_l``.

The ``(n, p)`` training gradients are never kept: the sum over ``i`` is streamed over
the cached training batches in chunks of at most :attr:`IFAttributorDataInf.
grad_chunk_elements` gradient entries, each chunk contributing ``(n_c / n)`` times the
chunk's own average (:func:`dattri.func.fisher.ifvp_datainf`). All test gradients of an
``attribute`` call are transformed together, so the training gradients are recomputed
once per ``attribute`` (and once per training batch by ``self_attribute`` and RelatIF).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dattri.algorithm.runtime.batching import iterate, move_to_device
from dattri.algorithm.runtime.distributed import all_reduce_sum
from dattri.algorithm.solve.mean_hvp import IFBase, dict_or_tuple_fields
from dattri.func.fisher import ifvp_datainf
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["IFAttributorDataInf"]


class IFAttributorDataInf(IFBase):
    """Influence functions with DataInf's closed-form layer-wise inverse.

    ``cache`` keeps the first ``ceil(len(loader) * fim_estimate_data_ratio)`` training
    batches (the data, not their gradients) and, per checkpoint, each layer's damping
    ``r_l`` (with the automatic damping: one streamed pass over the per-sample
    gradients). The transform streams the per-sample gradients of those batches, so
    memory is ``O(chunk * p + n_test * p)`` instead of ``O(n * p)``.

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names; the
            layers are the selected parameters grouped by module prefix.
        device: device for the computation.
        regularization: ``r > 0`` used for every layer, or ``0.0``/``None`` for the
            automatic layer-wise ``r_l = 0.1 * mean_i ||g_il||^2 / p_l``.
        fim_estimate_data_ratio: fraction of the cached loader's batches (the first ones)
            used, in ``(0, 1]``.
        verbose: show progress bars.
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory``: the shared store and
            budget of :class:`~dattri.algorithm.base.BaseInnerProductAttributor`.
    """

    mean_batch_loss = False  # per-sample gradients only: the reduction cancels

    #: torch.distributed: each rank streams its share of the batches; sums all-reduced
    shard_cache = True

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        regularization: float | None = 0.0,
        fim_estimate_data_ratio: float = 1.0,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        if regularization is not None and not (
            isinstance(regularization, (int, float))
            and math.isfinite(regularization)
            and regularization >= 0
        ):
            msg = f"regularization must be None or a number >= 0, got {regularization!r}."
            raise ValueError(msg)
        if not (
            isinstance(fim_estimate_data_ratio, (int, float)) and 0 < fim_estimate_data_ratio <= 1
        ):
            msg = f"fim_estimate_data_ratio must be in (0, 1], got {fim_estimate_data_ratio!r}."
            raise ValueError(msg)
        self.regularization = regularization
        self.fim_estimate_data_ratio = fim_estimate_data_ratio
        #: number of parameters of each layer (consecutive blocks of the gradient).
        self.layer_sizes: list[int] = []
        prev = None
        for name in task.selected_param_names(layer_name):
            module = name.rsplit(".", 1)[0] if "." in name else ""
            size = task.named_parameters[name].numel()
            if module == prev:
                self.layer_sizes[-1] += size
            else:
                self.layer_sizes.append(size)
            prev = module
        #: per checkpoint, the damping ``r_l`` of every layer.
        self.layer_regularization: dict[int, list[float]] = {}

    def _data_ratio(self) -> float:
        """The fraction of the batches defining the curvature (the constructor's)."""
        return self.fim_estimate_data_ratio

    #: most per-sample gradient entries (rows * p) materialised at once when streaming.
    grad_chunk_elements: int = 2**26

    def _train_grad_chunks(self, ckpt_idx: int, desc: str) -> Iterator[list[Tensor]]:
        """Yield the per-layer training gradients ``[(c, p_l), ...]`` chunk by chunk."""
        rows = max(1, self.grad_chunk_elements // max(1, sum(self.layer_sizes)))
        for batch, size in iterate(list(zip(self._batches, self._sizes)), desc, self.verbose):
            for start in range(0, size, rows):
                part = batch if rows >= size else _rows_of(batch, start, start + rows)
                grads = self.generate_train_rep(ckpt_idx, part)
                yield list(grads.split(self.layer_sizes, dim=1))

    @property
    def _cached_train_reps(self) -> Mapping[int, Tensor]:
        """Upstream name: ``{ckpt_idx: (n_cached, p)}`` per-sample training-loss gradients.

        This implementation streams the gradients instead of keeping them; this
        read-only mapping recomputes a checkpoint's ``(n_cached, p)`` matrix (rows in
        cached order, columns over the selected parameters) each time it is indexed.

        Raises:
            ValueError: Before :meth:`cache`.
        """
        if not self._batches:
            msg = "IFAttributorDataInf: call cache(train_loader) before reading _cached_train_reps."
            raise ValueError(msg)
        return _TrainReps(self)

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        if self.regularization:
            regs = [float(self.regularization)] * len(self.layer_sizes)
        else:  # r_l = 0.1 * mean_i ||g_il||^2 / p_l, streamed (datainf_regularization)
            sq = torch.zeros(len(self.layer_sizes), dtype=torch.float64)
            for layers in self._train_grad_chunks(ckpt_idx, "DataInf damping"):
                sq += torch.stack([(g.double() ** 2).sum() for g in layers]).cpu()
            if self._n_total is not None:  # batches sharded over ranks (shard_cache)
                sq = all_reduce_sum(sq)
            regs = []
            for total, size in zip(sq.tolist(), self.layer_sizes):
                r = 0.1 * total / self.n_cached / size
                regs.append(r if r > 0 and math.isfinite(r) else 1.0)  # as datainf_regularization
        self.layer_regularization[ckpt_idx] = regs

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """Layer-wise DataInf inverse of every row, ``(B, p) -> (B, p)``.

        Streams the training gradients: ``sum_c (n_c / n) ifvp_datainf(chunk_c, v)``.
        """
        regs = self.layer_regularization[ckpt_idx]
        n = self.n_cached
        out: Tensor | None = None
        for layers in self._train_grad_chunks(ckpt_idx, "DataInf inverse"):
            part = ifvp_datainf(layers, test_rep, regs) * (layers[0].shape[0] / n)
            out = part if out is None else out.add_(part)
        if self._n_total is not None:  # each rank streamed its share of the batches
            out = all_reduce_sum(out)
        return out.to(test_rep.dtype)

    def _test_reps(self, test_dataloader: Iterable) -> list[Tensor]:
        """Transform all test gradients at once: one streamed pass per checkpoint.

        Overrides the base (which transforms test batch by test batch) so the training
        gradients are recomputed once per ``attribute`` call, not once per test batch.
        """
        raw: list[list[Tensor]] = [[] for _ in range(self.num_checkpoints)]
        for batch in iterate(test_dataloader, "test gradients", self.verbose):
            batch = move_to_device(batch, self.device)
            for ckpt_idx in range(self.num_checkpoints):
                raw[ckpt_idx].append(self.generate_test_rep(ckpt_idx, batch))
        return [self.transform_test_rep(k, torch.cat(r)) for k, r in enumerate(raw)]


class _TrainReps(Mapping):
    """Read-only ``{ckpt_idx: (n_cached, p)}`` view computing gradients on access."""

    def __init__(self, owner: IFAttributorDataInf) -> None:
        self._owner = owner

    def __getitem__(self, ckpt_idx: int) -> Tensor:
        owner = self._owner
        if not isinstance(ckpt_idx, int) or not 0 <= ckpt_idx < owner.num_checkpoints:
            raise KeyError(ckpt_idx)
        chunks = owner._train_grad_chunks(ckpt_idx, "DataInf train gradients")
        return torch.cat([torch.cat(layers, dim=1) for layers in chunks])

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._owner.num_checkpoints))

    def __len__(self) -> int:
        return self._owner.num_checkpoints


def _rows_of(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor of a batch (same structure)."""
    fields, rebuild = dict_or_tuple_fields(batch)
    return rebuild([f[start:stop] for f in fields])
