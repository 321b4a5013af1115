"""Run a function on 2 forked torch.distributed (gloo) ranks and collect its results.

Shared by the pipeline tests: each rank sets one thread, joins a file-initialised gloo
group, calls ``fn(shared_dir)`` (``shared_dir`` is the same folder on every rank, e.g.
for a shared ``cache_dir``) and saves the returned dict; the caller gets one dict per rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, world: int, fn: Callable[[str], Any], folder: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    init = f"file://{os.path.join(folder, 'init')}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = fn(os.path.join(folder, "shared"))
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[str], Any], folder: Path, world: int = WORLD) -> list[Any]:
    """``[fn(shared_dir) on rank r for r in range(world)]`` (fork start method)."""
    mp.start_processes(
        _worker, args=(world, fn, str(folder)), nprocs=world, join=True, start_method="fork"
    )
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]
