"""Retrain models on leave-one-out sets and on random subsets (LDS ground truth).

Directory layouts (all paths in ``metadata.yml`` are relative to ``path``):

LDS (:func:`retrain_lds`)::

    path/metadata.yml              mode: lds, data_length, train_func, num_subsets,
                                   subset_ratio, num_runs_per_subset, seed,
                                   subset_dir_map {i: "i"}
    path/<i>/indices.txt           positions (0..data_length-1) of the subset, one per
                                   line = row indices of a score matrix over the loader
    path/<i>/dataset_indices.txt   the matching indices into ``dataloader.dataset``
    path/<i>/model_weights_<j>.pt  state_dict of run j (load with weights_only=True)

LOO (:func:`retrain_loo`)::

    path/metadata.yml              mode: loo, data_length, train_func, seed, indices,
                                   dataset_indices, map_index_dir {p: "index_p"}
    path/index_<p>/model_weights.pt  state_dict of the model trained without position p

Both functions are resumable: a weights file is written to a temporary file and
renamed, so an existing file is complete, and a rerun skips it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dattri.model_util._data import (
    atomic_torch_save,
    atomic_write_text,
    func_name,
    loader_dataset_indices,
    make_subset_loader,
    read_yaml,
    to_state_dict,
    write_yaml,
)

__all__ = ["retrain_lds", "retrain_loo"]

METADATA_FILE = "metadata.yml"


# --------------------------------------------------------------------------- LDS plumbing


def random_seed() -> int:
    """A fresh random 63-bit seed (used when ``seed=None``)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


def lds_subset_positions(n: int, subset_size: int, seed: int, subset_id: int) -> np.ndarray:
    """Positions of LDS subset ``subset_id``: ``default_rng(seed + id).choice(n, size)``.

    Args:
        n: Number of training samples.
        subset_size: Number of samples per subset.
        seed: Base seed.
        subset_id: Global subset id.

    Returns:
        Int64 array of shape ``(subset_size,)`` without repeats (draw order kept).
    """
    rng = np.random.default_rng(int(seed) + int(subset_id))
    return rng.choice(n, subset_size, replace=False).astype(np.int64)


def lds_weights_file(path: Path, subset_id: int, run: int) -> Path:
    """``path/<subset_id>/model_weights_<run>.pt``: where an LDS model is saved."""
    return path / str(subset_id) / f"model_weights_{run}.pt"


def _read_int_lines(file: Path) -> np.ndarray:
    text = file.read_text().split()
    return np.array([int(t) for t in text], dtype=np.int64)


def _write_int_lines(values: Sequence[int], file: Path) -> None:
    atomic_write_text("".join(f"{int(v)}\n" for v in values), file)


def check_lds_args(
    num_subsets: int,
    subset_ratio: float,
    num_runs_per_subset: int,
    start_id: int,
    total_num_subsets: int,
    n: int,
) -> int:
    """Validate LDS retraining arguments; return the subset size.

    Raises:
        ValueError: On any invalid argument (message names it).
    """
    if int(num_subsets) != num_subsets or num_subsets < 1:
        msg = f"`num_subsets` must be a positive integer; got {num_subsets}."
        raise ValueError(msg)
    if int(num_runs_per_subset) != num_runs_per_subset or num_runs_per_subset < 1:
        msg = f"`num_runs_per_subset` must be a positive integer; got {num_runs_per_subset}."
        raise ValueError(msg)
    if not 0.0 < float(subset_ratio) <= 1.0:
        msg = f"`subset_ratio` must be in (0, 1]; got {subset_ratio}."
        raise ValueError(msg)
    if int(start_id) != start_id or start_id < 0:
        msg = f"`start_id` must be a non-negative integer; got {start_id}."
        raise ValueError(msg)
    if total_num_subsets < 0:
        msg = f"`total_num_subsets` must be >= 0 (0 = this call only); got {total_num_subsets}."
        raise ValueError(msg)
    if total_num_subsets > 0:
        if total_num_subsets % num_subsets != 0:
            msg = (
                f"`total_num_subsets` ({total_num_subsets}) must be divisible by "
                f"`num_subsets` ({num_subsets})."
            )
            raise ValueError(msg)
        if start_id + num_subsets > total_num_subsets:
            msg = (
                f"Subsets [{start_id}, {start_id + num_subsets}) exceed "
                f"`total_num_subsets` ({total_num_subsets})."
            )
            raise ValueError(msg)
    size = int(n * float(subset_ratio))
    if size < 1:
        msg = f"`subset_ratio` {subset_ratio} of {n} samples gives an empty subset."
        raise ValueError(msg)
    return size


def check_existing_lds_metadata(
    path: Path,
    n: int,
    subset_ratio: float,
    num_runs_per_subset: int,
    *,
    train_func: str | None = None,
    seed: int | None = None,
) -> dict[str, Any] | None:
    """Refuse to mix an LDS run into a directory holding a different one.

    Args:
        path: Output directory of the run.
        n: Number of training samples of this call.
        subset_ratio: This call's ``subset_ratio``.
        num_runs_per_subset: This call's ``num_runs_per_subset``.
        train_func: Name of this call's training function (not compared if None).
        seed: This call's seed (not compared if None or not recorded).

    Returns:
        The existing metadata, or None if ``path`` has none yet.

    Raises:
        ValueError: Naming every field whose recorded value differs from this
            call's, with both values and the fix.
    """
    file = path / METADATA_FILE
    if not file.exists():
        return None
    meta = read_yaml(file)
    given: dict[str, Any] = {
        "mode": "lds",
        "data_length": int(n),
        "subset_ratio": float(subset_ratio),
        "num_runs_per_subset": int(num_runs_per_subset),
    }
    if train_func is not None and meta.get("train_func") is not None:
        given["train_func"] = train_func
    if seed is not None and meta.get("seed") is not None:
        given["seed"] = int(seed)
    casts = {"data_length": int, "subset_ratio": float, "num_runs_per_subset": int, "seed": int}
    diffs = []
    for key, value in given.items():
        recorded = meta.get(key)
        try:
            same = recorded is not None and casts.get(key, str)(recorded) == value
        except (TypeError, ValueError):
            same = False
        if not same:
            diffs.append(f"{key}: {recorded!r} recorded, {value!r} in this call")
    if diffs:
        arg_names = {"data_length": "len(dataloader.sampler)", "mode": "retrain_loo vs retrain_lds"}
        hint = ", ".join(arg_names.get(d.split(":")[0], d.split(":")[0]) for d in diffs)
        msg = (
            f"`path` {path} already holds a different retraining (LDS) ({file}); these "
            f"fields differ: {'; '.join(diffs)}. A second call on the same `path` "
            "resumes or extends the run recorded there, so it must use the same "
            f"values ({hint}). Fix: pass the recorded values, or use a new `path` "
            f"(or delete {path}) for a different retraining."
        )
        raise ValueError(msg)
    return meta


def prepare_lds_subset(
    subset_dir: Path,
    positions: np.ndarray,
    dataset_indices: Sequence[int],
    *,
    seed_given: bool,
) -> np.ndarray:
    """Write (or re-read on resume) a subset's index files; return its positions.

    Raises:
        ValueError: If an existing ``indices.txt`` has another size than this
            call's subset, or differs from the one implied by the given seed.
    """
    file = subset_dir / "indices.txt"
    if file.exists():
        existing = _read_int_lines(file)
        if existing.size != positions.size:
            msg = (
                f"{file} holds a subset of {existing.size} samples but this call's "
                f"`subset_ratio` and data length give {positions.size}; this directory "
                "was created with another `subset_ratio` or dataloader. Fix: pass the "
                "same values, or use a new `path`."
            )
            raise ValueError(msg)
        if seed_given and not np.array_equal(existing, positions):
            msg = (
                f"{file} holds a different subset than `seed` implies; this directory "
                "was created with another seed. Use a new `path` or the same seed."
            )
            raise ValueError(msg)
        positions = existing
    else:
        _write_int_lines(positions, file)
    ds_file = subset_dir / "dataset_indices.txt"
    if not ds_file.exists():
        _write_int_lines([dataset_indices[p] for p in positions], ds_file)
    return positions


def finalize_lds_metadata(
    path: Path,
    *,
    ids: Sequence[int],
    total_num_subsets: int,
    base: dict[str, Any],
    previous: dict[str, Any] | None,
) -> bool:
    """Write ``metadata.yml`` once every expected subset has all its weights.

    With ``total_num_subsets == 0`` the metadata covers this call's subsets plus
    any recorded by an earlier call; otherwise it covers ``0..total-1`` and is
    written by whichever job finishes last.

    Returns:
        Whether the metadata file was written.
    """
    num_runs = int(base["num_runs_per_subset"])
    if total_num_subsets > 0:
        expected = list(range(int(total_num_subsets)))
    else:
        old = [int(k) for k in (previous or {}).get("subset_dir_map", {})]
        expected = sorted(set(old) | {int(i) for i in ids})
    complete = all(lds_weights_file(path, i, j).exists() for i in expected for j in range(num_runs))
    if not complete:
        return False
    meta = dict(base)
    meta["num_subsets"] = len(expected)
    meta["subset_dir_map"] = {int(i): str(i) for i in expected}
    write_yaml(meta, path / METADATA_FILE)
    return True


@dataclass(frozen=True)
class LDSPlan:
    """The work of one LDS retraining call (shared by every LDS retrainer).

    Built by :func:`plan_lds`, which has already validated the arguments and
    written (or re-read) every subset's index files.

    Attributes:
        path: Output directory.
        n: Number of training samples (positions ``0..n-1``).
        num_subsets: Subsets trained by this call.
        subset_ratio: Fraction of the samples in every subset.
        num_runs_per_subset: Models per subset.
        total_num_subsets: Total subsets over all jobs (0: this call only).
        base_seed: Base seed (drawn at random when none was given).
        seed_given: Whether the caller gave the seed.
        ids: This call's subset ids.
        previous: Metadata already in ``path`` (None if none).
        jobs: ``(subset id, positions (subset_size,), run)`` of every model whose
            weights file is missing, in subset then run order.
    """

    path: Path
    n: int
    num_subsets: int
    subset_ratio: float
    num_runs_per_subset: int
    total_num_subsets: int
    base_seed: int
    seed_given: bool
    ids: list[int]
    previous: dict[str, Any] | None
    jobs: list[tuple[int, np.ndarray, int]]

    def run_seed(self, subset_id: int, run: int) -> int:
        """Seed of run ``run`` of subset ``subset_id``: ``seed + id * runs + run``."""
        return self.base_seed + subset_id * self.num_runs_per_subset + run

    def weights_file(self, subset_id: int, run: int) -> Path:
        """Where run ``run`` of subset ``subset_id`` is saved."""
        return lds_weights_file(self.path, subset_id, run)

    def finalize(self, train_func: str, **extra: Any) -> bool:
        """Write ``metadata.yml`` once every expected model of the run exists.

        Args:
            train_func: Name of the training function recorded in the metadata.
            **extra: More metadata entries (placed before ``subset_dir_map``).

        Returns:
            Whether the metadata file was written (:func:`finalize_lds_metadata`).
        """
        base = {
            "mode": "lds",
            "data_length": self.n,
            "train_func": train_func,
            "num_subsets": int(self.num_subsets),
            "subset_ratio": float(self.subset_ratio),
            "num_runs_per_subset": int(self.num_runs_per_subset),
            "seed": self.base_seed if self.seed_given else None,
            **extra,
            "subset_dir_map": {},
        }
        return finalize_lds_metadata(
            self.path,
            ids=self.ids,
            total_num_subsets=self.total_num_subsets,
            base=base,
            previous=self.previous,
        )


def plan_lds(
    path: str | Path,
    dataset_indices: Sequence[int],
    num_subsets: int,
    subset_ratio: float,
    num_runs_per_subset: int,
    seed: int | None,
    start_id: int = 0,
    total_num_subsets: int = 0,
    train_func: str | None = None,
) -> LDSPlan:
    """Validate an LDS retraining call, prepare its subsets and list the missing models.

    Args:
        path: Output directory (created if needed).
        dataset_indices: Dataset index of every position, ``(n,)``.
        num_subsets: Subsets trained by this call.
        subset_ratio: Fraction of the samples per subset, in ``(0, 1]``.
        num_runs_per_subset: Models per subset.
        seed: Base seed; ``None`` draws a random one.
        start_id: Id of this call's first subset.
        total_num_subsets: Total subsets over all jobs (0: this call only).
        train_func: Name of the training function, checked against the one
            recorded in an existing ``metadata.yml`` (None: not checked).

    Returns:
        The :class:`LDSPlan`.

    Raises:
        ValueError: On invalid arguments or if ``path`` holds a different run.
    """
    n = len(dataset_indices)
    size = check_lds_args(
        num_subsets, subset_ratio, num_runs_per_subset, start_id, total_num_subsets, n
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    previous = check_existing_lds_metadata(
        path, n, subset_ratio, num_runs_per_subset, train_func=train_func, seed=seed
    )
    seed_given = seed is not None
    base_seed = int(seed) if seed_given else random_seed()
    ids = list(range(int(start_id), int(start_id) + int(num_subsets)))
    jobs: list[tuple[int, np.ndarray, int]] = []
    for i in ids:
        positions = prepare_lds_subset(
            path / str(i),
            lds_subset_positions(n, size, base_seed, i),
            dataset_indices,
            seed_given=seed_given,
        )
        jobs.extend(
            (i, positions, j)
            for j in range(num_runs_per_subset)
            if not lds_weights_file(path, i, j).exists()
        )
    return LDSPlan(
        path=path,
        n=n,
        num_subsets=num_subsets,
        subset_ratio=subset_ratio,
        num_runs_per_subset=num_runs_per_subset,
        total_num_subsets=total_num_subsets,
        base_seed=base_seed,
        seed_given=seed_given,
        ids=ids,
        previous=previous,
        jobs=jobs,
    )


# --------------------------------------------------------------------------- public API


def retrain_lds(
    train_func: Callable[..., Any],
    dataloader: DataLoader,
    path: str | Path,
    num_subsets: int = 100,
    subset_ratio: float = 0.5,
    num_runs_per_subset: int = 1,
    start_id: int = 0,
    total_num_subsets: int = 0,
    seed: int | None = None,
    *,
    verbose: bool = True,
    **kwargs: Any,
) -> None:
    """Retrain models on random subsets of the training data (LDS ground truth).

    Subset ``i`` (``i`` in ``start_id .. start_id + num_subsets - 1``) holds
    ``int(n * subset_ratio)`` positions drawn by
    ``np.random.default_rng(seed + i).choice(n, size, replace=False)``, where
    ``n = len(dataloader.sampler)``; positions are mapped to the sampler's actual
    dataset indices for training. Run ``j`` of subset ``i`` calls
    ``train_func(loader, seed=seed + i * num_runs_per_subset + j, **kwargs)`` with a
    shuffled loader (same batch size and collate function; its shuffling
    generator is seeded with the run seed) and saves the returned model's
    ``state_dict``. See the module docstring for the directory layout.

    Distributed use: give each job a disjoint ``start_id`` range of
    ``num_subsets`` subsets, the same ``seed`` and ``total_num_subsets``; the job
    that completes the last missing model writes ``metadata.yml``.

    Args:
        train_func: ``train_func(loader, seed=..., **kwargs)`` returning a trained
            ``nn.Module`` (or its state_dict).
        dataloader: Loader over the full training set (its sample order defines
            positions, i.e. the rows of attribution scores).
        path: Output directory (created if needed).
        num_subsets: Number of subsets trained by this call.
        subset_ratio: Fraction of the training set in every subset, in ``(0, 1]``.
        num_runs_per_subset: Models trained per subset (different seeds).
        start_id: Id of this call's first subset.
        total_num_subsets: Total subsets over all jobs (0: this call only).
        seed: Base seed; ``None`` draws a random one (recorded as ``null``).
        verbose: Show a tqdm progress bar.
        **kwargs: Forwarded to ``train_func``.

    Raises:
        ValueError: On invalid arguments or if ``path`` holds a different run.
    """
    ds_idx = loader_dataset_indices(dataloader)
    plan = plan_lds(
        path,
        ds_idx,
        num_subsets,
        subset_ratio,
        num_runs_per_subset,
        seed,
        start_id=start_id,
        total_num_subsets=total_num_subsets,
        train_func=func_name(train_func),
    )
    for i, positions, j in tqdm(plan.jobs, desc="retrain_lds", disable=not verbose):
        run_seed = plan.run_seed(i, j)
        loader = make_subset_loader(
            dataloader, [ds_idx[p] for p in positions], shuffle=True, seed=run_seed
        )
        model = train_func(loader, seed=run_seed, **kwargs)
        atomic_torch_save(to_state_dict(model), plan.weights_file(i, j))
    plan.finalize(func_name(train_func))


def retrain_loo(
    train_func: Callable[..., Any],
    dataloader: DataLoader,
    path: str | Path,
    indices: Sequence[int] | None = None,
    seed: int | None = None,
    *,
    verbose: bool = True,
    **kwargs: Any,
) -> None:
    """Retrain one model per left-out training sample (LOO ground truth).

    For each position ``p`` in ``indices`` (default: all ``0..n-1``, with
    ``n = len(dataloader.sampler)``), trains
    ``train_func(loader_without_p, seed=seed, **kwargs)`` on all other samples
    (sampler's actual dataset indices, same batch size, no shuffling) and saves
    the returned model's ``state_dict`` to ``path/index_<p>/model_weights.pt``.
    Every model gets the same ``seed`` so that they differ only by the data.
    ``metadata.yml`` records the union of all positions trained so far; existing
    weights files are skipped (resumable).

    Read the results with :func:`dattri.metric.calculate_loo_ground_truth`, whose
    ``target_func`` receives the checkpoint *path* (load it with
    ``torch.load(path, weights_only=True)`` into a fresh model).

    Args:
        train_func: ``train_func(loader, seed=..., **kwargs)`` returning a trained
            ``nn.Module`` (or its state_dict).
        dataloader: Loader over the full training set.
        path: Output directory (created if needed).
        indices: Positions to leave out (rows of the score matrix).
        seed: Seed passed to every ``train_func`` call.
        verbose: Show a tqdm progress bar.
        **kwargs: Forwarded to ``train_func``.

    Raises:
        ValueError: If an index is out of range or ``path`` holds another run.
    """
    ds_idx = loader_dataset_indices(dataloader)
    n = len(ds_idx)
    positions = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [p for p in positions if not 0 <= p < n]
    if bad:
        msg = f"`indices` must be positions in [0, {n}); got out-of-range values {bad[:5]}."
        raise ValueError(msg)
    if len(set(positions)) != len(positions):
        msg = "`indices` contains duplicates."
        raise ValueError(msg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta_file = path / METADATA_FILE
    previous: list[int] = []
    if meta_file.exists():
        meta = read_yaml(meta_file)
        diffs = []
        if meta.get("mode") != "loo":
            diffs.append(f"mode: {meta.get('mode')!r} recorded, 'loo' in this call")
        if int(meta.get("data_length", -1)) != n:
            diffs.append(
                f"data_length: {meta.get('data_length')!r} recorded, {n} in this call "
                "(len(dataloader.sampler))"
            )
        name = func_name(train_func)
        if meta.get("train_func") not in (None, name):
            diffs.append(f"train_func: {meta.get('train_func')!r} recorded, {name!r} in this call")
        if diffs:
            msg = (
                f"`path` {path} already holds a different retraining (LOO) ({meta_file}); "
                f"these fields differ: {'; '.join(diffs)}. Fix: pass the recorded values "
                f"to resume/extend that run, or use a new `path` (or delete {path})."
            )
            raise ValueError(msg)
        previous = [int(i) for i in meta.get("indices", [])]

    todo = [p for p in positions if not (path / f"index_{p}" / "model_weights.pt").exists()]
    for p in tqdm(todo, desc="retrain_loo", disable=not verbose):
        keep = ds_idx[:p] + ds_idx[p + 1 :]
        loader = make_subset_loader(dataloader, keep, shuffle=False, seed=None)
        model = train_func(loader, seed=seed, **kwargs)
        atomic_torch_save(to_state_dict(model), path / f"index_{p}" / "model_weights.pt")

    all_pos = sorted(set(previous) | set(positions))
    write_yaml(
        {
            "mode": "loo",
            "data_length": n,
            "train_func": func_name(train_func),
            "seed": None if seed is None else int(seed),
            "indices": all_pos,
            "dataset_indices": [int(ds_idx[p]) for p in all_pos],
            "map_index_dir": {p: f"index_{p}" for p in all_pos},
        },
        meta_file,
    )
