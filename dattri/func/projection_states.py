"""Per-ensemble-member random state of the projection engine.

Each state holds (or regenerates on demand) the randomness of one ensemble
member and adds the projection of a block of input coordinates to an
accumulator: :class:`DenseState` (``normal``/``rademacher``),
:class:`SjltState` (``sjlt``) and :class:`MaskState` (``random_mask`` and
``grass``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from dattri.func.projection_rng import scratch, select_coordinates, sjlt_block


class _State(ABC):
    """Randomness of one ensemble member: a ``(p, k)`` projection, held or regenerated.

    Attributes:
        key: Stream key of the member (see :mod:`dattri.func.projection_rng`).
        feature_dim: Input dimension ``p``.
        proj_dim: Output dimension ``k``.
        device: Device of the random numbers.
        nbytes: Bytes the state keeps cached.
    """

    nbytes: int

    def __init__(self, key: int, feature_dim: int, proj_dim: int, device: torch.device) -> None:
        self.key = key
        self.feature_dim = feature_dim
        self.proj_dim = proj_dim
        self.device = device

    @abstractmethod
    def accumulate(self, x: Tensor, offset: int, out: Tensor, work: dict[str, Tensor]) -> None:
        """Add the (unscaled) projection of a block of input coordinates to ``out``.

        Args:
            x: Features ``(B, n)`` for global coordinates ``[offset, offset + n)``.
            offset: First global coordinate.
            out: Accumulator ``(B, k)`` in the working dtype.
            work: Scratch buffers.
        """


class DenseState(_State):
    """Dense ``(p, k)`` matrix of one ensemble member, partially cached."""

    def __init__(
        self,
        block_fn: Callable[..., Tensor],
        key: int,
        feature_dim: int,
        proj_dim: int,
        device: torch.device,
        cache_rows: int,
        chunk_rows: int,
        verbose: bool = False,
        copy_rows: int | None = None,
        gen_rows: int | None = None,
        max_bytes: int = 0,
    ) -> None:
        super().__init__(key, feature_dim, proj_dim, device)
        self.verbose = verbose
        self.block_fn = block_fn
        self.cache_rows = cache_rows
        self.chunk_rows = chunk_rows  # rows generated per step
        # rows of the cached matrix converted per matmul (fewer, larger ops)
        self.copy_rows = chunk_rows if copy_rows is None else copy_rows
        # rows generated per matmul when not cached: scratch buffers stay in cache
        self.gen_rows = self.chunk_rows if gen_rows is None else gen_rows
        self.cache: Tensor | None = None
        self.nbytes = cache_rows * proj_dim * 2
        # a fully cached matrix is widened once to the working dtype when that fits
        # in ``max_bytes`` (no per-batch float16 -> float32 conversion; same values)
        self.max_bytes = max_bytes

    def _fill_cache(self, work: dict[str, Tensor]) -> None:
        self.cache = torch.empty(
            self.cache_rows, self.proj_dim, dtype=torch.float16, device=self.device
        )
        starts = range(0, self.cache_rows, self.chunk_rows)
        for start in tqdm(starts, desc="Generating projection matrix", disable=not self.verbose):
            stop = min(self.cache_rows, start + self.chunk_rows)
            self.block_fn(
                self.key,
                start,
                stop - start,
                self.proj_dim,
                self.device,
                out=self.cache[start:stop],
                work=work,
            )

    def _maybe_widen(self, dtype: torch.dtype) -> None:
        cache = self.cache
        # float16 -> float32/float64 is exact; other targets keep the per-block copy
        if cache is None or cache.dtype != torch.float16:
            return
        if self.cache_rows < self.feature_dim or dtype not in (torch.float32, torch.float64):
            return
        nbytes = cache.numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes <= self.max_bytes:
            self.cache = cache.to(dtype)
            self.nbytes = nbytes

    def accumulate(self, x: Tensor, offset: int, out: Tensor, work: dict[str, Tensor]) -> None:
        """Add ``x @ P[offset:offset + n]`` (unscaled) to ``out`` (see :class:`_State`)."""
        if self.cache is None and self.cache_rows > 0:
            self._fill_cache(work)
        self._maybe_widen(out.dtype)
        end = offset + x.shape[1]
        pos = offset
        while pos < end:
            if pos < self.cache_rows:
                if self.cache.dtype == out.dtype:  # no conversion: one large matmul
                    stop = min(end, self.cache_rows)
                else:
                    stop = min(end, self.cache_rows, pos + self.copy_rows)
                block = self.cache[pos:stop]
                if block.dtype == out.dtype:
                    mat = block
                else:
                    mat = scratch(work, "mat", tuple(block.shape), out.dtype, x.device)
                    mat.copy_(block)
            else:  # generated straight into the working dtype, in L2-sized blocks
                stop = min(end, pos + self.gen_rows)
                mat = scratch(work, "mat", (stop - pos, self.proj_dim), out.dtype, x.device)
                self.block_fn(self.key, pos, stop - pos, self.proj_dim, self.device, mat, work)
            xs = x[:, pos - offset : stop - offset]
            if xs.dtype != out.dtype:
                xs = scratch(work, "xs", tuple(xs.shape), out.dtype, x.device).copy_(xs)
            out.addmm_(xs, mat)
            pos = stop


class SjltState(_State):
    """Buckets and signs of a sparse JL transform of one ensemble member."""

    def __init__(
        self,
        key: int,
        feature_dim: int,
        proj_dim: int,
        nnz: int,
        device: torch.device,
        cache: bool,
        chunk_bytes: int,
    ) -> None:
        super().__init__(key, feature_dim, proj_dim, device)
        self.nnz = nnz
        self.chunk_bytes = chunk_bytes
        self.buckets: Tensor | None = None
        self.signs: Tensor | None = None
        self.cached = cache
        self.nbytes = nnz * feature_dim * 12 if cache else 0

    def accumulate(self, x: Tensor, offset: int, out: Tensor, work: dict[str, Tensor]) -> None:
        """Add the (unscaled) sparse sketch of ``x`` to ``out`` (see :class:`_State`)."""
        if self.cached and self.buckets is None:
            self.buckets, self.signs = sjlt_block(
                self.key, 0, self.feature_dim, self.proj_dim, self.nnz, self.device
            )
        batch, n = x.shape
        step = max(1024, self.chunk_bytes // (8 * max(batch, 1)))
        for start in range(0, n, step):
            stop = min(n, start + step)
            lo, hi = offset + start, offset + stop
            if self.cached:
                buckets, signs = self.buckets[:, lo:hi], self.signs[:, lo:hi]
            else:
                buckets, signs = sjlt_block(
                    self.key, lo, hi - lo, self.proj_dim, self.nnz, self.device
                )
            buf = scratch(work, "sjlt", (batch, stop - start), out.dtype, x.device)
            for j in range(self.nnz):
                torch.mul(x[:, start:stop], signs[j], out=buf)
                out.index_add_(1, buckets[j], buf)


class MaskState(_State):
    """Sorted random coordinate subset, optionally followed by an SJLT (GraSS)."""

    def __init__(
        self,
        key: int,
        feature_dim: int,
        mask_dim: int,
        device: torch.device,
        sjlt_key: int | None = None,
        proj_dim: int | None = None,
    ) -> None:
        out_dim = mask_dim if sjlt_key is None or proj_dim is None else proj_dim
        super().__init__(key, feature_dim, out_dim, device)
        self.selected = select_coordinates(key, feature_dim, mask_dim, device)
        self.selected_list = self.selected.tolist()
        self.buckets: Tensor | None = None
        self.signs: Tensor | None = None
        if sjlt_key is not None and proj_dim is not None:
            buckets, signs = sjlt_block(sjlt_key, 0, mask_dim, proj_dim, 1, device)
            self.buckets, self.signs = buckets[0], signs[0]
        self.nbytes = mask_dim * (8 if self.buckets is None else 20)

    def accumulate(self, x: Tensor, offset: int, out: Tensor, work: dict[str, Tensor]) -> None:
        """Write (mask) or add (GraSS) the selected coordinates of ``x`` to ``out``.

        See :class:`_State`; ``work`` is unused.
        """
        del work
        lo = bisect_left(self.selected_list, offset)
        hi = bisect_left(self.selected_list, offset + x.shape[1])
        if hi <= lo:
            return
        cols = x.index_select(1, self.selected[lo:hi] - offset)
        if self.buckets is None:
            out[:, lo:hi] = cols
        else:
            out.index_add_(1, self.buckets[lo:hi], cols * self.signs[lo:hi])
