"""Blockwise scoring: tile sizes from a memory budget, and score sinks.

Scores ``S (n_train, n_test)`` are produced tile by tile (``(train block, test block)``)
and handed to a *sink*:

* :class:`TensorSink`: the full matrix in memory (the default ``attribute`` result);
* :class:`MemmapScoreSink`: a float32 ``.npy`` score file written tile by tile and
  returned as a memory-mapped tensor (``attribute(..., out=path)``);
* :class:`TopKSink`: a streaming per-test top-k (``attribute_topk``).

With torch.distributed each rank feeds the tiles of its own training rows;
``finalize()`` combines them (sum of disjoint rows, a shared score file, or a merge of
per-rank top-k candidates) so every rank gets the whole result.

:func:`plan_tiles` turns a ``max_memory`` budget (bytes, or a string such as
``"2GB"``/``"512MiB"``) into block sizes, so users set one number instead of several.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

from dattri.algorithm.runtime.batching import batch_size_of, iterate
from dattri.algorithm.runtime.distributed import (
    all_gather_object,
    all_reduce_sum,
    barrier,
    gather_rows,
    is_distributed,
    rank_world,
    shard_range,
)
from dattri.algorithm.runtime.validation import warn_topk
from dattri.algorithm.score.topk import TopKAccumulator, TopKResult

__all__ = [
    "MemmapScoreSink",
    "ScoreFile",
    "TensorSink",
    "TilePlan",
    "TopKSink",
    "iter_loader_tiles",
    "iter_row_batches",
    "iter_store_tiles",
    "make_sink",
    "merge_topk",
    "parse_memory",
    "plan_tiles",
    "scores_of_tiles",
    "topk_of_tiles",
]

#: the ``out=`` argument of ``attribute``: a ``.npy`` score file path, or None (in memory).
ScoreFile: TypeAlias = "str | os.PathLike[str] | None"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
#: default largest tile when no budget is given (elements), as before.
DEFAULT_TILE_ELEMS = 1 << 22
#: a budget is split in this many equal shares (see :func:`plan_tiles`).
BUDGET_SHARES = 12


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes of a memory budget: an int/float, or a string like ``"2GB"``, ``"512MiB"``.

    Raises:
        ValueError: for a non-positive or unparsable value.
    """
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            msg = (
                f"max_memory={value!r} is not a size; use bytes (an int) or a string such "
                "as '2GB' or '512MiB'."
            )
            raise ValueError(msg)
        value = float(match.group(1)) * _UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        msg = (
            f"max_memory must be a positive number of bytes or a string like '2GB', got {value!r}."
        )
        raise ValueError(msg)
    return int(value)


@dataclass(frozen=True)
class TilePlan:
    """Block sizes chosen for a budget.

    Attributes:
        train_block: training rows per tile.
        test_block: test columns per tile.
        grad_rows: samples whose full per-sample gradients are formed at once
            (None: whole loader batches).
    """

    train_block: int
    test_block: int
    grad_rows: int | None = None


def plan_tiles(
    n_train: int,
    n_test: int,
    dim: int,
    max_memory: int | str | None = None,
    *,
    num_params: int | None = None,
    itemsize: int = 4,
    reserved: int = 0,
) -> TilePlan:
    """Choose tile sizes so that the working buffers fit in ``max_memory``.

    Without a budget: tiles of at most ``2**22`` score elements, whole test set.
    With a budget ``M`` (minus ``reserved`` bytes already committed, e.g. test
    features), each of three buffers gets ``M / 12``: the score tile
    (``train_block x test_block``), the training rows of a tile
    (``train_block x dim``) and the per-sample gradients (``grad_rows x num_params``,
    counted three times for the autograd intermediates). The other shares leave room
    for transient copies (a tile being scaled and written to a score file, rows being
    converted from the storage dtype), so the working set stays below ``M / 2``.

    Args:
        n_train: number of training rows.
        n_test: number of test columns.
        dim: feature dimension ``d``.
        max_memory: budget (see :func:`parse_memory`) or None.
        num_params: per-sample gradient size ``p`` (for ``grad_rows``).
        itemsize: bytes per element of the compute dtype.
        reserved: bytes of the budget already in use.

    Returns:
        A :class:`TilePlan`.

    Raises:
        ValueError: if the budget cannot hold even one row of each buffer.
    """
    budget = parse_memory(max_memory)
    n_train, n_test = max(int(n_train), 1), max(int(n_test), 1)
    if budget is None:
        rows = max(1, min(n_train, DEFAULT_TILE_ELEMS // n_test))
        return TilePlan(train_block=rows, test_block=n_test)
    free = budget - int(reserved)
    share = free // BUDGET_SHARES
    if share <= 0 or share < itemsize * max(dim, 1):
        msg = (
            f"max_memory={budget} bytes is too small: it must leave at least "
            f"{BUDGET_SHARES * itemsize * max(dim, 1) + int(reserved)} bytes for one "
            "feature row per buffer; raise max_memory."
        )
        raise ValueError(msg)
    test_block = max(1, min(n_test, share // (itemsize * max(dim, 1))))
    train_block = min(n_train, share // (itemsize * max(dim, 1)))
    train_block = max(1, min(train_block, share // (itemsize * test_block)))
    grad_rows = None
    if num_params:
        # per-sample gradient, its projection input copy and autograd temporaries
        grad_rows = max(1, share // (3 * itemsize * int(num_params)))
    return TilePlan(train_block=int(train_block), test_block=int(test_block), grad_rows=grad_rows)


# ------------------------------------------------------------------------ sinks
class TensorSink:
    """Collect tiles into an in-memory ``(n_train, n_test)`` tensor.

    With torch.distributed every rank fills its rows and :meth:`finalize` sums the
    (disjoint) rows over ranks, so each rank returns the full matrix.
    """

    def __init__(
        self, n_train: int, n_test: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        self.scores = torch.zeros(n_train, n_test, dtype=dtype, device=device)

    def add(self, row_start: int, col_start: int, tile: Tensor) -> None:
        """Store a ``(rows, cols)`` tile at ``(row_start, col_start)``."""
        r, c = tile.shape
        self.scores[row_start : row_start + r, col_start : col_start + c] = tile

    def finalize(self) -> Tensor:
        """The ``(n_train, n_test)`` matrix (identical on every rank)."""
        return all_reduce_sum(self.scores)


class MemmapScoreSink:
    """Write tiles to a float32 ``.npy`` score file (``numpy.load``-able).

    Rank 0 creates the file; every rank writes its own tiles; :meth:`finalize` waits
    for all ranks and returns a tensor backed by a copy-on-write memory map of the
    file (pages are read on access, the file is never modified through it).

    Args:
        path: the ``.npy`` file (overwritten).
        n_train: rows.
        n_test: columns.
    """

    def __init__(self, path: str | os.PathLike, n_train: int, n_test: int) -> None:
        self.path = Path(path)
        if self.path.suffix != ".npy":
            msg = f"out must be a path ending in .npy, got {str(path)!r}."
            raise ValueError(msg)
        self.shape = (int(n_train), int(n_test))
        if rank_world()[0] == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=np.float32, shape=self.shape
            )
            arr.flush()
            del arr
        barrier()
        arr = np.load(self.path, mmap_mode="r")
        self._offset = int(arr.offset)
        del arr

    def add(self, row_start: int, col_start: int, tile: Tensor) -> None:
        """Write a ``(rows, cols)`` tile at ``(row_start, col_start)`` (flushed)."""
        r, c = tile.shape
        n_test = self.shape[1]
        data = tile.detach().to("cpu", torch.float32).numpy()
        view = np.memmap(
            self.path,
            dtype=np.float32,
            mode="r+",
            offset=self._offset + row_start * n_test * 4,
            shape=(r, n_test),
        )
        view[:, col_start : col_start + c] = data
        view.flush()
        del view

    def finalize(self) -> Tensor:
        """A ``(n_train, n_test)`` float32 CPU tensor mapped on the score file."""
        barrier()
        return torch.from_numpy(np.load(self.path, mmap_mode="c"))


def merge_topk(results: list[TopKResult], k: int) -> TopKResult:
    """Merge top-k candidates of disjoint training rows (e.g. one per rank)."""
    acc = TopKAccumulator(k)
    cat_top = (
        torch.cat([r.helpful_scores for r in results], 1),
        torch.cat([r.helpful_indices for r in results], 1),
    )
    cat_bot = (
        torch.cat([r.harmful_scores for r in results], 1),
        torch.cat([r.harmful_indices for r in results], 1),
    )
    top = acc._merge(None, cat_top[0], cat_top[1], k, largest=True)
    bot = acc._merge(None, cat_bot[0], cat_bot[1], k, largest=False)
    return TopKResult(
        helpful_indices=top[1],
        helpful_scores=top[0],
        harmful_indices=bot[1],
        harmful_scores=bot[0],
    )


class TopKSink:
    """Streaming per-test top-k over tiles (one accumulator per test block).

    Memory is ``O(n_test * k)`` plus one tile. With torch.distributed, per-rank
    candidates are gathered and merged in :meth:`finalize`.

    Args:
        k: samples per side.
        n_test: number of test columns (needed with torch.distributed, where a rank
            may receive no tile).
    """

    def __init__(self, k: int, n_test: int | None = None) -> None:
        TopKAccumulator(k)  # validates k
        self.k = k
        self.n_test = n_test
        self._rows = 0
        self._accs: dict[int, TopKAccumulator] = {}

    def add(self, row_start: int, col_start: int, tile: Tensor) -> None:
        """Add a ``(rows, cols)`` tile of training rows ``row_start ..``."""
        if col_start == 0:
            self._rows += int(tile.shape[0])
        self._accs.setdefault(col_start, TopKAccumulator(self.k)).update(tile, row_start)

    def _local(self) -> TopKResult | None:
        if not self._accs:
            return None
        parts = [self._accs[c].result(warn=False) for c in sorted(self._accs)]
        return TopKResult(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))

    def finalize(self) -> TopKResult:
        """The merged :class:`~dattri.algorithm.score.topk.TopKResult` (``(n_test, k)``)."""
        local = self._local()
        if not is_distributed():
            if local is None:
                msg = "No score tile was added to the top-k sink."
                raise RuntimeError(msg)
            warn_topk(self.k, self._rows)
            return local
        if self.n_test is None:
            msg = "TopKSink needs n_test with torch.distributed."
            raise ValueError(msg)
        k, n_test = self.k, self.n_test
        ref = next(iter(self._accs.values()))._top[0] if self._accs else None
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = all_gather_object(dtype if ref is not None else None)
        dtype = next(d for d in dtype if d is not None)
        pad = {
            "helpful_indices": -1,
            "helpful_scores": -float("inf"),
            "harmful_indices": -1,
            "harmful_scores": float("inf"),
        }
        gathered = {}
        for f in _FIELDS:
            is_idx = f.endswith("indices")
            full = torch.full(
                (n_test, k), pad[f], dtype=torch.long if is_idx else dtype, device=device
            )
            if local is not None:
                val = getattr(local, f)
                full[:, : val.shape[1]] = val
            gathered[f] = gather_rows(full.T.contiguous())  # (world * k, n_test)
        world = rank_world()[1]
        per_rank = [
            TopKResult(*(gathered[f][r * k : (r + 1) * k].T for f in _FIELDS)) for r in range(world)
        ]
        n_rows = int(all_reduce_sum(self._rows))
        warn_topk(k, n_rows)
        keep = min(k, n_rows)
        merged = merge_topk(per_rank, k)
        return TopKResult(*(getattr(merged, f)[:, :keep] for f in _FIELDS))


_FIELDS = ("helpful_indices", "helpful_scores", "harmful_indices", "harmful_scores")


def topk_of_tiles(tiles: Iterable[tuple[int, int, Tensor]], k: int, n_test: int) -> TopKResult:
    """Stream ``(row_start, col_start, tile)`` score tiles into a :class:`TopKSink`.

    Args:
        tiles: score tiles, e.g. from :func:`iter_store_tiles` (this rank's share
            under torch.distributed).
        k: training samples per side.
        n_test: number of test columns.

    Returns:
        The merged ``(n_test, k)`` :class:`~dattri.algorithm.score.topk.TopKResult`.
    """
    sink = TopKSink(k, n_test)
    for row, col, tile in tiles:
        sink.add(row, col, tile)
    return sink.finalize()


def scores_of_tiles(
    tiles: Iterable[tuple[int, int, Tensor]],
    out: str | os.PathLike | None,
    n_train: int,
    n_test: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Tensor:
    """Collect ``(row_start, col_start, tile)`` score tiles into :func:`make_sink`'s sink.

    Args:
        tiles: score tiles (this rank's share under torch.distributed).
        out: None (in memory) or the path of a ``.npy`` score file.
        n_train: rows of the result.
        n_test: columns of the result.
        dtype: dtype of the in-memory result.
        device: device of the in-memory result.

    Returns:
        The ``(n_train, n_test)`` scores (a memory-mapped float32 CPU tensor with ``out``),
        identical on every rank.
    """
    sink = make_sink(out, n_train, n_test, dtype, device)
    for row, col, tile in tiles:
        sink.add(row, col, tile)
    return sink.finalize()


def make_sink(
    out: str | os.PathLike | None,
    n_train: int,
    n_test: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> TensorSink | MemmapScoreSink:
    """A :class:`MemmapScoreSink` when ``out`` is a path, else a :class:`TensorSink`."""
    if out is None:
        return TensorSink(n_train, n_test, dtype, device)
    if not isinstance(out, (str, os.PathLike)):
        msg = f"out must be None or a path to a .npy score file, got {type(out).__name__}."
        raise TypeError(msg)
    return MemmapScoreSink(out, n_train, n_test)


# ------------------------------------------------------------------------ tiles
def _tile(
    feats: list[Tensor],
    tests: list[Tensor],
    cols: slice,
    weights: list[float] | None,
    row_scale: Tensor | None,
) -> Tensor:
    """``row_scale[:, None] * sum_k w_k feats_k @ tests_k[cols]^T``."""
    tile = None
    for k, (f, t) in enumerate(zip(feats, tests)):
        part = f @ t[cols].T  # a fresh tensor: in-place updates below save a copy
        if weights is not None:
            part.mul_(weights[k])
        tile = part if tile is None else tile.add_(part)
    if row_scale is not None:
        tile.mul_(row_scale.to(tile.dtype)[:, None])
    return tile


def _col_slices(n_test: int, test_block: int) -> list[slice]:
    step = max(1, int(test_block))
    return [slice(c, min(c + step, n_test)) for c in range(0, n_test, step)]


def iter_store_tiles(
    store: object,
    tests: list[Tensor],
    weights: list[float] | None,
    row_scale: Tensor | None,
    test_block: int,
    shard: bool,
) -> Iterator[tuple[int, int, Tensor]]:
    """Tiles of ``S = row_scale * sum_k w_k F_k T_k^T`` over stored training features.

    Args:
        store: a :class:`~dattri.algorithm.features.gradients.ProjectedGradientStore`
            (``features[k]`` ``(n_train, d)``, tensors or row sources; ``row_blocks``).
        tests: per checkpoint ``(n_test, d)`` test features.
        weights: per-checkpoint weights, or None for 1.
        row_scale: ``(n_train,)`` per-row factor, or None.
        test_block: test columns per tile.
        shard: yield only this rank's row blocks (torch.distributed).

    Yields:
        ``(row_start, col_start, tile)``.
    """
    n_test = tests[0].shape[0]
    cols_list = _col_slices(n_test, test_block)
    for rows in store.row_blocks(n_test, shard=shard):
        feats = [f[rows] for f in store.features]
        scale = None if row_scale is None else row_scale[rows]
        for cols in cols_list:
            yield rows.start, cols.start, _tile(feats, tests, cols, weights, scale)


def iter_loader_tiles(
    loader: Iterable,
    featurize: Callable[[int, object], tuple[list[Tensor], Tensor | None]],
    tests: list[Tensor],
    weights: list[float] | None,
    test_block: int,
    shard: bool,
    verbose: bool = False,
) -> Iterator[tuple[int, int, Tensor]]:
    """Tiles of ``S`` for training rows featurized batch by batch from ``loader``.

    Args:
        loader: training batches.
        featurize: ``featurize(batch_index, batch) -> (per-checkpoint (B, d) features,
            (B,) row scale or None)``.
        tests: per checkpoint ``(n_test, d)`` test features.
        weights: per-checkpoint weights, or None for 1.
        test_block: test columns per tile.
        shard: only this rank's contiguous share of the batches (torch.distributed).
        verbose: progress bar.

    Yields:
        ``(row_start, col_start, tile)``.
    """
    cols_list = _col_slices(tests[0].shape[0], test_block)
    for b, batch, row in iter_row_batches(loader, shard, "attribute", verbose):
        feats, scale = featurize(b, batch)
        for cols in cols_list:
            yield row, cols.start, _tile(feats, tests, cols, weights, scale)


def iter_row_batches(
    loader: Iterable, shard: bool, desc: str = "batches", verbose: bool = False
) -> Iterator[tuple[int, object, int]]:
    """Yield ``(batch_index, batch, first_row)`` of ``loader`` (with a progress bar).

    Args:
        loader: the batches.
        shard: only this rank's contiguous share of the batches (torch.distributed;
            a map-style ``DataLoader`` loads only those).
        desc: progress-bar label.
        verbose: progress bar.
    """
    if shard and is_distributed():
        from dattri.algorithm.store.memmap_store import batch_plan, iter_batches

        sizes = batch_plan(loader)
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        mine = list(shard_range(len(sizes)))
        pairs = ((b, batch, starts[b]) for b, batch in iter_batches(loader, mine))
        total = len(mine)
    else:
        pairs = _with_rows(loader)
        total = len(loader) if hasattr(loader, "__len__") else None
    yield from iterate(pairs, desc, verbose, total=total)


def _with_rows(loader: Iterable) -> Iterator[tuple[int, object, int]]:
    row = 0
    for b, batch in enumerate(loader):
        yield b, batch, row
        row += batch_size_of(batch)
