"""DVEmb's data value embeddings: the backward recursion and its resumable store.

From the recorded SGD steps ``(epoch, g_t (B_t, d), eta_t, indices_t)`` the
embeddings are computed backwards in time (Wang et al., ICLR 2025):

``e_t = eta_t (g_t - g_t M^T)``, ``emb_epoch[idx_t] += e_t``, ``M += e_t^T g_t``,

with ``M`` (``d x d``) carried across epochs (:class:`EmbeddingRecursion`; kept
implicitly as ``E^T G`` when that is smaller). :func:`cache_embeddings` runs it and,
with a store directory (``cache_dir``, or a temporary one under ``max_memory``),
writes each epoch's ``(n, d)`` embedding to a
:class:`~dattri.algorithm.store.memmap_store.MemmapFeatureStore` together with the
recursion state after that epoch: an interrupted ``cache()`` resumes after the last
finished epoch, and a store written from other recorded steps is refused.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dattri.algorithm.runtime.distributed import (
    broadcast_object,
    gather_rows,
    is_distributed,
    rank_world,
    shard_range,
)
from dattri.algorithm.store.memmap_store import MemmapFeatureStore, StoredRows, parse_store_dtype
from dattri.algorithm.store.scaled import ScaleOptions

__all__ = [
    "DVEMB_METHODS",
    "EmbeddingRecursion",
    "EmbeddingRows",
    "cache_embeddings",
    "check_step_args",
    "dvemb_embeddings",
    "iter_epoch_embeddings",
    "recorded_steps",
    "rows_of",
    "steps_fingerprint",
]

DVEMB_METHODS = ("auto", "dense", "low_rank")
#: recursion state after the last finished epoch, next to the store's arrays
STATE_FILE = "dvemb_state.pt"

Step = tuple[Any, Tensor, float, Tensor]


class EmbeddingRecursion:
    """The carried matrix ``M`` of the backward recursion, dense or low-rank.

    Args:
        dim: gradient dimension ``d``.
        n_rows: total number of recorded sample-steps ``N``.
        dtype: compute dtype.
        device: compute device.
        low_rank: keep ``M = E^T G`` through the processed rows instead of ``d x d``.
        cols: compute only these embedding columns (rows of ``M``); column ``c`` of
            ``e_t`` needs row ``c`` of ``M`` only, so ranks can split the columns.
    """

    def __init__(
        self,
        dim: int,
        n_rows: int,
        dtype: torch.dtype,
        device: torch.device,
        low_rank: bool,
        cols: slice | None = None,
    ) -> None:
        self.low_rank = low_rank
        self.cols = slice(0, dim) if cols is None else cols
        width = len(range(dim)[self.cols])
        if low_rank:
            self.g_buf = torch.empty(n_rows, dim, dtype=dtype, device=device)
            self.e_buf = torch.empty(n_rows, width, dtype=dtype, device=device)
            self.pos = n_rows
        else:
            self.m = torch.zeros(width, dim, dtype=dtype, device=device)

    def step(self, g: Tensor, eta: float) -> Tensor:
        """Embeddings ``(B, d_cols)`` of one step's gradients ``g`` (steps in reverse order)."""
        gc = g[:, self.cols]
        if self.low_rank:
            e = eta * (gc - (g @ self.g_buf[self.pos :].T) @ self.e_buf[self.pos :])
            self.pos -= g.shape[0]
            self.g_buf[self.pos : self.pos + g.shape[0]] = g
            self.e_buf[self.pos : self.pos + g.shape[0]] = e
        else:
            e = eta * (gc - g @ self.m.T)
            self.m += e.T @ g
        return e

    def state(self) -> dict[str, Tensor]:
        """The state to resume from (CPU tensors)."""
        if self.low_rank:
            return {
                "pos": torch.tensor(self.pos),
                "g": self.g_buf[self.pos :].cpu(),
                "e": self.e_buf[self.pos :].cpu(),
            }
        return {"m": self.m.cpu()}

    def load(self, state: dict[str, Tensor]) -> None:
        """Continue from a :meth:`state`."""
        if self.low_rank:
            self.pos = int(state["pos"])
            self.g_buf[self.pos :] = state["g"].to(self.g_buf)
            self.e_buf[self.pos :] = state["e"].to(self.e_buf)
        else:
            self.m.copy_(state["m"].to(self.m))


def _epoch_groups(steps: Sequence[Step]) -> list[tuple[Any, list[Step]]]:
    """Runs of consecutive steps of the same epoch, in chronological order."""
    groups: list[tuple[Any, list[Step]]] = []
    for s in steps:
        if groups and groups[-1][0] == s[0]:
            groups[-1][1].append(s)
        else:
            groups.append((s[0], [s]))
    return groups


def _check_steps(steps: Sequence[Step], method: str) -> tuple[int, torch.dtype, bool]:
    if method not in DVEMB_METHODS:
        msg = f"method must be one of {DVEMB_METHODS}, got {method!r}."
        raise ValueError(msg)
    dims = {g.shape[1] for _, g, _, _ in steps}
    if len(dims) != 1:
        msg = f"All recorded gradients must have the same dimension; got {sorted(dims)}."
        raise ValueError(msg)
    d = dims.pop()
    n_rows = sum(g.shape[0] for _, g, _, _ in steps)
    low_rank = method == "low_rank" or (method == "auto" and n_rows < 2 * d)
    return d, steps[0][1].dtype, low_rank


def _check_finite(e: Tensor, epoch: Any) -> None:
    if not bool(torch.isfinite(e).all()):
        msg = (
            f"Non-finite DVEmb values at epoch {epoch}: the learning rates or "
            "gradients are too large (or contain NaN/inf)."
        )
        raise ValueError(msg)


def iter_epoch_embeddings(
    steps: Sequence[Step],
    num_samples: int,
    device: str | torch.device = "cpu",
    method: str = "auto",
    verbose: bool = False,
    *,
    skip: int = 0,
    state: dict[str, Tensor] | None = None,
    split: bool = False,
) -> Iterator[tuple[int, Any, Tensor, EmbeddingRecursion]]:
    """Yield ``(group, epoch, (num_samples, d) embedding, recursion)``, last epoch first.

    Args:
        steps: chronological ``(epoch, grads (B_t, d), eta_t, indices (B_t,))``.
        num_samples: rows of each embedding.
        device: compute device.
        method: ``"dense"``, ``"low_rank"`` or ``"auto"`` (low-rank iff ``N < 2 d``).
        verbose: progress bar.
        skip: number of epoch groups (from the last) already done; ``state`` is the
            recursion state after them.
        state: see ``skip``.
        split: under torch.distributed, each rank computes its share of the ``d``
            embedding columns and the columns are gathered after each epoch.

    Raises:
        ValueError: on NaN/inf, an unknown method or inconsistent shapes.
    """
    d, dtype, low_rank = _check_steps(steps, method)
    n_rows = sum(g.shape[0] for _, g, _, _ in steps)
    split = split and is_distributed()
    cols = slice(shard_range(d).start, shard_range(d).stop) if split else None
    rec = EmbeddingRecursion(d, n_rows, dtype, torch.device(device), low_rank, cols)
    if state is not None:
        rec.load(state)
    groups = list(reversed(_epoch_groups(steps)))
    todo = sum(len(g) for _, g in groups[skip:])
    bar = tqdm(total=todo, desc="DVEmb", disable=not verbose, leave=False)
    for gi, (epoch, group) in enumerate(groups):
        if gi < skip:
            continue
        out = torch.zeros(num_samples, len(range(d)[rec.cols]), dtype=dtype, device=device)
        for _, grads, eta, idx in reversed(group):
            e = rec.step(grads.to(device=device, dtype=dtype), eta)
            if not split:
                _check_finite(e, epoch)
            out.index_add_(0, idx.to(device=device, dtype=torch.long), e)
            bar.update(1)
        if split:  # (n, d) from every rank's columns; NaN anywhere seen by all ranks
            out = gather_rows(out.T.contiguous()).T.contiguous()
            _check_finite(out, epoch)
        yield gi, epoch, out, rec
    bar.close()


def dvemb_embeddings(
    steps: Sequence[Step],
    num_samples: int,
    device: str | torch.device = "cpu",
    method: str = "auto",
    verbose: bool = False,
) -> dict[Any, Tensor]:
    """Data value embeddings from recorded training steps (backward recursion).

    Args:
        steps: chronological list of ``(epoch, grads (B_t, d), eta_t, indices (B_t,))``;
            ``eta_t`` multiplies the per-sample gradients in the SGD update
            (``lr / B`` for a mean loss).
        num_samples: number of training samples (rows of each embedding).
        device: device of the computation.
        method: ``"dense"`` (``d x d`` matrix ``M``), ``"low_rank"`` (``M = E^T G``
            kept implicitly) or ``"auto"`` (low-rank iff ``N < 2 d``, ``N`` = number of
            recorded sample-steps).
        verbose: progress bar.

    Returns:
        ``{epoch: (num_samples, d)}`` embeddings (summed over the steps of the epoch).

    Raises:
        ValueError: on NaN/inf, an unknown method or inconsistent shapes.
    """
    out: dict[Any, Tensor] = {}
    for _, epoch, emb, _ in iter_epoch_embeddings(steps, num_samples, device, method, verbose):
        out[epoch] = emb if epoch not in out else out[epoch] + emb
    return out


def steps_fingerprint(steps: Sequence[Step]) -> str:
    """SHA-256 of the recorded steps (epoch keys, step sizes, indices, gradients)."""
    digest = hashlib.sha256()
    for epoch, g, eta, idx in steps:
        digest.update(f"{epoch!r}:{float(eta)!r}:{tuple(g.shape)}:{g.dtype};".encode())
        digest.update(idx.detach().cpu().long().contiguous().numpy().tobytes())
        digest.update(g.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_state(path: Path, after: int, state: dict[str, Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"after": after, **state}, tmp)
    os.replace(tmp, path)


def _resume_point(store: MemmapFeatureStore, units: list[str]) -> tuple[int, dict | None]:
    """``(groups done, state after them)`` from a store (``(0, None)``: start over)."""
    path = store.directory / STATE_FILE
    if not path.exists():
        return 0, None
    try:
        saved = torch.load(path, weights_only=True)
        after = int(saved.pop("after"))
    except Exception:
        return 0, None
    if not all(store.is_complete(u) for u in units[:after]):
        return 0, None
    if any(store.verify_unit(u) for u in units[:after]):  # damaged rows: warned, redo
        return 0, None
    return after, saved


def _fill(
    store: MemmapFeatureStore,
    units: list[str],
    steps: Sequence[Step],
    num_samples: int,
    device: torch.device,
    method: str,
    verbose: bool,
) -> None:
    """Run the recursion from the last finished epoch, writing each epoch and the state."""
    done, state = _resume_point(store, units)
    if done and verbose:
        print(
            f"Resuming the DVEmb embedding store in {str(store.directory)!r}: {done} of "
            f"{len(units)} epochs already written.",
            file=sys.stderr,
            flush=True,
        )
    if done == len(units):
        return
    state_path = store.directory / STATE_FILE
    for gi, _, emb, rec in iter_epoch_embeddings(
        steps, num_samples, device, method, verbose, skip=done, state=state
    ):
        store.put(units[gi], 0, {f"emb_{gi}": emb})
        store.commit()
        _save_state(state_path, gi + 1, rec.state())


def cache_embeddings(
    steps: Sequence[Step],
    num_samples: int,
    device: torch.device,
    method: str,
    options: ScaleOptions,
    owner: object,
    settings: dict[str, Any],
    verbose: bool = False,
) -> dict[Any, Tensor | StoredRows]:
    """Embeddings of every epoch, in memory or in a resumable store.

    Args:
        steps: chronological recorded steps (see :func:`dvemb_embeddings`).
        num_samples: rows of each embedding.
        device: compute device (and device of the returned rows).
        method: recursion method.
        options: ``cache_dir`` / ``store_dtype`` / ``max_memory``.
        owner: the attributor (owns a temporary store, if any).
        settings: what else the store must match (featurizer settings).
        verbose: progress bars and a line when a store is reused or resumed.

    Returns:
        ``{epoch: (num_samples, d)}`` tensors, or :class:`StoredRows` from the store.
    """
    d, dtype, _ = _check_steps(steps, method)
    groups = _epoch_groups(steps)
    epochs = [e for e, _ in groups]
    if len(set(map(repr, epochs))) != len(epochs):  # an epoch in several runs of steps
        msg = "The recorded steps of each epoch must be consecutive."
        raise ValueError(msg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    directory = options.store_dir(owner, len(groups) * num_samples * d * itemsize)
    if directory is None:  # in memory; ranks split the embedding columns
        its = iter_epoch_embeddings(steps, num_samples, device, method, verbose, split=True)
        return {epoch: emb for _, epoch, emb, _ in its}
    store_dtype = parse_store_dtype(options.store_dtype, dtype)
    full = {
        "kind": "DVEmb embeddings",
        "steps": steps_fingerprint(steps),
        "epochs": [repr(e) for e in epochs],
        "method": method,
        **settings,
    }
    # units/arrays are numbered from the LAST epoch (the recursion's order)
    units = [f"epoch{i}" for i in range(len(groups))]
    arrays = {f"emb_{i}": ((d,), store_dtype) for i in range(len(groups))}
    store = MemmapFeatureStore.open(directory, full, num_samples, arrays)
    error = None
    if rank_world()[0] == 0:  # the recursion is sequential: rank 0 runs it
        try:
            _fill(store, units, steps, num_samples, device, method, verbose)
        except Exception as err:
            if not is_distributed():
                raise
            error = f"{type(err).__name__}: {err}"
    if is_distributed():
        error = broadcast_object(error)  # the other ranks must not wait forever
        if error is not None:
            msg = f"Rank 0 failed to compute the DVEmb embeddings: {error}"
            raise RuntimeError(msg)
    store.sync()
    missing = [u for u in units if not store.is_complete(u)]
    if missing:
        msg = f"The DVEmb embedding store is incomplete after cache(): {missing}."
        raise RuntimeError(msg)
    n_groups = len(groups)
    return {
        epochs[n_groups - 1 - i]: StoredRows(store, f"emb_{i}", dtype, device)
        for i in range(n_groups)
    }


def rows_of(source: Tensor | StoredRows, index: np.ndarray) -> Tensor:
    """Rows ``index`` of a tensor or stored array (read as contiguous runs)."""
    if isinstance(source, Tensor):
        return source[torch.as_tensor(index, device=source.device, dtype=torch.long)]
    if index.size == 0:
        return source[0:0]
    cuts = np.flatnonzero(np.diff(index) != 1) + 1
    parts = [source[int(r[0]) : int(r[-1]) + 1] for r in np.split(index, cuts)]
    return torch.cat(parts)


class EmbeddingRows:
    """Rows of ``sum_e E_e[index]``, read by step-1 slices (tensors or stored arrays).

    Args:
        sources: per-epoch ``(n, d)`` embeddings (summed in this order).
        index: selected rows (None: all).
    """

    def __init__(self, sources: list[Tensor | StoredRows], index: np.ndarray | None) -> None:
        self.sources = sources
        self.index = index
        n = sources[0].shape[0] if index is None else len(index)
        self.shape = torch.Size((n, sources[0].shape[1]))
        self.dtype, self.device = sources[0].dtype, sources[0].device

    def __getitem__(self, rows: slice) -> Tensor:
        if self.index is None:
            return sum(s[rows] for s in self.sources)
        return sum(rows_of(s, self.index[rows]) for s in self.sources)


def check_step_args(indices: Any, learning_rate: Any) -> Tensor:
    """Validated ``(B,)`` dataset indices of one recorded step.

    Raises:
        TypeError: for a non-numeric ``learning_rate``.
        ValueError: for negative or non-integer ``indices``.
    """
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        msg = f"learning_rate must be a number, got {type(learning_rate).__name__}."
        raise TypeError(msg)
    idx = torch.as_tensor(indices).reshape(-1)
    if idx.is_floating_point() or (idx.numel() and int(idx.min()) < 0):
        msg = "indices must be non-negative integer dataset indices of the batch samples."
        raise ValueError(msg)
    return idx


def recorded_steps(
    grads: dict[Any, list[Tensor]],
    lrs: dict[Any, list[float]],
    idxs: dict[Any, list[Tensor]],
) -> tuple[list[Step], int]:
    """Chronological steps (epochs sorted) and the number of samples ``max index + 1``.

    Args:
        grads: ``{epoch: [grads (B_t, d), ...]}``.
        lrs: ``{epoch: [eta_t, ...]}``.
        idxs: ``{epoch: [indices (B_t,), ...]}``.

    Raises:
        ValueError: if nothing is recorded or the three do not match.
    """
    if not grads or not any(len(v) for v in grads.values()):
        msg = "No gradients cached. Call cache_gradients() during training first."
        raise ValueError(msg)
    steps = []
    for epoch in sorted(grads):
        g_list, l_list, i_list = grads[epoch], lrs.get(epoch), idxs.get(epoch)
        if l_list is None or i_list is None or not len(g_list) == len(l_list) == len(i_list):
            msg = (
                f"Epoch {epoch!r}: gradients, learning rates and data indices must have one "
                "entry per step (pass data_indices with external gradients)."
            )
            raise ValueError(msg)
        for g, lr, ix in zip(g_list, l_list, i_list):
            ix = torch.as_tensor(ix).reshape(-1).long()
            if g.ndim != 2 or g.shape[0] != ix.shape[0]:
                msg = f"Epoch {epoch!r}: gradients must be (B, d) matching (B,) indices."
                raise ValueError(msg)
            steps.append((epoch, g, float(lr), ix))
    return steps, int(max(int(ix.max()) for _, _, _, ix in steps)) + 1
