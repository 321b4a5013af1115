"""A resumable on-disk store of per-sample features (projected gradients, factors).

The files of a store directory are listed in :mod:`~dattri.algorithm.store.layout`.
Rows are written through short-lived ``numpy.memmap`` views of the rows being written
(flushed before the range is recorded as done) and read the same way, so resident
memory stays bounded by the rows in use, not by the file size. Progress files are
replaced atomically (write a temporary file, then ``os.replace``); an interrupted
fill resumes from the recorded ranges. Opening a directory whose manifest was written
for other settings (checkpoint hash, projector, layers, dtype, number of samples, ...)
raises a ``ValueError`` naming the differing fields.

Reuse is checked, not trusted (:mod:`~dattri.algorithm.store.integrity`):

* every sample of every batch is fingerprinted as it is cached and compared when the
  store is reused or resumed: changed training data raise a ``ValueError`` naming
  the first changed batch and samples (and a loader that yields different data on
  two passes of one run, e.g. random augmentation, is refused the same way);
* rows written by an earlier run are checked against their checksums before use: a
  row zeroed or overwritten since is named (file, rows) in a warning and recomputed
  (with torch.distributed: a ``ValueError``);
* a truncated or damaged manifest, progress or ``.npy`` file raises a ``ValueError``
  naming the file and the fix (delete the folder or pass a new ``cache_dir``).

``float16``/``bfloat16`` storage halves disk and I/O; rows are always returned in the
requested compute dtype (``float32`` by default).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dattri.algorithm.runtime.batching import batch_plan, iter_batches, iterate
from dattri.algorithm.runtime.distributed import barrier, is_distributed, rank_world, shard_range
from dattri.algorithm.store.integrity import (
    StoreDamagedError,
    check_npy_file,
    checkpoint_fingerprint,
    damaged,
    format_rows,
    load_json,
    row_checksums,
    sample_hashes,
)
from dattri.algorithm.store.layout import (
    STORE_DTYPES,
    merge_ranges,
    numpy_dtype,
    parse_store_dtype,
    range_difference,
    range_mask,
    subtract_rows,
    write_json_atomic,
)
from dattri.algorithm.store.stored_rows import StoredRows

__all__ = [
    "MemmapFeatureStore",
    "StoredRows",
    "batch_plan",
    "checkpoint_fingerprint",
    "iter_batches",
    "parse_store_dtype",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
#: internal array of per-sample data fingerprints
DATA_HASH = "_data_hash"
#: rows read at once when verifying checksums (bytes)
_VERIFY_BYTES = 1 << 25
_HASH_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _hash_pool() -> ThreadPoolExecutor:
    """One background thread fingerprinting a batch while it is featurized.

    Created per process: a child forked from a process that had one (e.g.
    ``torch.multiprocessing`` with the fork start method) inherits the executor but
    not its thread, so it makes its own.
    """
    global _HASH_POOL
    if _HASH_POOL is None or _HASH_POOL[0] != os.getpid():
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dattri-store-hash")
        _HASH_POOL = (os.getpid(), pool)
    return _HASH_POOL[1]


def checksum_array(name: str) -> str:
    """Name of the internal array holding the row checksums of array ``name``."""
    return f"_checksum_{name}"


# ------------------------------------------------------------------ batch plans
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

    #: default of :meth:`fill`'s ``commit_seconds``
    commit_seconds: float = 5.0

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.rank, self.world_size = rank_world()
        self._done: dict[str, list[list[int]]] = {}
        self._arrays: dict[str, set[str]] = {}
        self._offsets: dict[str, int] = {}
        #: per unit, rows written or verified by this object (need no verification)
        self._trusted: dict[str, list[list[int]]] = {}
        #: rows whose data fingerprint was written by this object
        self._session_rows: list[list[int]] = []
        self._data_checked = False
        for name in self.manifest["arrays"]:
            self._offset(name)
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
        for name in list(manifest["arrays"]):
            manifest["arrays"][checksum_array(name)] = {
                "shape": [int(n_samples)],
                "dtype": "uint64",
            }
        manifest["arrays"][DATA_HASH] = {"shape": [int(n_samples)], "dtype": "uint64"}
        manifest["arrays"] = dict(sorted(manifest["arrays"].items()))
        error = None
        if rank_world()[0] == 0:
            try:
                cls._create_or_check(directory, manifest)
            except ValueError as err:
                if not is_distributed():
                    raise
                error = (type(err) is StoreDamagedError, str(err))
        if is_distributed():
            from dattri.algorithm.runtime.distributed import broadcast_object

            error = broadcast_object(error)
        if error is not None:
            raise (StoreDamagedError if error[0] else ValueError)(error[1])
        return cls(directory, manifest)

    @staticmethod
    def _create_or_check(directory: Path, manifest: dict[str, Any]) -> None:
        path = directory / MANIFEST
        if path.exists():
            old = load_json(path)
            if not isinstance(old, dict):
                raise damaged(path, "it does not hold a JSON object")
            if old != manifest:
                raise ValueError(MemmapFeatureStore._mismatch(directory, old, manifest))
            missing = [n for n in manifest["arrays"] if not (directory / f"{n}.npy").exists()]
            if not missing:
                return
            files = [f"{n}.npy" for n in missing]
            warnings.warn(
                f"The feature store in {str(directory)!r} lacks {files}: recomputing all of "
                "its rows.",
                UserWarning,
                stacklevel=4,
            )
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
            np_dtype = numpy_dtype(spec["dtype"])
            arr = np.lib.format.open_memmap(
                directory / f"{name}.npy", mode="w+", dtype=np_dtype, shape=tuple(spec["shape"])
            )
            arr.flush()
            del arr
        write_json_atomic(path, manifest)

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
        if old.get("format") != new["format"]:
            return (
                f"The feature store in {str(directory)!r} was written by another version of "
                f"dattri (store format {old.get('format')}, now {new['format']}). Use a "
                "different cache_dir, or delete this directory to recompute."
            )
        return (
            f"The feature store in {str(directory)!r} was written for another task or other "
            f"settings ({'; '.join(diffs)}). Use a different cache_dir, or delete this "
            "directory to recompute."
        )

    # ---------------------------------------------------------------- progress
    def _load_progress(self) -> None:
        ranges: dict[str, list] = {}
        for f in sorted(self.directory.glob("done-r*.json")):
            data = load_json(f)
            try:
                if data.get("format") != FORMAT_VERSION:
                    raise damaged(f, f"it is not a progress file of format {FORMAT_VERSION}")
                for unit, rs in data["done"].items():
                    ranges.setdefault(unit, []).extend((int(a), int(b)) for a, b in rs)
                for unit, names in data.get("arrays", {}).items():
                    self._arrays.setdefault(unit, set()).update(map(str, names))
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                if isinstance(err, StoreDamagedError):
                    raise
                raise damaged(f, f"it does not hold row ranges per unit ({err!r})") from err
        self._done = {u: merge_ranges(rs) for u, rs in ranges.items()}
        unknown = {a for names in self._arrays.values() for a in names} - set(
            self.manifest["arrays"]
        )
        if unknown:
            f = self.directory / f"done-r{self.rank}.json"
            raise damaged(f, f"it names arrays {sorted(unknown)} missing from the manifest")

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
        self._done[unit] = merge_ranges([*self._done.get(unit, []), [start, stop]])

    def commit(self) -> None:
        """Persist the progress of this rank atomically."""
        data = {
            "format": FORMAT_VERSION,
            "done": self._done,
            "arrays": {u: sorted(names) for u, names in sorted(self._arrays.items())},
        }
        write_json_atomic(self.directory / f"done-r{self.rank}.json", data)

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

    def _offset(self, name: str) -> int:
        """Data offset of array ``name``'s file (header and size checked once)."""
        if name not in self._offsets:
            spec = self.manifest["arrays"][name]
            path = self.directory / f"{name}.npy"
            if not path.exists():
                raise damaged(path, "it is missing")
            shape = tuple(spec["shape"])
            self._offsets[name] = check_npy_file(path, shape, numpy_dtype(spec["dtype"]))
        return self._offsets[name]

    def _view(self, name: str, start: int, stop: int, mode: str) -> np.memmap:
        spec = self.manifest["arrays"][name]
        np_dtype = numpy_dtype(spec["dtype"])
        path = self.directory / f"{name}.npy"
        tail = tuple(spec["shape"][1:])
        row_bytes = int(np.prod(tail, dtype=np.int64)) * np_dtype.itemsize
        try:
            return np.memmap(
                path,
                dtype=np_dtype,
                mode=mode,
                offset=self._offset(name) + start * row_bytes,
                shape=(stop - start, *tail),
            )
        except (ValueError, OSError) as err:
            if isinstance(err, StoreDamagedError):
                raise
            raise damaged(path, f"rows {start}-{stop - 1} cannot be mapped ({err})") from err

    def _write_np(self, name: str, start: int, data: np.ndarray) -> None:
        """Write raw rows (already in the file's dtype) and flush."""
        view = self._view(name, start, start + data.shape[0], "r+")
        view[...] = data.view(view.dtype).reshape(view.shape)
        view.flush()
        del view

    def _read_np(self, name: str, start: int, stop: int) -> np.ndarray:
        view = self._view(name, start, stop, "r")
        out = np.array(view)
        del view
        return out

    def write(self, name: str, start: int, values: Tensor) -> None:
        """Write ``values`` ``(rows, ...)`` at rows ``start ..`` of ``name`` (flushed)."""
        stop = start + int(values.shape[0])
        if stop == start:
            return
        spec = self.manifest["arrays"][name]
        torch_dtype = STORE_DTYPES[spec["dtype"]][0]
        data = values.detach().to("cpu", torch_dtype).contiguous()
        if torch_dtype == torch.bfloat16:
            data = data.view(torch.int16)
        raw = data.numpy().view(numpy_dtype(spec["dtype"]))
        self._write_np(name, start, raw)
        self._write_np(checksum_array(name), start, row_checksums(raw))

    def put(self, unit: str, start: int, values: Mapping[str, Tensor]) -> None:
        """Write rows of several arrays for ``unit`` and record them as done.

        For stores filled without a loader (e.g. DVEmb's embeddings); persist with
        :meth:`commit`.

        Args:
            unit: the progress unit.
            start: first row.
            values: ``{array_name: (rows, ...)}``, all with the same number of rows.
        """
        stop = start + int(next(iter(values.values())).shape[0])
        for name, v in values.items():
            self.write(name, start, v)
        self._arrays.setdefault(unit, set()).update(values)
        self.mark_done(unit, start, stop)
        self._trusted[unit] = merge_ranges([*self._trusted.get(unit, []), [start, stop]])

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
        commit_seconds: float | None = None,
    ) -> int:
        """Compute and write the missing batches of this rank's share of ``loader``.

        Batches are split into contiguous per-rank ranges (:func:`shard_range`).
        Rows of ``unit`` written by an earlier run are first checked against their
        checksums (:meth:`verify_unit`). The first call on a store object loads every
        batch of this rank's share once to compare its samples' fingerprints with the
        recorded ones; later calls load only the missing batches (map-style
        ``DataLoader``). Progress is committed every ``commit_seconds``, at the end,
        and when ``compute`` raises (rows already written are kept).

        Args:
            unit: progress unit (e.g. ``"ckpt0"``).
            loader: the batches, in the same order on every pass.
            sizes: size of every batch (:func:`batch_plan`).
            compute: ``compute(batch_index, batch) -> {array_name: (B, ...)}``.
            verbose: progress bar.
            desc: progress-bar label.
            commit_seconds: how often to persist progress (default
                :attr:`commit_seconds`).

        Returns:
            Number of batches computed by this rank.

        Raises:
            ValueError: if the loader's size differs from the store's, a batch's
                samples differ from those the store was written from (or from an
                earlier pass of this run), or (torch.distributed) stored rows fail
                their checksums.
        """
        if commit_seconds is None:
            commit_seconds = self.commit_seconds
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        if starts[-1] != self.n_samples:
            msg = (
                f"The loader yields {starts[-1]} samples but the store holds {self.n_samples} rows."
            )
            raise ValueError(msg)
        mine = shard_range(len(sizes), self.rank, self.world_size)
        self.verify_unit(unit, starts[mine.start], starts[mine.stop], starts)
        todo = {b for b in mine if not self.is_done(unit, starts[b], starts[b + 1])}
        selected = list(mine) if not self._data_checked else sorted(todo)
        last = time.monotonic()
        count = 0
        try:
            pairs = iter_batches(loader, selected)
            deferred = None  # a batch only checked, while the next one loads
            for b, batch in iterate(pairs, desc, verbose, total=len(selected)):
                # fingerprinted in a background thread while the batch is featurized
                # (or the next one loaded; hashing releases the GIL), checked before
                # anything of it is written
                pending = _hash_pool().submit(sample_hashes, batch, sizes[b])
                if deferred is not None:
                    self._check_data(deferred[0], starts[deferred[0]], deferred[1].result())
                    deferred = None
                if b not in todo:
                    deferred = (b, pending)
                    continue
                out = compute(b, batch)
                hashes = pending.result()
                self._check_data(b, starts[b], hashes)
                for name, values in out.items():
                    if values.shape[0] != sizes[b]:
                        msg = f"{name}: batch {b} gave {values.shape[0]} rows, expected {sizes[b]}."
                        raise ValueError(msg)
                    self.write(name, starts[b], values)
                self._arrays.setdefault(unit, set()).update(out)
                self._write_np(DATA_HASH, starts[b], hashes)
                self._session_rows = merge_ranges([*self._session_rows, [starts[b], starts[b + 1]]])
                self.mark_done(unit, starts[b], starts[b + 1])
                self._trusted[unit] = merge_ranges(
                    [*self._trusted.get(unit, []), [starts[b], starts[b + 1]]]
                )
                count += 1
                if time.monotonic() - last > commit_seconds:
                    self.commit()
                    last = time.monotonic()
            if deferred is not None:
                self._check_data(deferred[0], starts[deferred[0]], deferred[1].result())
            self._data_checked = True
        finally:
            self.commit()
        return count

    # -------------------------------------------------------------- integrity
    def _check_data(self, b: int, start: int, hashes: np.ndarray) -> None:
        """Compare a batch's sample fingerprints with those recorded for its rows."""
        stop = start + int(hashes.shape[0])
        known = np.zeros(stop - start, dtype=bool)
        for ranges in self._done.values():
            known |= range_mask(ranges, start, stop)
        if not known.any():
            return
        stored = self._read_np(DATA_HASH, start, stop)
        changed = np.flatnonzero(known & (stored != hashes)) + start
        if changed.size == 0:
            return
        where = (
            f"batch {b} of the loader (samples {start}-{stop - 1}; changed: {format_rows(changed)})"
        )
        if range_mask(self._session_rows, start, stop)[changed - start].all():
            msg = (
                f"The loader yielded different data on two passes of this run: {where} "
                "differs from the same batch of an earlier pass. A feature store (and "
                "TRAK/TracIn over several checkpoints) needs a loader that yields the same "
                "samples in the same order on every pass: no random augmentation or "
                "shuffling."
            )
        else:
            msg = (
                f"The training data differ from the data the feature store in "
                f"{str(self.directory)!r} was written from: {where} has changed, and its "
                "stored features belong to the old data (they would give wrong scores). "
                f"If the data changed on purpose, delete {str(self.directory)!r} to "
                "recompute (or pass a new cache_dir); otherwise pass the loader the store "
                "was written from (same samples, order and transforms, shuffle=False)."
            )
        raise ValueError(msg)

    def verify_unit(
        self, unit: str, lo: int = 0, hi: int | None = None, starts: Sequence[int] | None = None
    ) -> list[int]:
        """Check the rows of ``unit`` written by an earlier run against their checksums.

        Only rows ``lo .. hi - 1`` recorded as done and not yet written or verified by
        this object are read. Rows that fail are named (file, rows, batches) in a
        ``UserWarning`` and marked as not written, so that :meth:`fill` recomputes them.

        Args:
            unit: the progress unit.
            lo: first row to check.
            hi: end of the rows to check (default: all rows).
            starts: batch start rows (with the total last), to name batches.

        Returns:
            The rows that failed (sorted).

        Raises:
            ValueError: with torch.distributed, if any row fails (delete the store).
        """
        hi = self.n_samples if hi is None else hi
        ranges = merge_ranges([max(a, lo), min(b, hi)] for a, b in self._done.get(unit, []))
        trusted = self._trusted.get(unit, [])
        check = range_difference(ranges, trusted)
        bad: dict[str, list[int]] = {}
        for name in sorted(self._arrays.get(unit, ())):
            spec = self.manifest["arrays"][name]
            row_bytes = (
                int(np.prod(spec["shape"][1:], dtype=np.int64))
                * numpy_dtype(spec["dtype"]).itemsize
            )
            block = max(1, _VERIFY_BYTES // max(row_bytes, 1))
            for a, b in check:
                for s in range(a, b, block):
                    e = min(s + block, b)
                    got = row_checksums(self._read_np(name, s, e))
                    want = self._read_np(checksum_array(name), s, e)
                    bad_rows = np.flatnonzero(got != want) + s
                    bad.setdefault(name, []).extend(bad_rows.tolist())
        bad = {k: v for k, v in bad.items() if v}
        self._trusted[unit] = merge_ranges([*trusted, *check])
        if not bad:
            return []
        rows = sorted({r for v in bad.values() for r in v})
        files = "; ".join(
            f"{str(self.directory / f'{k}.npy')!r} rows {format_rows(v)}" for k, v in bad.items()
        )
        batches = ""
        if starts is not None:
            idx = sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows})
            batches = f" (batches {format_rows(idx)} of the loader)"
        what = (
            f"Feature store rows changed since they were written (zeroed, overwritten or "
            f"damaged on disk; they fail their checksums): {files}{batches}"
        )
        if self.world_size > 1:
            msg = (
                f"{what}. Delete {str(self.directory)!r} to recompute the features (or pass "
                "a new cache_dir)."
            )
            raise ValueError(msg)
        warnings.warn(
            f"{what}. Recomputing them; if this recurs, check the disk and whether another "
            f"program writes to {str(self.directory)!r}.",
            UserWarning,
            stacklevel=3,
        )
        self._done[unit] = subtract_rows(self._done.get(unit, []), rows)
        self._trusted[unit] = subtract_rows(self._trusted[unit], rows)
        self.commit()
        for other in self.directory.glob("done-r*.json"):  # merged into ours
            if other.name != f"done-r{self.rank}.json":
                other.unlink()
        return rows

    def progress_line(self, units: Sequence[str]) -> str | None:
        """One line saying that the store is reused or resumed (None: a new store).

        Args:
            units: the units the caller will fill (e.g. one per checkpoint).
        """
        done = [sum(b - a for a, b in self._done.get(u, [])) for u in units]
        if not any(done):
            return None
        total = self.n_samples * len(units)
        where = str(self.directory)
        if sum(done) == total:
            return (
                f"Reusing the feature store in {where!r} ({len(units)} x {self.n_samples} "
                "rows, complete); checking its row checksums and the data fingerprints."
            )
        parts = ", ".join(f"{u} {d}/{self.n_samples}" for u, d in zip(units, done))
        return (
            f"Resuming the feature store in {where!r}: {sum(done)} of {total} rows "
            f"already written ({parts}); checking them and computing the rest."
        )
