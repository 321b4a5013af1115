"""Pure-torch engine behind every random projector of :mod:`dattri.func.projection`.

The engine projects ``(B, p)`` features (or a dict of per-parameter
``(B, ...)`` features, block by block, without concatenating them) to
``(B, k)``. Randomness comes from :mod:`dattri.func.projection_rng`, so any
block of the projection can be regenerated on any device and equals the same
block of the full projection.

Memory policy: the random matrix (dense types, stored as float16, 2 bytes per
entry) or the bucket/sign vectors (``sjlt``) are cached per ensemble member up
to ``max_memory_bytes`` in total (least recently used member evicted first).
A dense matrix that does not fit is cached for as many leading rows as fit and
the remaining rows are regenerated chunk by chunk on every call.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from enum import Enum

import torch
from torch import Tensor

from dattri.func.projection_rng import derive_key, normal_block, rademacher_block
from dattri.func.projection_states import DenseState, MaskState, SjltState

DEFAULT_MAX_MEMORY_BYTES = 1 << 30
"""Default cache budget (1 GiB) for the random matrices of one projector."""


class ProjectionType(str, Enum):
    """Supported random projection types."""

    identity = "identity"
    normal = "normal"
    rademacher = "rademacher"
    sjlt = "sjlt"
    random_mask = "random_mask"
    grass = "grass"


_SALT = {
    ProjectionType.normal: 0x6E6F726D,
    ProjectionType.rademacher: 0x72616465,
    ProjectionType.sjlt: 0x736A6C74,
    ProjectionType.random_mask: 0x6D61736B,
    ProjectionType.grass: 0x67726173,
}
_GRASS_SJLT_SALT = 0x67736A6C


def parse_proj_type(value: object) -> tuple[ProjectionType, int | None]:
    """Parse a projection type, including the ``"grass_N"`` shorthand.

    Args:
        value: A :class:`ProjectionType` or one of its string values, or
            ``"grass_N"`` with ``N`` a positive integer (the mask multiplier).

    Returns:
        ``(proj_type, multiplier)``; ``multiplier`` is ``N`` for ``"grass_N"``
        and ``None`` otherwise.

    Raises:
        TypeError: If ``value`` is not a string.
        ValueError: If ``value`` names no supported type.
    """
    if not isinstance(value, str):
        msg = f"proj_type must be a str or ProjectionType, got {type(value).__name__}."
        raise TypeError(msg)
    text = value.value if isinstance(value, ProjectionType) else value
    if text.startswith("grass_"):
        suffix = text[len("grass_") :]
        if suffix.isdigit() and int(suffix) > 0:
            return ProjectionType.grass, int(suffix)
    try:
        return ProjectionType(text), None
    except ValueError:
        valid = ", ".join(t.value for t in ProjectionType)
        msg = f"Unknown proj_type {value!r}; valid: {valid} or 'grass_N' (N >= 1)."
        raise ValueError(msg) from None


def check_int(
    value: object, name: str, *, minimum: int | None = None, expected: str = "an int"
) -> int:
    """Validate an integer argument (bools rejected), optionally bounded below.

    Args:
        value: Value to check.
        name: Argument name used in the error message.
        minimum: Smallest allowed value, if any.
        expected: What the argument must be, for the message
            (``"{name} must be {expected}, got ..."``).

    Returns:
        ``value`` as a Python int.

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool):
        msg = f"{name} must be {expected}, got bool."
        raise TypeError(msg)
    try:
        as_int = operator.index(value)
    except TypeError:
        msg = f"{name} must be {expected}, got {type(value).__name__}."
        raise TypeError(msg) from None
    if minimum is not None and as_int < minimum:
        msg = f"{name} must be {expected}, got {as_int}."
        raise ValueError(msg)
    return as_int


def check_positive_int(value: object, name: str) -> int:
    """Validate that ``value`` is a positive integer (see :func:`check_int`).

    Args:
        value: Value to check.
        name: Argument name used in the error message.

    Returns:
        ``value`` as a Python int.
    """
    return check_int(value, name, minimum=1, expected="a positive int")


class AbstractProjector(ABC):
    """Interface shared by all projectors: ``project`` and ``free_memory``."""

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: ProjectionType | str | None,
        device: str | torch.device,
    ) -> None:
        """Store and validate the common settings.

        Args:
            feature_dim: Input dimension ``p``.
            proj_dim: Output dimension ``k``.
            seed: Integer seed.
            proj_type: Projection type, or ``None`` for non-random projectors.
            device: Device of the output.
        """
        self.feature_dim = check_positive_int(feature_dim, "feature_dim")
        self.proj_dim = check_positive_int(proj_dim, "proj_dim")
        self.seed = check_int(seed, "seed")
        self.proj_type = None if proj_type is None else parse_proj_type(proj_type)[0]
        self.device = torch.device(device)

    @abstractmethod
    def project(self, features: Tensor | dict[str, Tensor], ensemble_id: int) -> Tensor:
        """Project a batch of features.

        Args:
            features: ``(B, feature_dim)`` tensor (or dict of ``(B, ...)``).
            ensemble_id: Selects an independent random projection.

        Returns:
            ``(B, proj_dim)`` tensor.
        """

    @abstractmethod
    def free_memory(self) -> None:
        """Release cached matrices."""


class ProjectionEngine:
    """Shared implementation of all random projectors (see module docstring)."""

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        proj_type: ProjectionType | str,
        seed: int,
        device: str | torch.device,
        *,
        dtype: torch.dtype = torch.float32,
        grass_multiplier: int = 4,
        sjlt_nnz: int = 1,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        param_sizes: Sequence[int] | None = None,
        max_batch_size: int | None = None,
        chunk_bytes: int | None = None,
        verbose: bool = False,
    ) -> None:
        """Validate the configuration; randomness is generated lazily.

        Args:
            feature_dim: Input dimension ``p``.
            proj_dim: Output dimension ``k`` (ignored by ``identity``).
            proj_type: Projection type (``"grass_N"`` sets the multiplier).
            seed: Integer seed.
            device: Device of the random matrices and of the output.
            dtype: Minimum accumulation dtype (``torch.float64`` forces float64;
                otherwise float32 is used unless the input is float64).
            grass_multiplier: GraSS mask size is ``proj_dim * grass_multiplier``.
            sjlt_nnz: Non-zeros per input coordinate of the SJLT (``c``).
            max_memory_bytes: Cache budget for random matrices (all ensemble
                members together).
            param_sizes: Optional per-parameter sizes; dict inputs are checked
                against them.
            max_batch_size: Optional cap on rows projected at once.
            chunk_bytes: Size of the working chunks of dense types (default
                32 MiB on CPU, 256 MiB on CUDA; ``sjlt`` uses a quarter). Larger
                chunks mean fewer, larger torch ops, which matters on busy CPUs.
            verbose: Show a tqdm bar while a dense matrix is generated and cached.

        Raises:
            TypeError: For arguments of the wrong type.
            ValueError: For invalid values.
        """
        self.feature_dim = check_positive_int(feature_dim, "feature_dim")
        self.proj_dim = check_positive_int(proj_dim, "proj_dim")
        self.proj_type, parsed_multiplier = parse_proj_type(proj_type)
        self.grass_multiplier = check_positive_int(grass_multiplier, "grass_multiplier")
        if parsed_multiplier is not None:
            self.grass_multiplier = parsed_multiplier
        self.sjlt_nnz = check_positive_int(sjlt_nnz, "sjlt_nnz")
        if isinstance(seed, bool) or not isinstance(seed, int):
            try:
                seed = operator.index(seed)
            except TypeError:
                msg = f"seed must be an int, got {type(seed).__name__}."
                raise TypeError(msg) from None
        self.seed = int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            msg = f"dtype must be a floating torch.dtype, got {dtype!r}."
            raise TypeError(msg)
        self.dtype = dtype
        if isinstance(max_memory_bytes, bool) or not isinstance(max_memory_bytes, int):
            msg = "max_memory_bytes must be a non-negative int."
            raise TypeError(msg)
        if max_memory_bytes < 0:
            msg = f"max_memory_bytes must be >= 0, got {max_memory_bytes}."
            raise ValueError(msg)
        self.max_memory_bytes = max_memory_bytes
        self.max_batch_size = (
            None if max_batch_size is None else check_positive_int(max_batch_size, "max_batch_size")
        )
        default_chunk = (256 if self.device.type == "cuda" else 32) << 20
        self.chunk_bytes = (
            default_chunk if chunk_bytes is None else check_positive_int(chunk_bytes, "chunk_bytes")
        )
        self.param_sizes = None
        if param_sizes is not None:
            self.param_sizes = [int(s) for s in param_sizes]
            if sum(self.param_sizes) != self.feature_dim:
                msg = (
                    f"param sizes sum to {sum(self.param_sizes)} but "
                    f"feature_dim={self.feature_dim}."
                )
                raise ValueError(msg)
        if self.proj_type == ProjectionType.random_mask and self.proj_dim > self.feature_dim:
            msg = (
                f"random_mask needs proj_dim <= feature_dim, got proj_dim="
                f"{self.proj_dim} > feature_dim={self.feature_dim}."
            )
            raise ValueError(msg)
        if self.proj_type == ProjectionType.sjlt and self.sjlt_nnz > self.proj_dim:
            msg = f"sjlt_nnz={self.sjlt_nnz} must be <= proj_dim={self.proj_dim}."
            raise ValueError(msg)
        self.verbose = bool(verbose)
        self._states: OrderedDict[int, object] = OrderedDict()
        self._work: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ state
    def output_dim(self) -> int:
        """Output dimension (``feature_dim`` for identity, else ``proj_dim``).

        Returns:
            The number of output columns.
        """
        if self.proj_type == ProjectionType.identity:
            return self.feature_dim
        return self.proj_dim

    def free_memory(self) -> None:
        """Drop every cached random matrix and scratch buffer."""
        self._states.clear()
        self._work.clear()

    def cached_bytes(self) -> int:
        """Bytes held by the caches of all ensemble members.

        Returns:
            Total cache size in bytes.
        """
        return sum(state.nbytes for state in self._states.values())

    def _budget_for(self, wanted: int) -> int:
        """Evict least recently used members until ``wanted`` bytes fit.

        Args:
            wanted: Bytes the new member would like to cache.

        Returns:
            Bytes available for the new member (may be less than ``wanted``).
        """
        while self._states and self.cached_bytes() + wanted > self.max_memory_bytes:
            self._states.popitem(last=False)
        return max(0, self.max_memory_bytes - self.cached_bytes())

    def _state(self, ensemble_id: int) -> object:
        state = self._states.get(ensemble_id)
        if state is not None:
            self._states.move_to_end(ensemble_id)
            return state
        ptype, p, k = self.proj_type, self.feature_dim, self.proj_dim
        key = derive_key(self.seed, ensemble_id, _SALT[ptype])
        if ptype in (ProjectionType.normal, ProjectionType.rademacher):
            budget = self._budget_for(p * k * 2)
            fn = normal_block if ptype == ProjectionType.normal else rademacher_block
            state = DenseState(
                fn,
                key,
                p,
                k,
                self.device,
                cache_rows=min(p, budget // (2 * k)),
                chunk_rows=max(1, self.chunk_bytes // (16 * k)),
                verbose=self.verbose,
                copy_rows=max(1, self.chunk_bytes // (4 * k)),
                gen_rows=max(1, self.chunk_bytes // (64 * k)),
                max_bytes=budget,
            )
        elif ptype == ProjectionType.sjlt:
            wanted = self.sjlt_nnz * p * 12
            budget = self._budget_for(wanted)
            state = SjltState(
                key,
                p,
                k,
                self.sjlt_nnz,
                self.device,
                cache=wanted <= budget,
                chunk_bytes=max(1, self.chunk_bytes // 4),
            )
        elif ptype == ProjectionType.random_mask:
            state = MaskState(key, p, k, self.device)
        else:
            mask_dim = min(p, k * self.grass_multiplier)
            sjlt_key = derive_key(self.seed, ensemble_id, _GRASS_SJLT_SALT)
            state = MaskState(key, p, mask_dim, self.device, sjlt_key, k)
        self._states[ensemble_id] = state
        return state

    # ------------------------------------------------------------------ input
    def _blocks(
        self, features: Tensor | Mapping[str, Tensor]
    ) -> tuple[list[Tensor], int, torch.dtype]:
        """Check the input and return its ``(B, n_i)`` blocks on ``self.device``.

        Args:
            features: ``(B, feature_dim)`` tensor or dict of ``(B, ...)`` tensors.

        Returns:
            ``(blocks, batch_size, dtype)``.

        Raises:
            TypeError: For a non-tensor input or a non-floating dtype.
            ValueError: For shape mismatches.
        """
        if isinstance(features, Tensor):
            if features.dim() != 2 or features.shape[1] != self.feature_dim:
                msg = (
                    "features must have shape (batch_size, feature_dim="
                    f"{self.feature_dim}), got {tuple(features.shape)}; reshape "
                    "it to (batch_size, -1) or pass a dict of per-parameter tensors."
                )
                raise ValueError(msg)
            blocks = [features]
        elif isinstance(features, Mapping):
            if not features:
                msg = "features dict is empty."
                raise ValueError(msg)
            blocks = []
            batch = None
            for name, value in features.items():
                if not isinstance(value, Tensor) or value.dim() < 1:
                    msg = f"features[{name!r}] must be a tensor of shape (batch, ...)."
                    raise TypeError(msg)
                if batch is None:
                    batch = value.shape[0]
                elif value.shape[0] != batch:
                    msg = (
                        f"features[{name!r}] has batch size {value.shape[0]}, "
                        f"expected {batch} like the first entry."
                    )
                    raise ValueError(msg)
                blocks.append(value.reshape(batch, -1))
            sizes = [b.shape[1] for b in blocks]
            if self.param_sizes is not None and sizes != self.param_sizes:
                names = list(features)
                for i, (got, want) in enumerate(zip(sizes, self.param_sizes)):
                    if got != want:
                        msg = (
                            f"features[{names[i]!r}] has {got} elements per "
                            f"sample, expected {want} (parameter #{i})."
                        )
                        raise ValueError(msg)
                msg = (
                    f"features has {len(sizes)} entries, expected "
                    f"{len(self.param_sizes)} parameters."
                )
                raise ValueError(msg)
            if sum(sizes) != self.feature_dim:
                msg = (
                    f"features dict has {sum(sizes)} elements per sample, "
                    f"expected feature_dim={self.feature_dim}."
                )
                raise ValueError(msg)
        else:
            msg = f"features must be a Tensor or a dict of Tensors, got {type(features).__name__}."
            raise TypeError(msg)
        dtype = blocks[0].dtype
        if not dtype.is_floating_point:
            msg = f"features must have a floating dtype, got {dtype}."
            raise TypeError(msg)
        if any(b.dtype != dtype for b in blocks):
            msg = "all feature tensors must share one dtype."
            raise TypeError(msg)
        blocks = [b.to(self.device) for b in blocks]
        return blocks, blocks[0].shape[0], dtype

    def work_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """Accumulation dtype for inputs of ``input_dtype``.

        Args:
            input_dtype: dtype of the features.

        Returns:
            ``torch.float64`` if the input or ``self.dtype`` is float64, else
            ``torch.float32``.
        """
        if torch.float64 in (input_dtype, self.dtype):
            return torch.float64
        return torch.float32

    # ---------------------------------------------------------------- project
    def project(
        self,
        features: Tensor | Mapping[str, Tensor],
        ensemble_id: int = 0,
        *,
        keep_work_dtype: bool = False,
    ) -> Tensor:
        """Project features.

        Args:
            features: ``(B, feature_dim)`` tensor or dict of ``(B, ...)`` tensors
                whose flattened sizes sum to ``feature_dim`` (in order).
            ensemble_id: Selects an independent projection.
            keep_work_dtype: Return the float32/float64 accumulator instead of
                casting back to the input dtype.

        Returns:
            ``(B, proj_dim)`` tensor (``(B, feature_dim)`` for identity, the
            input itself without copy for a tensor input) on ``self.device``
            with the input dtype. The projection is not differentiable (it
            runs under ``torch.no_grad``).
        """
        ensemble_id = check_int(
            ensemble_id, "ensemble_id", minimum=0, expected="a non-negative int"
        )
        with torch.no_grad():
            return self._project(features, ensemble_id, keep_work_dtype)

    def _project(
        self,
        features: Tensor | Mapping[str, Tensor],
        ensemble_id: int,
        keep_work_dtype: bool,
    ) -> Tensor:
        blocks, batch, dtype = self._blocks(features)
        if self.proj_type == ProjectionType.identity:
            out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
            work = self.work_dtype(dtype)
            return out.to(work) if keep_work_dtype else out
        state = self._state(ensemble_id)
        work_dtype = self.work_dtype(dtype)
        out = torch.zeros(batch, self.proj_dim, dtype=work_dtype, device=self.device)
        step = batch if self.max_batch_size is None else self.max_batch_size
        if isinstance(state, DenseState):
            # every generated block serves the whole batch (the features are in
            # memory already): sub-batches would regenerate the matrix for each
            step = batch
        for b0 in range(0, batch, max(step, 1)):
            b1 = min(batch, b0 + step)
            offset = 0
            for block in blocks:
                if block.shape[1] > 0:
                    state.accumulate(block[b0:b1], offset, out[b0:b1], self._work)
                offset += block.shape[1]
        if self.proj_type in (ProjectionType.normal, ProjectionType.rademacher):
            out.mul_(1.0 / math.sqrt(self.proj_dim))
        elif self.proj_type == ProjectionType.sjlt and self.sjlt_nnz > 1:
            out.mul_(1.0 / math.sqrt(self.sjlt_nnz))
        return out if keep_work_dtype else out.to(dtype)
