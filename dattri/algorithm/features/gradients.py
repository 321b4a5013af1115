"""Projected per-sample gradients, per checkpoint, shared by TracIn and TRAK.

:class:`GradientFeaturizer` turns one batch into ``(B, d)`` features
``P_k (scale * g_k(z))`` where ``g_k`` is the per-sample gradient (of the loss or of
the target) at checkpoint ``k`` and ``P_k`` the random projection with
``ensemble_id=k`` (or the identity). The projector is built once and reused for every
batch and checkpoint.

This is the *featurize* phase; the rows are kept by
:mod:`dattri.algorithm.store.in_memory` (in memory) or
:mod:`dattri.algorithm.store.memmap_store` (on disk, resumable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.runtime.batching import ReusableBuffer, batch_size_of, slice_batch
from dattri.func.batch_utils import NonFiniteGradientError, nonfinite_rows
from dattri.task import AttributionTask

__all__ = ["GradientFeaturizer", "resolve_projection"]

#: keys accepted in the older ``projector_kwargs`` dict form.
_PROJECTOR_KWARGS = ("proj_dim", "proj_max_batch_size", "proj_seed", "proj_type", "device")
#: fields of a params object that define the projection (others, e.g. a
#: ``RandomProjectionParams``' ``feature_batch_size``/``device``, are ignored).
_PROJECTION_FIELDS = ("proj_dim", "proj_max_batch_size", "proj_seed", "proj_type")


def resolve_projection(
    proj_params: Any,
    projector_kwargs: Mapping[str, Any] | None,
    default_cls: type,
) -> Any | None:
    """Normalise the projection arguments of an attributor.

    Args:
        proj_params: None (defaults) or a projection-params object with
            ``model_dump()`` (e.g. ``TracInProjectionParams(proj_dim=1024)``).
        projector_kwargs: the older dict form, e.g. ``{"proj_dim": 512,
            "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}``; its
            ``device`` is ignored (projection runs on the attributor's device).
        default_cls: the params class used for defaults and for ``projector_kwargs``.

    Returns:
        The params object, or None when ``proj_type`` is ``"identity"`` (no projection).

    Raises:
        ValueError: if both forms are given, or ``projector_kwargs`` has unknown keys.
        TypeError: if ``proj_params`` has no ``model_dump`` or ``projector_kwargs`` is
            not a dict.
    """
    if proj_params is not None and projector_kwargs is not None:
        msg = "Pass either proj_params or projector_kwargs (the older dict form), not both."
        raise ValueError(msg)
    if projector_kwargs is not None:
        if not isinstance(projector_kwargs, Mapping):
            msg = (
                "projector_kwargs must be a dict such as {'proj_dim': 512, "
                f"'proj_max_batch_size': 32, 'proj_seed': 0}}, got "
                f"{type(projector_kwargs).__name__}."
            )
            raise TypeError(msg)
        unknown = sorted(set(projector_kwargs) - set(_PROJECTOR_KWARGS))
        if unknown:
            msg = (
                f"projector_kwargs has unknown keys {unknown}; allowed keys: "
                f"{list(_PROJECTOR_KWARGS)}."
            )
            raise ValueError(msg)
        kwargs = {k: v for k, v in projector_kwargs.items() if k != "device"}
        proj_params = default_cls(**kwargs)
    elif proj_params is None:
        proj_params = default_cls()
    if not callable(getattr(proj_params, "model_dump", None)):
        msg = (
            f"proj_params must be a projection-params object such as {default_cls.__name__}"
            f"(proj_dim=512), got {type(proj_params).__name__}."
        )
        raise TypeError(msg)
    dump = proj_params.model_dump()
    proj_type = getattr(dump.get("proj_type"), "value", dump.get("proj_type"))
    if proj_type == "identity":
        return None
    proj_dim = dump.get("proj_dim")
    if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
        msg = f"proj_params.proj_dim must be a positive int, got {proj_dim!r}."
        raise ValueError(msg)
    return proj_params


class GradientFeaturizer:
    """Projected (and scaled) per-sample gradients of one batch.

    ``features(ckpt_idx, batch) = P_k(scale * g_k(z))`` with ``P_k`` the random
    projection ``random_project(..., proj_params)`` applied with ``ensemble_id=ckpt_idx``
    (the identity when ``proj_params`` is None). Gradients use the un-batched sample
    convention (``keep_batch_dim=False``).

    Args:
        task: the attribution task.
        layer_name: parameters to differentiate (None = all).
        proj_params: projection params (see :func:`resolve_projection`) or None.
        device: device of the features.
        scale: factor applied to the gradients before the projection.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None,
        proj_params: Any | None,
        device: torch.device,
        scale: float = 1.0,
    ) -> None:
        self.task = task
        self.layer_name = layer_name
        self.proj_params = proj_params
        self.device = torch.device(device)
        self.scale = float(scale)
        self.feature_dim = task.num_params(layer_name)
        self._projectors: dict[torch.dtype, Callable] = {}
        #: at most this many samples' full gradients are formed at once (None: whole
        #: batches); set from a ``max_memory`` budget.
        self.grad_rows: int | None = None
        self._buffer = ReusableBuffer()

    @property
    def out_dim(self) -> int:
        """Dimension ``d`` of the features."""
        if self.proj_params is None:
            return self.feature_dim
        return int(self.proj_params.model_dump()["proj_dim"])

    def _projector(self, dtype: torch.dtype) -> Callable:
        if dtype not in self._projectors:
            from dattri.func.projection import random_project
            from dattri.params.projection import RandomProjectionParams

            template = torch.zeros(1, self.feature_dim, dtype=dtype, device=self.device)
            dump = self.proj_params.model_dump()
            fields = {k: dump[k] for k in _PROJECTION_FIELDS if k in dump}
            params = RandomProjectionParams(feature_batch_size=1, device=self.device, **fields)
            self._projectors[dtype] = random_project(template, params)
        return self._projectors[dtype]

    def project(self, grads: Tensor, ckpt_idx: int) -> Tensor:
        """Scale and project ``(B, p)`` gradients to ``(B, d)`` features.

        The projection is linear, so the scale is applied to the ``(B, d)`` result
        rather than to the ``(B, p)`` gradients (no ``(B, p)`` temporary).
        """
        if self.proj_params is None:
            return grads * self.scale if self.scale != 1.0 else grads
        feats = self._projector(grads.dtype)(grads, ensemble_id=ckpt_idx)
        return feats.mul_(self.scale) if self.scale != 1.0 else feats

    def apply_budget(self, max_memory: int | None) -> None:
        """Form at most the per-sample gradients that fit a share of ``max_memory``.

        Args:
            max_memory: bytes (None: whole loader batches at once).
        """
        if max_memory is not None:
            from dattri.algorithm.score.tiles import plan_tiles

            plan = plan_tiles(1, 1, 1, max_memory, num_params=self.feature_dim, itemsize=8)
            self.grad_rows = plan.grad_rows

    def reuse_buffers(self) -> AbstractContextManager[None]:
        """Within this block, form every batch's gradients in one reused buffer.

        Only used when the gradients are projected (the ``(B, d)`` features are
        always fresh tensors); see :class:`~dattri.algorithm.runtime.batching.ReusableBuffer`.
        """
        return self._buffer.active()

    def _grad_buffer(self, rows: int) -> Tensor | None:
        if self.proj_params is None:
            return None
        cols, dtype, device = self.task.grad_layout(self.layer_name)
        return self._buffer.get(rows, cols, dtype, device)

    @property
    def _checks_features(self) -> bool:
        """Whether NaN/inf is detected on the projected features instead of the gradients.

        Dense and sparse-JL projections mix every coordinate into some feature, so a
        feature row is non-finite whenever its gradient row is: checking ``(B, d)``
        instead of ``(B, p)`` values finds the same samples. Coordinate-subset
        projections (``random_mask``, ``grass``) would miss unselected coordinates,
        so they (and the identity) check the gradients.
        """
        if self.proj_params is None:
            return False
        proj_type = self.proj_params.model_dump().get("proj_type")
        return str(getattr(proj_type, "value", proj_type)) in ("normal", "rademacher", "sjlt")

    def _nonfinite(self, indices: list[int], ckpt_idx: int, target: bool, where: str) -> str:
        which = "target" if target else "loss"
        return (
            f"Non-finite (NaN/inf) {which} gradients at checkpoint {ckpt_idx} for "
            f"samples {indices[:10]} (positions within the batch{where}). Check the model, "
            "the data and the loss (e.g. log(0)); non-finite gradients are not zeroed "
            "silently."
        )

    def grads(
        self, ckpt_idx: int, batch: Any, target: bool, where: str = "", check_finite: bool = True
    ) -> Tensor:
        """Per-sample gradients ``(B, p)`` of one (device-resident) batch.

        Inside :meth:`reuse_buffers` (and with a projection) the result is a view of
        a buffer that the next call overwrites.

        Raises:
            ValueError: if a gradient is NaN or infinite (upstream zeroed them silently)
                and ``check_finite``.
        """
        try:
            return self.task.per_sample_grads(
                batch,
                ckpt_idx,
                self.layer_name,
                target=target,
                keep_batch_dim=False,
                out=self._grad_buffer(batch_size_of(batch)),
                check_finite=check_finite,
                where=f"batch{where}" if where else "a batch",
            )
        except NonFiniteGradientError as err:
            raise ValueError(self._nonfinite(err.indices, ckpt_idx, target, where)) from err

    def _features(self, ckpt_idx: int, batch: Any, target: bool, where: str) -> Tensor:
        on_features = self._checks_features
        grads = self.grads(ckpt_idx, batch, target, where, check_finite=not on_features)
        feats = self.project(grads, ckpt_idx)
        if on_features:
            bad = nonfinite_rows(feats)
            if bool(bad.any()):
                idx = bad.nonzero().flatten().tolist()
                raise ValueError(self._nonfinite(idx, ckpt_idx, target, where))
        return feats

    def __call__(self, ckpt_idx: int, batch: Any, target: bool = False, where: str = "") -> Tensor:
        """Features ``(B, d)`` of one batch at one checkpoint (in ``grad_rows`` chunks).

        Raises:
            ValueError: if a gradient of the batch is NaN or infinite.
        """
        size = batch_size_of(batch)
        if self.grad_rows is None or size <= self.grad_rows:
            return self._features(ckpt_idx, batch, target, where)
        parts = []
        for start in range(0, size, self.grad_rows):
            sub = slice_batch(batch, slice(start, start + self.grad_rows))
            part_where = f"{where}, rows from {start}"
            parts.append(self._features(ckpt_idx, sub, target, part_where))
        return torch.cat(parts)

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable description of the features (for a store manifest)."""
        proj = None
        if self.proj_params is not None:
            dump = self.proj_params.model_dump()
            proj = {
                k: str(getattr(dump[k], "value", dump[k])) for k in _PROJECTION_FIELDS if k in dump
            }
            proj.pop("proj_max_batch_size", None)
        return {
            "layers": self.task.selected_param_names(self.layer_name),
            "feature_dim": self.feature_dim,
            "out_dim": self.out_dim,
            "projection": proj,
            "scale": self.scale,
        }
