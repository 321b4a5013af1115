"""Random projections of (per-sample) gradients, in pure torch.

Types (:class:`ProjectionType`), for features ``X`` of shape ``(B, p)``:

- ``identity``: ``X`` unchanged (``proj_dim`` ignored; a tensor input is
  returned without copy).
- ``normal`` / ``rademacher``: ``X P / sqrt(k)`` with ``P`` of i.i.d. standard
  normal entries (inverse CDF of 16-bit uniforms: an equiprobable
  65536-level discretisation of N(0, 1), unit variance, stored as float16) or
  ±1 entries.
- ``sjlt``: sparse JL transform; every input coordinate is added, with a random
  sign, to ``c`` random output buckets (default ``c = 1``), scaled by
  ``1/sqrt(c)``.
- ``random_mask``: the ``k`` coordinates of a sorted random subset, not rescaled.
- ``grass``: random mask to ``k * grass_multiplier`` coordinates (not
  rescaled), then an SJLT (``c = 1``) to ``k``.

All types run on CPU and CUDA without compiled extensions and are
deterministic: the same ``(seed, ensemble_id)`` gives the same projection on
every device, for every batch size, and for a dict of per-parameter features
(projected block by block) as for their concatenation. Output dtype equals
input dtype; accumulation is in float32 (float64 for float64 inputs). See
:mod:`dattri.func.projection_engine` for the memory policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dattri.func.projection_arnoldi import ArnoldiProjector, arnoldi_project
from dattri.func.projection_engine import (
    DEFAULT_MAX_MEMORY_BYTES,
    AbstractProjector,
    ProjectionEngine,
    ProjectionType,
    check_positive_int,
    parse_proj_type,
)

__all__ = [
    "DEFAULT_MAX_MEMORY_BYTES",
    "AbstractProjector",
    "ArnoldiProjector",
    "BasicProjector",
    "ChunkedCudaProjector",
    "CudaProjector",
    "ProjectionType",
    "arnoldi_project",
    "make_random_projector",
    "random_project",
]


class _EngineProjector(AbstractProjector):
    """Projector backed by a :class:`ProjectionEngine`."""

    engine: ProjectionEngine

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: ProjectionType | str,
        device: str | torch.device,
        dtype: torch.dtype,
        **engine_options: Any,
    ) -> None:
        """Validate the settings (as :class:`BasicProjector`) and create the engine.

        ``engine_options`` are the keyword options of :class:`ProjectionEngine`.
        """
        super().__init__(feature_dim, proj_dim, seed, proj_type, device)
        self.dtype = dtype
        self.engine = ProjectionEngine(
            feature_dim, proj_dim, proj_type, seed, device, dtype=dtype, **engine_options
        )

    def project(self, features: Tensor | Mapping[str, Tensor], ensemble_id: int = 0) -> Tensor:
        """Project features.

        Args:
            features: ``(B, feature_dim)`` tensor, or a dict of ``(B, ...)``
                tensors whose flattened sizes sum to ``feature_dim`` (projected
                block by block, never concatenated).
            ensemble_id: Selects an independent random projection.

        Returns:
            ``(B, proj_dim)`` tensor (``(B, feature_dim)`` for ``identity``) on
            the projector's device, with the dtype of ``features``.
        """
        return self.engine.project(features, ensemble_id)

    def _project_work(self, features: Tensor | Mapping[str, Tensor], ensemble_id: int) -> Tensor:
        return self.engine.project(features, ensemble_id, keep_work_dtype=True)

    def free_memory(self) -> None:
        """Drop all cached random matrices (regenerated on demand)."""
        self.engine.free_memory()


class BasicProjector(_EngineProjector):
    """Random projector for any device (the CPU default of upstream dattri)."""

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: ProjectionType | str,
        device: str | torch.device,
        block_size: int = 100,
        dtype: torch.dtype = torch.float32,
        ensemble_id: int = 0,
        *,
        grass_multiplier: int = 4,
        sjlt_nnz: int = 1,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        param_sizes: Sequence[int] | None = None,
        max_batch_size: int | None = None,
        verbose: bool = False,
    ) -> None:
        """Create the projector (random matrices are generated lazily).

        Args:
            feature_dim: Input dimension ``p``.
            proj_dim: Output dimension ``k``.
            seed: Integer seed.
            proj_type: A :class:`ProjectionType` (or its name, or ``"grass_N"``).
            device: Device of the random matrices and of the output.
            block_size: Accepted for upstream compatibility and validated;
                chunking is sized in bytes instead (random entries do not depend
                on it).
            dtype: Minimum accumulation dtype (``torch.float64`` forces float64
                accumulation; output dtype always follows the input).
            ensemble_id: Default ensemble id of :meth:`project`.
            grass_multiplier: GraSS mask size factor.
            sjlt_nnz: Non-zeros per input coordinate of ``sjlt``.
            max_memory_bytes: Cache budget for random matrices.
            param_sizes: Optional per-parameter sizes for checking dict inputs.
            max_batch_size: Optional cap on rows projected at once.
            verbose: Show a tqdm bar while a dense matrix is generated.
        """
        super().__init__(
            feature_dim,
            proj_dim,
            seed,
            proj_type,
            device,
            dtype,
            grass_multiplier=grass_multiplier,
            sjlt_nnz=sjlt_nnz,
            max_memory_bytes=max_memory_bytes,
            param_sizes=param_sizes,
            max_batch_size=max_batch_size,
            verbose=verbose,
        )
        self.block_size = check_positive_int(block_size, "block_size")
        self.ensemble_id = ensemble_id

    def project(
        self,
        features: Tensor | Mapping[str, Tensor],
        ensemble_id: int | None = None,
    ) -> Tensor:
        """Project features (see :meth:`_EngineProjector.project`).

        Args:
            features: ``(B, feature_dim)`` tensor or dict of ``(B, ...)`` tensors.
            ensemble_id: Ensemble id; defaults to the constructor's.

        Returns:
            ``(B, proj_dim)`` tensor with the dtype of ``features``.
        """
        eid = self.ensemble_id if ensemble_id is None else ensemble_id
        return self.engine.project(features, eid)


class CudaProjector(_EngineProjector):
    """Random projector on a CUDA device (pure torch, no extension needed)."""

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: ProjectionType | str,
        device: str | torch.device,
        dtype: torch.dtype = torch.float32,
        grass_multiplier: int = 4,
        *,
        max_batch_size: int | None = None,
        sjlt_nnz: int = 1,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        param_sizes: Sequence[int] | None = None,
        verbose: bool = False,
    ) -> None:
        """Create the projector.

        Args:
            feature_dim: Input dimension ``p``.
            proj_dim: Output dimension ``k``.
            seed: Integer seed.
            proj_type: A :class:`ProjectionType` (or its name, or ``"grass_N"``).
            device: A CUDA device.
            dtype: Minimum accumulation dtype.
            grass_multiplier: GraSS mask size factor.
            max_batch_size: Optional cap on rows projected at once.
            sjlt_nnz: Non-zeros per input coordinate of ``sjlt``.
            max_memory_bytes: Cache budget for random matrices.
            param_sizes: Optional per-parameter sizes for checking dict inputs.
            verbose: Show a tqdm bar while a dense matrix is generated.

        Raises:
            ValueError: If ``device`` is not a CUDA device.
        """
        if torch.device(device).type != "cuda":
            msg = (
                f"CudaProjector needs a CUDA device, got {device!r}; use "
                "BasicProjector (or make_random_projector) on other devices."
            )
            raise ValueError(msg)
        super().__init__(
            feature_dim,
            proj_dim,
            seed,
            proj_type,
            device,
            dtype,
            grass_multiplier=grass_multiplier,
            sjlt_nnz=sjlt_nnz,
            max_memory_bytes=max_memory_bytes,
            param_sizes=param_sizes,
            max_batch_size=max_batch_size,
            verbose=verbose,
        )


class ChunkedCudaProjector:
    """Sum of projections of consecutive parameter chunks (upstream API).

    Chunk ``i`` covers ``dim_per_chunk[i]`` consecutive input coordinates and
    is projected by ``projector_per_chunk[i]``; the results are summed in the
    accumulation dtype. Works on any device despite its name.
    """

    def __init__(
        self,
        projector_per_chunk: Sequence[AbstractProjector],
        max_chunk_size: int,
        dim_per_chunk: Sequence[int],
        feature_batch_size: int,
        device: str | torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        proj_max_batch_size: int | None = None,
    ) -> None:
        """Store the chunk projectors.

        Args:
            projector_per_chunk: One projector per chunk (same ``proj_dim``).
            max_chunk_size: Upper bound on any chunk size (validated).
            dim_per_chunk: Number of input coordinates of each chunk.
            feature_batch_size: Expected batch size (validated, informational).
            device: Output device.
            dtype: Kept for upstream compatibility (output follows the input).
            proj_max_batch_size: Accepted for upstream compatibility.

        Raises:
            ValueError: On inconsistent chunk settings.
        """
        self.projector_per_chunk = list(projector_per_chunk)
        self.dim_per_chunk = [check_positive_int(d, "dim_per_chunk") for d in dim_per_chunk]
        self.max_chunk_size = check_positive_int(max_chunk_size, "max_chunk_size")
        self.feature_batch_size = check_positive_int(feature_batch_size, "feature_batch_size")
        if proj_max_batch_size is not None:
            check_positive_int(proj_max_batch_size, "proj_max_batch_size")
        self.device = torch.device(device)
        self.dtype = dtype
        if len(self.projector_per_chunk) != len(self.dim_per_chunk):
            msg = (
                f"got {len(self.projector_per_chunk)} projectors for "
                f"{len(self.dim_per_chunk)} chunks."
            )
            raise ValueError(msg)
        if not self.projector_per_chunk:
            msg = "projector_per_chunk is empty."
            raise ValueError(msg)
        if max(self.dim_per_chunk) > self.max_chunk_size:
            msg = (
                f"a chunk has {max(self.dim_per_chunk)} coordinates, more than "
                f"max_chunk_size={self.max_chunk_size}."
            )
            raise ValueError(msg)
        dims = {p.proj_dim for p in self.projector_per_chunk}
        if len(dims) != 1:
            msg = f"all chunk projectors must share proj_dim, got {sorted(dims)}."
            raise ValueError(msg)
        self.proj_dim = dims.pop()

    @staticmethod
    def _project_one(
        projector: AbstractProjector, feats: Tensor | dict[str, Tensor], eid: int
    ) -> Tensor:
        if isinstance(projector, _EngineProjector):
            return projector._project_work(feats, eid)
        return projector.project(feats, eid)

    def project(self, features: Tensor, ensemble_id: int) -> Tensor:
        """Project a ``(B, sum(dim_per_chunk))`` tensor chunk by chunk.

        Args:
            features: Feature tensor.
            ensemble_id: Ensemble id passed to every chunk projector.

        Returns:
            ``(B, proj_dim)`` tensor with the dtype of ``features``.

        Raises:
            TypeError: If ``features`` is a dict (use :meth:`dict_project`).
            ValueError: If the feature dimension does not match the chunks.
        """
        if not isinstance(features, Tensor):
            msg = (
                "ChunkedCudaProjector.project only accepts Tensor inputs; use "
                "dict_project for dicts of per-parameter features."
            )
            raise TypeError(msg)
        total = sum(self.dim_per_chunk)
        if features.dim() != 2 or features.shape[1] != total:
            msg = f"features must have shape (batch_size, {total}), got {tuple(features.shape)}."
            raise ValueError(msg)
        out = None
        start = 0
        for projector, dim in zip(self.projector_per_chunk, self.dim_per_chunk):
            part = self._project_one(projector, features[:, start : start + dim], ensemble_id)
            out = part if out is None else out + part.to(out.device)
            start += dim
        return out.to(features.dtype)

    def dict_project(self, features: Mapping[str, Tensor], ensemble_id: int) -> Tensor:
        """Project a dict of per-parameter ``(B, ...)`` tensors chunk by chunk.

        Consecutive dict entries are grouped into the chunks; an entry may not
        straddle two chunks.

        Args:
            features: Dict of per-parameter features.
            ensemble_id: Ensemble id passed to every chunk projector.

        Returns:
            ``(B, proj_dim)`` tensor with the dtype of the features.

        Raises:
            ValueError: If the entries do not tile the chunks exactly.
        """
        items = list(features.items())
        out = None
        pos = 0
        for chunk_idx, (projector, dim) in enumerate(
            zip(self.projector_per_chunk, self.dim_per_chunk)
        ):
            group: dict[str, Tensor] = {}
            size = 0
            while size < dim and pos < len(items):
                name, value = items[pos]
                group[name] = value
                size += math.prod(value.shape[1:])
                pos += 1
            if size != dim:
                msg = (
                    f"dict entries do not tile chunk {chunk_idx}: got {size} "
                    f"coordinates, expected {dim}."
                )
                raise ValueError(msg)
            part = self._project_one(projector, group, ensemble_id)
            out = part if out is None else out + part.to(out.device)
        if pos != len(items):
            msg = f"{len(items) - pos} dict entries left after the last chunk."
            raise ValueError(msg)
        return out.to(items[0][1].dtype)

    def free_memory(self) -> None:
        """Free the memory of every chunk projector."""
        for projector in self.projector_per_chunk:
            projector.free_memory()


def _param_sizes(param_shape_list: Sequence[Any]) -> list[int]:
    """Number of elements of each entry of ``param_shape_list``.

    Args:
        param_shape_list: Ints (sizes) or shapes (``torch.Size``/tuples).

    Returns:
        List of sizes.

    Raises:
        TypeError: For entries that are neither ints nor shapes.
    """
    sizes = []
    for shape in param_shape_list:
        if isinstance(shape, int) and not isinstance(shape, bool):
            sizes.append(shape)
        elif isinstance(shape, Sequence) and all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            size = 1
            for d in shape:
                size *= d
            sizes.append(size)
        else:
            msg = f"param_shape_list entries must be ints or shapes, got {shape!r}."
            raise TypeError(msg)
    return sizes


def make_random_projector(
    param_shape_list: Sequence[Any],
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int,
    device: str | torch.device,
    proj_seed: int = 0,
    proj_type: ProjectionType | str = ProjectionType.sjlt,
    *,
    dtype: torch.dtype = torch.float32,
    grass_multiplier: int = 4,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> AbstractProjector:
    """Create the projector for features made of parameters of given shapes.

    No chunking is needed (the implementation has no index-size limit), so a
    :class:`CudaProjector` is returned on CUDA and a :class:`BasicProjector`
    elsewhere.

    Args:
        param_shape_list: Per-parameter shapes (or sizes) of one sample.
        feature_batch_size: Batch size of the features (validated).
        proj_dim: Output dimension.
        proj_max_batch_size: Maximum rows projected at once.
        device: Device.
        proj_seed: Seed.
        proj_type: Projection type (``"grass_N"`` sets the multiplier).
        dtype: Minimum accumulation dtype (output follows the input).
        grass_multiplier: GraSS mask size factor.
        max_memory_bytes: Cache budget for random matrices.

    Returns:
        A projector with ``feature_dim = sum of parameter sizes``.

    Raises:
        ValueError: If the parameter list is empty.
    """
    sizes = _param_sizes(param_shape_list)
    if not sizes or sum(sizes) < 1:
        msg = "param_shape_list must describe at least one element."
        raise ValueError(msg)
    check_positive_int(feature_batch_size, "feature_batch_size")
    kwargs = {
        "grass_multiplier": grass_multiplier,
        "max_memory_bytes": max_memory_bytes,
        "param_sizes": sizes,
        "max_batch_size": check_positive_int(proj_max_batch_size, "proj_max_batch_size"),
    }
    if torch.device(device).type == "cuda":
        return CudaProjector(sum(sizes), proj_dim, proj_seed, proj_type, device, dtype, **kwargs)
    return BasicProjector(sum(sizes), proj_dim, proj_seed, proj_type, device, dtype=dtype, **kwargs)


_PARAM_FIELDS = (
    "proj_dim",
    "proj_max_batch_size",
    "proj_seed",
    "proj_type",
    "feature_batch_size",
    "device",
)


def random_project(
    feature: Tensor | Mapping[str, Tensor],
    proj_params: Any,
) -> Callable[..., Tensor]:
    """Build a projection function from a sample of the features.

    Args:
        feature: A sample ``(feature_batch_size, D)`` tensor or a dict of
            ``(feature_batch_size, ...)`` tensors; used only to infer the
            per-parameter sizes (``numel // feature_batch_size``) and dtype.
        proj_params: A :class:`dattri.params.projection.RandomProjectionParams`
            (or any object with its fields: ``proj_dim``,
            ``proj_max_batch_size``, ``proj_seed``, ``proj_type``,
            ``feature_batch_size``, ``device``). Every type is valid on every
            device; ``proj_type="grass_N"`` sets the GraSS multiplier to ``N``.

    Returns:
        ``f(feature, ensemble_id=0) -> (B, proj_dim)`` tensor.

    Raises:
        TypeError: If ``proj_params`` lacks a field or ``feature`` has a bad type.
        ValueError: For an unknown ``proj_type`` or sizes that are not a multiple
            of ``feature_batch_size``.
    """
    missing = [f for f in _PARAM_FIELDS if not hasattr(proj_params, f)]
    if missing:
        msg = f"proj_params lacks field(s) {missing}; pass a RandomProjectionParams."
        raise TypeError(msg)
    batch = check_positive_int(proj_params.feature_batch_size, "feature_batch_size")
    proj_type, multiplier = parse_proj_type(proj_params.proj_type)
    if isinstance(feature, Tensor):
        values = [("feature", feature)]
    elif isinstance(feature, Mapping):
        values = list(feature.items())
    else:
        msg = f"feature must be a Tensor or dict of Tensors, got {type(feature).__name__}."
        raise TypeError(msg)
    if not values:
        msg = "feature dict is empty."
        raise ValueError(msg)
    sizes = []
    for name, value in values:
        if value.numel() % batch != 0:
            msg = (
                f"{name} has {value.numel()} elements, not a multiple of "
                f"feature_batch_size={batch}."
            )
            raise ValueError(msg)
        sizes.append(value.numel() // batch)
    dtype = values[0][1].dtype
    projector = make_random_projector(
        sizes,
        batch,
        proj_params.proj_dim,
        proj_params.proj_max_batch_size,
        proj_params.device,
        proj_seed=proj_params.proj_seed,
        proj_type=proj_type,
        dtype=dtype if dtype.is_floating_point else torch.float32,
        grass_multiplier=multiplier if multiplier is not None else 4,
    )

    def _project(feature: Tensor | Mapping[str, Tensor], ensemble_id: int = 0) -> Tensor:
        return projector.project(feature, ensemble_id)

    _project.projector = projector
    return _project
