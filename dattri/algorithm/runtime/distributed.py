"""``torch.distributed`` helpers for the attributors (no-ops in a single process).

When no process group is initialised every helper behaves as for one process
(``rank=0``, ``world_size=1``): :func:`shard_batches` yields every batch,
:func:`all_reduce_sum` returns its input, :func:`gather_rows` returns its block. With a
process group (``gloo`` on CPU, ``nccl`` on GPU, e.g. under ``torchrun``), collectives
run on the communication device of the backend (the rank's current CUDA device for
NCCL, the CPU otherwise) and results come back on the input's device and dtype.

Every collective must be called by all ranks in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_rows",
    "is_distributed",
    "rank_world",
    "row_offset",
    "shard_batches",
    "shard_range",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _comm_device() -> torch.device:
    """Device collectives run on: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Contiguous share of ``range(n)`` for a rank (sizes differ by at most one).

    Args:
        n: number of items (e.g. batches).
        rank: the rank (default: this process's).
        world_size: number of ranks (default: this process group's).

    Returns:
        ``range(start, stop)``; ranks in order cover ``range(n)`` exactly once.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    if not 0 <= rank < world_size:
        msg = f"rank must be in [0, world_size={world_size}), got {rank}."
        raise ValueError(msg)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_batches(
    loader: Iterable,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(batch_index, batch)`` for this rank's contiguous range of batches.

    With one process every batch is yielded (a loader without ``len`` is fine). With
    several, ``len(loader)`` (capped at ``limit``) is split by :func:`shard_range`; the
    other batches are skipped without being used (a ``DataLoader`` still loads them:
    use a ``DistributedSampler``-free, unshuffled loader).

    Args:
        loader: the batches.
        limit: use only the first ``limit`` batches (None: all).
        rank: the rank (default: this process's).
        world_size: number of ranks (default: this process group's).

    Raises:
        TypeError: if several ranks share a loader without ``len``.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    if world_size == 1:
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                return
            yield i, batch
        return
    if not hasattr(loader, "__len__"):
        msg = (
            "Sharding a loader over torch.distributed ranks needs len(loader); pass a "
            "DataLoader or a list of batches."
        )
        raise TypeError(msg)
    n = len(loader) if limit is None else min(len(loader), limit)
    mine = shard_range(n, rank, world_size)
    for i, batch in enumerate(loader):
        if i >= mine.stop:
            return
        if i >= mine.start:
            yield i, batch


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: Any) -> Any:
    """Sum a tensor, a float, or a dict/list/tuple of them over all ranks.

    The result is identical on every rank and keeps the input's structure, devices
    and dtypes. Without a process group the input is returned unchanged.
    """
    if not is_distributed():
        return value
    if isinstance(value, Tensor):
        buf = value.detach().to(_comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(value.device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        buf = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return type(value)(buf.item())
    if isinstance(value, Mapping):
        return {k: all_reduce_sum(value[k]) for k in value}
    if isinstance(value, (list, tuple)):
        return type(value)(all_reduce_sum(v) for v in value)
    msg = f"all_reduce_sum supports tensors, numbers, dicts and lists, got {type(value)}."
    raise TypeError(msg)


def all_gather_object(obj: Any) -> list[Any]:
    """Picklable ``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(block: Tensor) -> Tensor:
    """Concatenate every rank's ``(n_r, ...)`` block in rank order, on every rank.

    Blocks may have different numbers of rows (zero included) but must agree on the
    trailing shape and dtype.

    Args:
        block: this rank's rows.

    Returns:
        ``(sum_r n_r, ...)`` on ``block``'s device (``block`` itself in one process).
    """
    if not is_distributed():
        return block
    device = _comm_device()
    counts = [int(c) for c in all_gather_object(int(block.shape[0]))]
    widest = max(counts)
    padded = torch.zeros((widest, *block.shape[1:]), dtype=block.dtype, device=device)
    padded[: block.shape[0]] = block.detach().to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(block.device)


def row_offset(n_local: int) -> tuple[int, int]:
    """``(first global row of this rank, total rows)`` for rank-ordered row blocks."""
    counts = [int(c) for c in all_gather_object(int(n_local))]
    rank, _ = rank_world()
    return sum(counts[:rank]), sum(counts)
