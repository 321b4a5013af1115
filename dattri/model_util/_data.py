"""Private helpers: map DataLoader positions to dataset indices, build subset loaders."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
)


def _sampler_of(loader: DataLoader) -> Any:
    """The sampler that defines a loader's sample order (also under a batch sampler)."""
    inner = getattr(loader.batch_sampler, "sampler", None)
    return inner if inner is not None else loader.sampler


def loader_dataset_indices(loader: DataLoader) -> list[int]:
    """Dataset indices a loader draws from, in its position order.

    Position ``p`` of the returned list is the ``p``-th training sample as seen
    by an attributor iterating a non-shuffled version of ``loader`` (i.e. row
    ``p`` of a score matrix); the value is the index into ``loader.dataset``.

    * ``SequentialSampler`` / ``RandomSampler`` (without replacement, full
      length): ``0 .. len(dataset) - 1``.
    * Samplers with an ``indices`` attribute (``SubsetRandomSampler``, subset
      samplers): that sequence.
    * Any other sampler: one pass of iteration (must be deterministic).

    Args:
        loader: A map-style ``DataLoader``.

    Returns:
        List of ``len(sampler)`` dataset indices.

    Raises:
        TypeError: If ``loader`` is not a map-style DataLoader.
        ValueError: If the sampler draws with replacement or is not a
            permutation of its indices.
    """
    if not isinstance(loader, DataLoader):
        msg = f"Expected a torch DataLoader, got {type(loader).__name__}."
        raise TypeError(msg)
    if isinstance(loader.dataset, IterableDataset):
        msg = "Iterable-style datasets have no indices; use a map-style dataset."
        raise TypeError(msg)
    sampler = _sampler_of(loader)
    n_data = len(loader.dataset)
    if isinstance(sampler, SequentialSampler):
        return list(range(len(sampler.data_source)))
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.num_samples != n_data:
            msg = (
                "The dataloader's RandomSampler draws with replacement or a partial "
                "epoch; retraining needs a fixed set of training samples."
            )
            raise ValueError(msg)
        return list(range(n_data))
    if hasattr(sampler, "indices"):
        indices = [int(i) for i in sampler.indices]
    else:
        indices = [int(i) for i in iter(sampler)]
    if len(set(indices)) != len(indices):
        msg = "The dataloader's sampler repeats dataset indices; cannot retrain on subsets."
        raise ValueError(msg)
    return indices


def loader_shuffles(loader: DataLoader) -> bool:
    """Whether ``loader`` draws its samples in random order."""
    sampler = _sampler_of(loader)
    return isinstance(sampler, RandomSampler | SubsetRandomSampler)


def make_subset_loader(
    loader: DataLoader,
    dataset_indices: Sequence[int],
    *,
    shuffle: bool,
    seed: int | None,
) -> DataLoader:
    """A loader over ``Subset(loader.dataset, dataset_indices)`` with loader's settings.

    Batch size, collate function, ``drop_last``, workers and pin memory are kept.

    Args:
        loader: Template loader.
        dataset_indices: Indices into ``loader.dataset``.
        shuffle: Shuffle every epoch.
        seed: Seed of the shuffling generator (``None``: torch's global RNG).

    Returns:
        The new ``DataLoader``.
    """
    batch_size = loader.batch_size
    if batch_size is None:
        batch_size = getattr(loader.batch_sampler, "batch_size", 1)
    generator = None
    if shuffle and seed is not None:
        generator = torch.Generator().manual_seed(int(seed) % (2**63))
    return DataLoader(
        Subset(loader.dataset, list(dataset_indices)),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=generator,
    )


def to_state_dict(obj: Any) -> dict[str, Any]:
    """State dict of a trained model (``nn.Module``) or a state dict, on CPU."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        msg = (
            "train_func must return an nn.Module or a state_dict (mapping of "
            f"tensors); got {type(obj).__name__}."
        )
        raise TypeError(msg)
    return {
        k: (v.detach().to("cpu").clone() if isinstance(v, torch.Tensor) else v)
        for k, v in obj.items()
    }


def atomic_torch_save(obj: Any, file: Path) -> None:
    """Save ``obj`` to a temporary file next to ``file``, then rename it into place."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, file)


def atomic_write_text(text: str, file: Path) -> None:
    """Write ``text`` to ``file`` atomically (temp file + rename)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def write_yaml(data: dict[str, Any], file: Path) -> None:
    """Dump ``data`` as YAML (plain Python types only) atomically."""
    atomic_write_text(yaml.safe_dump(data, sort_keys=False), file)


class _MetadataLoader(yaml.SafeLoader):
    """Safe YAML loader that also reads the ``pathlib`` paths upstream dattri dumped.

    Upstream's ``retrain_loo`` wrote ``Path`` objects into ``metadata.yml``
    (``!!python/object/apply:pathlib.PosixPath [a, index_0]``); they are read back as
    plain strings. No other Python tag is accepted.
    """


def _path_constructor(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
    del suffix
    parts = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else []
    return str(Path(*[str(p) for p in parts])) if parts else "."


_MetadataLoader.add_multi_constructor(
    "tag:yaml.org,2002:python/object/apply:pathlib.", _path_constructor
)


def read_yaml(file: Path) -> dict[str, Any]:
    """Load a YAML mapping (``pathlib`` tags written by upstream dattri become strings)."""
    with open(file) as f:
        data = yaml.load(f, Loader=_MetadataLoader)  # a SafeLoader subclass
    if not isinstance(data, dict):
        msg = f"{file} does not hold a YAML mapping."
        raise ValueError(msg)
    return data


def func_name(func: Any) -> str:
    """Name of a callable for metadata: ``__name__``, as upstream dattri records it.

    ``functools.partial`` objects give the wrapped function's name; other callables
    without ``__name__`` give their class name.
    """
    name = getattr(func, "__name__", None)
    if name is None:
        name = getattr(getattr(func, "func", None), "__name__", None)
    return str(name if name is not None else type(func).__name__)
