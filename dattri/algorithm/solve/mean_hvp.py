"""Shared machinery of the influence-function attributors.

Every IF attributor needs, per checkpoint, the training loss as a function of the
selected (flat) parameters and the Hessian-vector product of the **mean** training
loss over the whole cached loader::

    H v = sum_b (B_b / n) * H_b v,      H_b = Hessian of loss_func(params, batch_b)

where ``loss_func`` called on a whole batch ``(B_b, ...)`` returns the mean loss of that
batch (the upstream IF convention). The cached batches are kept on ``device`` so that
HVPs can be re-evaluated batch by batch (memory: one batch of activations at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseInnerProductAttributor
from dattri.algorithm.runtime.batching import batch_size_of, check_loader, iterate, move_to_device
from dattri.algorithm.runtime.distributed import all_reduce_sum, is_distributed, shard_range
from dattri.algorithm.runtime.validation import explain_batches, require_reiterable
from dattri.algorithm.store.memmap_store import iter_batches
from dattri.func.batch_utils import NonFiniteGradientError, nonfinite_rows
from dattri.func.hvp_core import hvp_matvec, linearization_bytes
from dattri.task import AttributionTask

__all__ = [
    "IFBase",
    "MeanLossHVP",
    "check_finite_rep",
    "dict_or_tuple_fields",
    "materialize_batches",
    "merge_batches",
]


def materialize_batches(
    loader: Iterable,
    device: str | torch.device,
    ratio: float = 1.0,
    verbose: bool = False,
    name: str = "full_train_dataloader",
) -> tuple[list[Any], list[int]]:
    """Collect (the first ``ceil(len * ratio)``) batches of a loader on ``device``.

    Args:
        loader: the batches (tensors, tuples/lists or dicts of tensors).
        device: where to keep them.
        ratio: fraction of the batches to keep, in ``(0, 1]``.
        verbose: show a progress bar.
        name: argument name used in error messages.

    Returns:
        ``(batches, sizes)``: the batches on ``device`` and their sizes.

    Raises:
        ValueError: if ``ratio`` is not in ``(0, 1]`` or the loader is empty.
    """
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        msg = f"The data ratio must be in (0, 1], got {ratio!r}."
        raise ValueError(msg)
    limit = None
    if ratio < 1:
        if not hasattr(loader, "__len__"):
            msg = f"A data ratio < 1 needs {name} to have a length (len(loader))."
            raise ValueError(msg)
        limit = max(1, math.ceil(len(loader) * ratio))
    batches: list[Any] = []
    sizes: list[int] = []
    for batch in iterate(loader, "caching training batches", verbose, total=limit):
        if limit is not None and len(batches) >= limit:
            break
        batches.append(move_to_device(batch, device))
        sizes.append(batch_size_of(batch))
    if not batches:
        msg = f"{name} yielded no batch."
        raise ValueError(msg)
    return batches, sizes


def _materialize_shard(
    loader: Iterable, device: str | torch.device, ratio: float
) -> tuple[list[Any], list[int]]:
    """This rank's contiguous share of the first ``ceil(len * ratio)`` batches."""
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        msg = f"The data ratio must be in (0, 1], got {ratio!r}."
        raise ValueError(msg)
    if not hasattr(loader, "__len__"):
        msg = "Sharding the training data over torch.distributed ranks needs len(loader)."
        raise ValueError(msg)
    limit = max(1, math.ceil(len(loader) * ratio))
    mine = list(shard_range(limit))
    if not mine:
        msg = (
            f"full_train_dataloader has {limit} batch(es), fewer than the "
            "torch.distributed world size: use smaller batches or fewer processes."
        )
        raise ValueError(msg)
    batches = [move_to_device(b, device) for _, b in iter_batches(loader, mine)]
    return batches, [batch_size_of(b) for b in batches]


def check_finite_rep(rep: Tensor, what: str) -> Tensor:
    """Raise a clear ValueError if a gradient representation is not finite.

    Args:
        rep: ``(B, p)`` gradients.
        what: description used in the message (e.g. ``"training-loss gradients"``).

    Returns:
        ``rep`` unchanged.
    """
    if bool(nonfinite_rows(rep.reshape(rep.shape[0], -1)).any()):
        raise ValueError(_nonfinite_message(what))
    return rep


def _nonfinite_message(what: str) -> str:
    return (
        f"The {what} contain NaN or inf: check loss_func/target_func, the data and "
        "the checkpoint (a loss that is not finite, or log(0), gives NaN gradients)."
    )


class IFBase(BaseInnerProductAttributor):
    """Base of the influence-function attributors (IF convention, ``keep_batch_dim``).

    Provides the cached training batches, the selected loss function and parameters of
    each checkpoint, the mean-loss HVP operator, and finiteness checks on gradients.

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names.
        device: device for the computation.
        verbose: show progress bars.
        **scale: ``cache_dir``, ``store_dtype``, ``max_memory`` (see the base class).
    """

    keep_batch_dim = True
    mean_batch_loss = True
    #: whether :meth:`cache` keeps the training batches (for HVPs); EK-FAC streams them.
    keeps_batches: bool = True
    #: with torch.distributed, whether ``_cache_batches`` keeps only this rank's
    #: contiguous share of the batches (the mean-loss HVP is then summed over ranks).
    shard_cache: bool = False
    #: most bytes of kept HVP linearisations (``mean_hvp_operator(keep_linearizations=
    #: True)``, used by Arnoldi); set to 0 to always re-linearise.
    linearization_budget_bytes: int = 1 << 30
    #: with kept linearisations, consecutive cached batches are concatenated into HVP
    #: batches of up to this many samples (when their fields concatenate).
    hvp_merge_rows: int = 2048

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        verbose: bool = True,
        **scale: Any,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device, verbose=verbose, **scale)
        self._batches: list[Any] = []
        self._sizes: list[int] = []
        self._n_total: int | None = None  # all ranks' samples when sharded

    # ------------------------------------------------------------ train data
    def _data_ratio(self) -> float:
        """Fraction of the loader's batches (the first ones) defining the curvature."""
        return 1.0

    def cache(self, full_train_dataloader: Iterable) -> None:
        """Keep the training batches on ``device`` and build every checkpoint's state.

        Args:
            full_train_dataloader: the training data defining the Hessian / Fisher (not
                shuffled).
        """
        if self.keeps_batches:
            self._cache_batches(full_train_dataloader, self._data_ratio())
            self._prepare_batches()
        super().cache(full_train_dataloader)

    def _prepare_batches(self) -> None:
        """Reorganise the kept batches before the per-checkpoint state (default: none)."""

    def _cache_batches(self, full_train_dataloader: Iterable, ratio: float = 1.0) -> None:
        # order is irrelevant for the Hessian; the base class warns about shuffling once
        check_loader(full_train_dataloader, "full_train_dataloader", order_matters=False)
        require_reiterable(full_train_dataloader, "full_train_dataloader", type(self).__name__)
        self._n_total = None
        if self.shard_cache and is_distributed():
            self._batches, self._sizes = _materialize_shard(
                full_train_dataloader, self.device, ratio
            )
            self._n_total = int(all_reduce_sum(sum(self._sizes)))
            return
        self._batches, self._sizes = materialize_batches(
            full_train_dataloader, self.device, ratio, self.verbose
        )

    @property
    def n_cached(self) -> int:
        """Number of cached training samples defining the Hessian (all ranks)."""
        return self._n_total if self._n_total is not None else sum(self._sizes)

    def _loss_and_params(self, ckpt_idx: int) -> tuple[Callable, Tensor]:
        """The loss of the selected flat parameters and their value at ``ckpt_idx``."""
        func = self.task.get_loss_func(layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        params, _ = self.task.get_param(ckpt_idx, self.layer_name)
        return func, params

    def _check_loss(self, func: Callable, params: Tensor) -> None:
        """Check that the loss of the first cached batch is a finite scalar."""
        loss = func(params, self._batches[0])
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            msg = (
                f"loss_func must return a scalar tensor (the mean loss of the batch), got "
                f"{shape}. Reduce the loss with .mean() (e.g. cross_entropy with the "
                "default reduction='mean')."
            )
            raise ValueError(msg)
        if not bool(torch.isfinite(loss)):
            msg = (
                "loss_func returned a non-finite loss on the first cached training batch; "
                "check the data, the checkpoint and the loss."
            )
            raise ValueError(msg)

    def _explain_error(self, err: BaseException, ckpt_idx: int) -> BaseException | None:
        """Find the cached training batch on which the loss fails and explain it."""
        if not self._batches:
            return None
        func, params = self._loss_and_params(ckpt_idx)
        clear = explain_batches(
            err, self.task, lambda b: func(params, b), self._batches, "full_train_dataloader"
        )
        return None if clear is err else clear

    def mean_hvp_operator(
        self,
        ckpt_idx: int,
        mode: str = "rev-rev",
        regularization: float = 0.0,
        keep_linearizations: bool = False,
    ) -> Callable[[Tensor], Tensor]:
        """Batched HVP of the mean training loss over the cached batches.

        Args:
            ckpt_idx: checkpoint index.
            mode: ``"rev-rev"`` or ``"rev-fwd"``.
            regularization: ``lambda >= 0``; the operator is ``H + lambda I``.
            keep_linearizations: keep each batch's ``"rev-rev"`` linearisation (its
                forward and gradient graph) for the operator's lifetime, so that
                later products only run the double backward: about 1.6x faster per
                product for many sequential products (Arnoldi), at the memory of the
                graphs, capped at :attr:`linearization_budget_bytes` (batches beyond
                the cap are re-linearised on every product).

        Returns:
            A :class:`MeanLossHVP`: ``op(rows)`` maps ``(k, p)`` to ``(k, p)``,
            ``op @ v`` takes ``(p,)`` or ``(p, k)``.
        """
        func, params = self._loss_and_params(ckpt_idx)
        n = self.n_cached
        batches = list(zip(self._batches, self._sizes))
        kept: dict[int, Callable[[Tensor], Tensor]] | None = None
        limit = 0
        if keep_linearizations and mode == "rev-rev" and batches:
            # one vector at a time: larger batches use the BLAS better (the loss is a
            # batch mean, so the size-weighted sum of merged batches is the same mean)
            batches = merge_batches(batches, self.hvp_merge_rows)
            self.task.load_checkpoint(ckpt_idx)
            per_batch = linearization_bytes(func, (params, batches[0][0]))
            limit = self.linearization_budget_bytes // max(per_batch, 1)
            kept = {} if limit > 0 else None

        return MeanLossHVP(
            func,
            params,
            batches,
            n,
            mode,
            regularization,
            load=lambda: self.task.load_checkpoint(ckpt_idx),
            sharded=self._n_total is not None,
            kept=kept,
            limit=limit,
        )

    # ------------------------------------------------------- representations
    def generate_train_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """Per-sample training-loss gradients ``(B, p)`` (checked to be finite)."""
        try:
            return super().generate_train_rep(ckpt_idx, data)
        except NonFiniteGradientError as err:
            raise ValueError(_nonfinite_message("training-loss gradients")) from err

    def generate_test_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """Per-sample target gradients ``(B, p)`` (checked to be finite)."""
        try:
            return super().generate_test_rep(ckpt_idx, data)
        except NonFiniteGradientError as err:
            raise ValueError(_nonfinite_message("target gradients")) from err


class MeanLossHVP:
    """``H + lambda I`` of the mean training loss over cached batches, as an operator.

    ``H v = sum_b (B_b / n) H_b v`` with ``H_b`` the Hessian of ``func(params, batch_b)``
    (a batch mean); under torch.distributed each rank holds its share of the batches
    (``sharded``) and the parts are all-reduced, so every rank must apply it alike.

    Args:
        func: ``func(params, batch)``, the mean loss of a batch.
        params: the flat parameters ``(p,)``.
        batches: ``(batch, size)`` pairs.
        n: number of samples over all batches (and ranks).
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: ``lambda >= 0``.
        load: called before every product (loads the checkpoint's buffers).
        sharded: all-reduce the product over torch.distributed ranks.
        kept: storage of reused batch linearisations (None: re-linearise every time).
        limit: number of batches whose linearisation is kept.
    """

    def __init__(
        self,
        func: Callable,
        params: Tensor,
        batches: Sequence[tuple[Any, int]],
        n: int,
        mode: str,
        regularization: float = 0.0,
        *,
        load: Callable[[], None] | None = None,
        sharded: bool = False,
        kept: dict[int, Callable[[Tensor], Tensor]] | None = None,
        limit: int = 0,
    ) -> None:
        self.func, self.params, self.batches, self.n = func, params, batches, n
        self.mode, self.regularization = mode, regularization
        self._load, self._sharded, self._kept, self._limit = load, sharded, kept, limit
        self.shape = (params.numel(), params.numel())

    def __call__(self, mat: Tensor) -> Tensor:
        """``rows (H + lambda I)`` for ``(k, p)`` rows (``H`` is symmetric)."""
        if self._load is not None:
            self._load()
        out = _mean_batch_hvp(
            self.func, self.params, self.batches, self.n, self.mode, mat, self._kept, self._limit
        )
        if self._sharded:  # each rank holds its share of the batches: sum the parts
            out = all_reduce_sum(out)
        return out.add_(mat, alpha=self.regularization) if self.regularization else out

    def __matmul__(self, v: Tensor) -> Tensor:
        """``(H + lambda I) v`` for ``v`` of shape ``(p,)`` or ``(p, k)``."""
        return self(v[None])[0] if v.dim() == 1 else self(v.T).T


def _mean_batch_hvp(
    func: Callable,
    params: Tensor,
    batches: Sequence[tuple[Any, int]],
    n: int,
    mode: str,
    mat: Tensor,
    kept: dict[int, Callable[[Tensor], Tensor]] | None = None,
    limit: int = 0,
) -> Tensor:
    """``sum_b (B_b / n) H_b mat`` for ``mat`` ``(k, p)``: one batched HVP per batch.

    Every batch's HVP is vmapped over the ``k`` rows at once and accumulated in place;
    the result is checked for NaN/inf once (not per batch). With ``kept``, the first
    ``limit`` batches' linearisations are stored there and reused by later calls.
    """
    work = mat.reshape(-1, params.numel()).to(device=params.device, dtype=params.dtype)
    out = torch.zeros_like(work)
    for i, (batch, size) in enumerate(batches):
        matvec = kept.get(i) if kept is not None else None
        if matvec is None:
            matvec = hvp_matvec(func, (params, batch), 0, mode)
            if kept is not None and i < limit:
                kept[i] = matvec
        out.add_(matvec(work), alpha=size / n)
    if not bool(torch.isfinite(out).all()):
        msg = (
            "The Hessian-vector product of the training loss contains NaN or inf; check "
            "loss_func, the cached data and the checkpoint."
        )
        raise ValueError(msg)
    return out.reshape(mat.shape).to(mat.dtype)


def merge_batches(batches: Sequence[tuple[Any, int]], max_rows: int) -> list[tuple[Any, int]]:
    """Concatenate consecutive ``(batch, size)`` pairs into batches of ``<= max_rows``.

    A batch larger than ``max_rows`` stays as it is. Batches whose fields do not
    concatenate (other structure, keys or trailing shapes, e.g. sequences padded to
    different lengths) are not merged.

    Args:
        batches: ``(batch, size)`` pairs; batches are tensors, tuples/lists or dicts.
        max_rows: most samples per merged batch.

    Returns:
        ``(batch, size)`` pairs covering the same samples in the same order.
    """
    out: list[tuple[Any, int]] = []
    group: list[tuple[Any, int]] = []

    def flush() -> None:
        if len(group) == 1:
            out.append(group[0])
        elif group:
            merged = _concat([b for b, _ in group])
            out.extend([(merged, sum(s for _, s in group))] if merged is not None else group)
        group.clear()

    for batch, size in batches:
        if group and sum(s for _, s in group) + size > max_rows:
            flush()
        group.append((batch, size))
    flush()
    return out


def _concat(batches: list[Any]) -> Any | None:
    """``torch.cat`` of each field over ``batches``, or None if they do not concatenate."""
    try:
        split = [dict_or_tuple_fields(b) for b in batches]
    except TypeError:
        return None
    fields0, rebuild = split[0]
    if any(type(b) is not type(batches[0]) for b in batches) or any(
        len(f) != len(fields0) for f, _ in split
    ):
        return None
    if isinstance(batches[0], Mapping) and any(list(b) != list(batches[0]) for b in batches):
        return None
    cols = list(zip(*(f for f, _ in split)))
    if any(
        len({(t.shape[1:], t.dtype, t.device) for t in col}) != 1 or col[0].dim() == 0
        for col in cols
    ):
        return None
    return rebuild([torch.cat(col) for col in cols])


def dict_or_tuple_fields(batch: Any) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], Any]]:
    """Split a batch into its tensors and a function that rebuilds the structure.

    Args:
        batch: a tensor, a tuple/list or a dict of tensors.

    Returns:
        ``(fields, rebuild)`` with ``rebuild(fields)`` giving a batch of the same kind.

    Raises:
        TypeError: for other batch types or non-tensor fields.
    """
    if isinstance(batch, Tensor):
        return [batch], lambda f: f[0]
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        values = [batch[k] for k in keys]
        rebuild: Callable[[Sequence[Tensor]], Any] = lambda f: dict(zip(keys, f))  # noqa: E731
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
        rebuild = lambda f: tuple(f)  # noqa: E731
    else:
        msg = f"Batches must be tensors, tuples/lists or dicts of tensors, got {type(batch)}."
        raise TypeError(msg)
    if not all(isinstance(v, Tensor) for v in values):
        msg = "Every field of a training batch must be a tensor with the batch dimension first."
        raise TypeError(msg)
    return values, rebuild
