"""A seeded, forked RNG for the benchmark's training loops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded_rng(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block after ``torch.manual_seed(seed)`` inside a forked RNG.

    The CPU generator is forked, and so is the generator of ``device`` when it is
    a CUDA device (the current one for a bare ``"cuda"``): the caller's RNG state
    is the same after the block, and the same seed gives the same draws inside it.

    Args:
        seed: Seed of the block's RNG.
        device: The device the block draws random numbers on.

    Yields:
        Nothing; the block runs seeded.
    """
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
