"""A resumable on-disk store of per-sample features (projected gradients, factors).

Layout of a store directory::

    manifest.json          settings + fingerprint, arrays (name, shape, dtype)
    <array>.npy            one ``.npy`` file per array, rows = training samples
    done-r<rank>.json      row ranges already written, per unit (e.g. a checkpoint)

Rows are written through short-lived ``numpy.memmap`` views of the rows being written
(flushed before the range is recorded as done) and read the same way, so resident
memory stays bounded by the rows in use, not by the file size. Progress files are
replaced atomically (write a temporary file, then ``os.replace``); an interrupted
fill resumes from the recorded ranges. Opening a directory whose manifest was written
for other settings (checkpoint hash, projector, layers, dtype, number of samples, ...)
raises a ``ValueError`` naming the differing fields.

``float16``/``bfloat16`` storage halves disk and I/O; rows are always returned in the
requested compute dtype (``float32`` by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from dattri.algorithm.batching import batch_size_of, iterate
from dattri.algorithm.distributed import barrier, is_distributed, rank_world, shard_range

__all__ = [
    "MemmapFeatureStore",
    "StoredRows",
    "batch_plan",
    "checkpoint_fingerprint",
    "iter_batches",
    "parse_store_dtype",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_DTYPES = {
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),  # numpy has no bfloat16: stored as raw bits
    "float32": (torch.float32, np.float32),
    "float64": (torch.float64, np.float64),
}


def parse_store_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> str:
    """Name of a storage dtype (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``).

    Args:
        dtype: a torch dtype, its name, or None for ``default``.
        default: dtype used when ``dtype`` is None.

    Raises:
        ValueError: for any other dtype.
    """
    if dtype is None:
        dtype = default
    name = str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype
    if name not in _DTYPES:
        msg = f"store_dtype must be one of {list(_DTYPES)} (or the torch dtype), got {dtype!r}."
        raise ValueError(msg)
    return name


def checkpoint_fingerprint(task: Any, ckpt_indices: Sequence[int] | None = None) -> str:
    """SHA-256 of the trainable parameters (names, shapes, dtypes, values) of checkpoints.

    Args:
        task: an :class:`~dattri.task.AttributionTask`.
        ckpt_indices: checkpoints to hash (default: all).

    Returns:
        A hex digest; equal checkpoints give equal digests in any process.
    """
    digest = hashlib.sha256()
    indices = range(len(task.get_checkpoints())) if ckpt_indices is None else ckpt_indices
    for k in indices:
        for name, value in sorted(task.get_param_dict(k).items()):
            t = value.detach().cpu().contiguous()
            digest.update(f"{k}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------ batch plans
def batch_plan(loader: Iterable) -> list[int]:
    """Size of every batch of ``loader``, in order.

    For a map-style ``DataLoader`` the sizes come from its batch sampler (no data is
    loaded); any other iterable is iterated once.

    Raises:
        ValueError: if the loader shuffles (rows would not match between passes).
    """
    if isinstance(loader, DataLoader):
        if isinstance(loader.sampler, RandomSampler):
            msg = (
                "A feature store / torch.distributed sharding needs a loader in a fixed "
                "order: use shuffle=False."
            )
            raise ValueError(msg)
        if loader.batch_sampler is not None and hasattr(loader.dataset, "__len__"):
            return [len(b) for b in loader.batch_sampler]
    return [batch_size_of(b) for b in loader]


def iter_batches(loader: Iterable, selected: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """Yield ``(batch_index, batch)`` for the sorted batch indices ``selected``.

    A map-style ``DataLoader`` loads only the selected batches (same dataset, collate
    function and workers); any other iterable is iterated and filtered.
    """
    wanted = list(selected)
    if not wanted:
        return
    if (
        isinstance(loader, DataLoader)
        and loader.batch_sampler is not None
        and hasattr(loader.dataset, "__len__")
    ):
        index_lists = list(loader.batch_sampler)
        sub = DataLoader(
            loader.dataset,
            batch_sampler=[index_lists[i] for i in wanted],
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        yield from zip(wanted, sub)
        return
    keep = set(wanted)
    last = wanted[-1]
    for i, batch in enumerate(loader):
        if i in keep:
            yield i, batch
        if i >= last:
            return


def _merge(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sorted union of half-open ``[start, stop)`` ranges."""
    out: list[list[int]] = []
    for a, b in sorted((int(r[0]), int(r[1])) for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MemmapFeatureStore:
    """Per-sample arrays in ``.npy`` files with a manifest and resumable progress.

    Use :meth:`open` to create or reopen a store. Every array has ``n_samples`` rows.
    Work is recorded per *unit* (any string, e.g. ``"ckpt0"``): :meth:`mark_done`
    after writing a row range, :meth:`commit` to persist it (called automatically
    every ``commit_seconds`` by :meth:`fill`).

    Args:
        directory: the store directory.
        manifest: the manifest dict (as written by :meth:`open`).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.rank, self.world_size = rank_world()
        self._done: dict[str, list[list[int]]] = {}
        self._offsets: dict[str, int] = {}
        self._load_progress()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        settings: Mapping[str, Any],
        n_samples: int,
        arrays: Mapping[str, tuple[Sequence[int], str]],
    ) -> MemmapFeatureStore:
        """Create a store, or reopen one written with the same settings.

        With torch.distributed, rank 0 creates the files and every rank opens them.

        Args:
            directory: store directory (created if missing; must be shared by ranks).
            settings: JSON-serialisable description of what is stored (checkpoint
                fingerprint, projector, layers, ...); must match to reopen.
            n_samples: number of rows.
            arrays: ``{name: (trailing_shape, dtype_name)}``; ``dtype_name`` as
                returned by :func:`parse_store_dtype`.

        Returns:
            The store.

        Raises:
            ValueError: if the directory holds a store for other settings, or a file
                of another kind.
        """
        directory = Path(directory)
        manifest = {
            "format": FORMAT_VERSION,
            "settings": json.loads(json.dumps(dict(settings), sort_keys=True)),
            "n_samples": int(n_samples),
            "arrays": {
                name: {"shape": [int(n_samples), *map(int, tail)], "dtype": dt}
                for name, (tail, dt) in sorted(arrays.items())
            },
        }
        for _, dt in arrays.values():
            parse_store_dtype(dt, torch.float32)
        error = None
        if rank_world()[0] == 0:
            try:
                cls._create_or_check(directory, manifest)
            except ValueError as err:
                error = str(err)
        if is_distributed():
            from dattri.algorithm.distributed import broadcast_object

            error = broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        return cls(directory, manifest)

    @staticmethod
    def _create_or_check(directory: Path, manifest: dict[str, Any]) -> None:
        path = directory / MANIFEST
        if path.exists():
            with open(path) as fh:
                old = json.load(fh)
            if old != manifest:
                raise ValueError(MemmapFeatureStore._mismatch(directory, old, manifest))
            missing = [n for n in manifest["arrays"] if not (directory / f"{n}.npy").exists()]
            if not missing:
                return
        elif directory.exists() and any(directory.iterdir()):
            msg = (
                f"cache_dir {str(directory)!r} is not empty and has no {MANIFEST}: pass an "
                "empty or new directory for the feature store."
            )
            raise ValueError(msg)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("done-r*.json"):
            stale.unlink()
        for name, spec in manifest["arrays"].items():
            np_dtype = _DTYPES[spec["dtype"]][1]
            arr = np.lib.format.open_memmap(
                directory / f"{name}.npy", mode="w+", dtype=np_dtype, shape=tuple(spec["shape"])
            )
            arr.flush()
            del arr
        _atomic_json(path, manifest)

    @staticmethod
    def _mismatch(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
        diffs = []
        flat_old = {**old.get("settings", {}), "n_samples": old.get("n_samples")}
        flat_new = {**new["settings"], "n_samples": new["n_samples"]}
        flat_old["arrays"], flat_new["arrays"] = old.get("arrays"), new["arrays"]
        flat_old["format"], flat_new["format"] = old.get("format"), new["format"]
        for key in sorted(set(flat_old) | set(flat_new)):
            if flat_old.get(key) != flat_new.get(key):
                a, b = str(flat_old.get(key))[:80], str(flat_new.get(key))[:80]
                diffs.append(f"{key}: stored {a} vs now {b}")
        return (
            f"The feature store in {str(directory)!r} was written for another task or other "
            f"settings ({'; '.join(diffs)}). Use a different cache_dir, or delete this "
            "directory to recompute."
        )

    # ---------------------------------------------------------------- progress
    def _load_progress(self) -> None:
        ranges: dict[str, list] = {}
        for f in sorted(self.directory.glob("done-r*.json")):
            with open(f) as fh:
                for unit, rs in json.load(fh).items():
                    ranges.setdefault(unit, []).extend(rs)
        self._done = {u: _merge(rs) for u, rs in ranges.items()}

    def done_ranges(self, unit: str) -> list[list[int]]:
        """Row ranges ``[start, stop)`` of ``unit`` already written (all ranks)."""
        return [list(r) for r in self._done.get(unit, [])]

    def is_done(self, unit: str, start: int, stop: int) -> bool:
        """Whether rows ``start .. stop - 1`` of ``unit`` are recorded as written."""
        return any(a <= start and stop <= b for a, b in self._done.get(unit, []))

    def is_complete(self, unit: str) -> bool:
        """Whether every row of ``unit`` is written."""
        return self.is_done(unit, 0, self.n_samples)

    def mark_done(self, unit: str, start: int, stop: int) -> None:
        """Record rows ``start .. stop - 1`` of ``unit`` as written (persist: :meth:`commit`)."""
        self._done[unit] = _merge([*self._done.get(unit, []), [start, stop]])

    def commit(self) -> None:
        """Persist the progress of this rank atomically."""
        _atomic_json(self.directory / f"done-r{self.rank}.json", self._done)

    def sync(self) -> None:
        """Commit, wait for every rank, and reload everyone's progress."""
        self.commit()
        barrier()
        self._load_progress()

    # --------------------------------------------------------------------- rows
    @property
    def n_samples(self) -> int:
        """Number of rows of every array."""
        return int(self.manifest["n_samples"])

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of array ``name``."""
        return tuple(self.manifest["arrays"][name]["shape"])

    def _view(self, name: str, start: int, stop: int, mode: str) -> np.memmap:
        spec = self.manifest["arrays"][name]
        np_dtype = np.dtype(_DTYPES[spec["dtype"]][1])
        path = self.directory / f"{name}.npy"
        if name not in self._offsets:
            arr = np.load(path, mmap_mode="r")
            self._offsets[name] = int(arr.offset)
            del arr
        tail = tuple(spec["shape"][1:])
        row_bytes = int(np.prod(tail, dtype=np.int64)) * np_dtype.itemsize
        return np.memmap(
            path,
            dtype=np_dtype,
            mode=mode,
            offset=self._offsets[name] + start * row_bytes,
            shape=(stop - start, *tail),
        )

    def write(self, name: str, start: int, values: Tensor) -> None:
        """Write ``values`` ``(rows, ...)`` at rows ``start ..`` of ``name`` (flushed)."""
        stop = start + int(values.shape[0])
        if stop == start:
            return
        spec = self.manifest["arrays"][name]
        torch_dtype = _DTYPES[spec["dtype"]][0]
        data = values.detach().to("cpu", torch_dtype).contiguous()
        if torch_dtype == torch.bfloat16:
            data = data.view(torch.int16)
        view = self._view(name, start, stop, "r+")
        view[...] = data.numpy().view(view.dtype)
        view.flush()
        del view

    def read(
        self,
        name: str,
        rows: slice,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """Rows ``rows`` (a step-1 slice) of ``name`` as a ``dtype`` tensor on ``device``."""
        start, stop, _ = rows.indices(self.n_samples)
        spec = self.manifest["arrays"][name]
        if stop <= start:
            return torch.zeros((0, *spec["shape"][1:]), dtype=dtype, device=device)
        view = self._view(name, start, stop, "r")
        out = torch.from_numpy(np.array(view))
        del view
        if spec["dtype"] == "bfloat16":
            out = out.view(torch.bfloat16)
        return out.to(device=device, dtype=dtype)

    # --------------------------------------------------------------------- fill
    def fill(
        self,
        unit: str,
        loader: Iterable,
        sizes: Sequence[int],
        compute: Callable[[int, Any], Mapping[str, Tensor]],
        *,
        verbose: bool = False,
        desc: str = "features",
        commit_seconds: float = 5.0,
    ) -> int:
        """Compute and write the missing batches of this rank's share of ``loader``.

        Batches are split into contiguous per-rank ranges (:func:`shard_range`);
        batches whose rows are recorded as done are skipped without being loaded
        (map-style ``DataLoader``). Progress is committed every ``commit_seconds``,
        at the end, and when ``compute`` raises (rows already written are kept).

        Args:
            unit: progress unit (e.g. ``"ckpt0"``).
            loader: the batches.
            sizes: size of every batch (:func:`batch_plan`).
            compute: ``compute(batch_index, batch) -> {array_name: (B, ...)}``.
            verbose: progress bar.
            desc: progress-bar label.
            commit_seconds: how often to persist progress.

        Returns:
            Number of batches computed by this rank.
        """
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        if starts[-1] != self.n_samples:
            msg = (
                f"The loader yields {starts[-1]} samples but the store holds {self.n_samples} rows."
            )
            raise ValueError(msg)
        mine = shard_range(len(sizes), self.rank, self.world_size)
        todo = [b for b in mine if not self.is_done(unit, starts[b], starts[b + 1])]
        last = time.monotonic()
        count = 0
        try:
            for b, batch in iterate(iter_batches(loader, todo), desc, verbose, total=len(todo)):
                out = compute(b, batch)
                for name, values in out.items():
                    if values.shape[0] != sizes[b]:
                        msg = f"{name}: batch {b} gave {values.shape[0]} rows, expected {sizes[b]}."
                        raise ValueError(msg)
                    self.write(name, starts[b], values)
                self.mark_done(unit, starts[b], starts[b + 1])
                count += 1
                if time.monotonic() - last > commit_seconds:
                    self.commit()
                    last = time.monotonic()
        finally:
            self.commit()
        return count


class StoredRows:
    """Read-only, tensor-like view of one store array, read block by block.

    Supports ``len``, ``.shape``, ``.dtype``, ``.device`` and slicing with a step-1
    slice (returns a tensor); :meth:`materialize` loads everything.

    Args:
        store: the store.
        name: the array.
        dtype: compute dtype of returned rows.
        device: device of returned rows.
    """

    def __init__(
        self, store: MemmapFeatureStore, name: str, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.store = store
        self.name = name
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> torch.Size:
        """``(n_samples, ...)``."""
        return torch.Size(self.store.shape(self.name))

    def __len__(self) -> int:
        return self.store.n_samples

    def __getitem__(self, rows: slice) -> Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            msg = "StoredRows supports step-1 slices only (e.g. rows[100:200])."
            raise TypeError(msg)
        return self.store.read(self.name, rows, self.dtype, self.device)

    def materialize(self) -> Tensor:
        """All rows as one tensor."""
        return self[0 : len(self)]
