"""Exact KNN-Shapley values (Jia et al., 2019).

For a test point ``z`` with label ``y`` and a K-nearest-neighbour classifier, the
utility of a training subset ``S`` is

``U(S) = (1/K) * sum_{k=1}^{min(K, |S|)} 1[y_{a_k(S)} = y]``

where ``a_k(S)`` is the k-th nearest neighbour of ``z`` in ``S``. Its Shapley values
have a closed form (Jia et al., "Efficient Task-Specific Data Valuation for Nearest
Neighbor Algorithms", VLDB 2019, Theorem 1): with the training points sorted by
increasing distance ``a_1, ..., a_N`` and ``m_i = 1[y_{a_i} = y]``,

``s(a_N) = m_N / N``,
``s(a_i) = s(a_{i+1}) + (m_i - m_{i+1}) / K * min(K, i) / i``  (1-based ``i``).

The paper assumes ``K <= N``; for ``K > N`` the utility is additive and the exact
values are ``m_i / K``, which the base case ``s(a_N) = m_N * min(K, N) / (N * K)``
used here gives for every ``K`` (it equals ``m_N / N`` when ``K <= N``).

Here the recursion is evaluated for a whole batch of test points at once with a
sort and a reversed cumulative sum (``O(N log N)`` per test point, no Python loop
over training points). Distance ties are broken by the training order (a stable
sort: the earlier training sample counts as nearer), which is the tie rule of the
utility above.

Pipeline: values are produced per test block as ``(train rows, test block)`` tiles into
a sink (a tensor, a ``.npy`` file with ``out=``, a streaming top-k). ``max_memory``
sets the test block (the distances and sort buffers of one block). Under
torch.distributed each rank computes the distances to its share of the training
rows; the distance rows are gathered (the sort needs all of them) and each rank emits
the tiles of its own rows. There are no train-side features to store, so
``cache_dir``/``store_dtype`` do not apply (a clear error says so).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.runtime.batching import (
    batch_size_of,
    check_loader,
    iterate,
    move_to_device,
    slice_batch,
)
from dattri.algorithm.runtime.distributed import gather_rows, is_distributed
from dattri.algorithm.runtime.validation import resolve_device
from dattri.algorithm.score.tiles import (
    ScoreFile,
    iter_row_batches,
    parse_memory,
    scores_of_tiles,
    topk_of_tiles,
)
from dattri.algorithm.score.topk import TopKResult
from dattri.algorithm.store.memmap_store import batch_plan

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["KNNShapleyAttributor", "default_dist_func", "knn_shapley_values"]


def _features(batch: Any) -> Tensor:
    """The feature tensor of a batch, flattened to ``(B, D)``.

    Tuples/lists: the first element; dicts: the first value; tensors: themselves.
    """
    if isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, Mapping):
        x = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)) and len(batch) > 0:
        x = batch[0]
    else:
        msg = f"Cannot find features in a batch of type {type(batch).__name__}."
        raise TypeError(msg)
    if not isinstance(x, Tensor):
        msg = f"The feature entry of the batch must be a tensor, got {type(x).__name__}."
        raise TypeError(msg)
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.double()


def default_dist_func(batch_x: Any, batch_y: Any) -> Tensor:
    """Euclidean distances between the features of two batches.

    The features are the first element of a tuple/list batch (``(x, y)``), the first
    value of a dict batch, or the batch itself if it is a tensor; they are flattened
    to ``(B, D)``.

    Args:
        batch_x: a batch of ``B_x`` samples (the test batch in the attributor).
        batch_y: a batch of ``B_y`` samples (the train batch in the attributor).

    Returns:
        ``(B_x, B_y)`` distances.
    """
    fx, fy = _features(batch_x), _features(batch_y)
    dtype = torch.promote_types(fx.dtype, fy.dtype)
    return torch.cdist(fx.to(dtype), fy.to(dtype))


def knn_shapley_values(dist: Tensor, match: Tensor, k_neighbors: int) -> Tensor:
    """Exact KNN-Shapley values from distances and label matches.

    Args:
        dist: ``(n_test, n_train)`` distances from each test point to each train point.
        match: ``(n_test, n_train)`` bool/0-1 tensor, ``1`` where the training label
            equals the test label.
        k_neighbors: K of the KNN classifier.

    Returns:
        ``(n_test, n_train)`` float64 Shapley values (ties in distance: the earlier
        training sample counts as nearer).
    """
    if dist.shape != match.shape or dist.ndim != 2:
        msg = f"dist and match must both be (n_test, n_train); got {dist.shape}, {match.shape}."
        raise ValueError(msg)
    n = dist.shape[1]
    order = torch.argsort(dist, dim=1, stable=True)
    m = torch.gather(match.to(torch.float64), 1, order)
    last = m[:, -1:] * (min(k_neighbors, n) / (n * k_neighbors))
    i = torch.arange(1, n, device=dist.device, dtype=torch.float64)
    coef = i.clamp(max=k_neighbors) / (i * k_neighbors)
    diff = (m[:, :-1] - m[:, 1:]) * coef
    tail = diff.flip(1).cumsum(1).flip(1)
    sorted_vals = torch.cat([tail + last, last], dim=1)
    return torch.empty_like(sorted_vals).scatter_(1, order, sorted_vals)


class KNNShapleyAttributor(BaseAttributor):
    """Exact Shapley values of the K-nearest-neighbour utility (Jia et al., 2019).

    ``attribute(train, test)`` returns **(n_test, n_train)** (upstream dattri layout,
    kept for compatibility); :meth:`attribute_train_test` returns the usual
    ``(n_train, n_test)`` layout. Larger value = the training point helps the KNN
    classifier predict the test label.

    Labels: by default the last element of each tuple/list batch, or
    ``batch[label_key]`` for dict batches; alternatively pass ``train_labels`` /
    ``test_labels`` explicitly.

    Args:
        k_neighbors: K of the KNN classifier (positive int).
        task: must be None (a task-based KNN-Shapley is not implemented).
        distance_func: ``f(test_batch, train_batch) -> (B_test, B_train)`` distances;
            default :func:`default_dist_func` (Euclidean on the flattened features).
        label_key: label entry of dict batches.
        device: device for the distances and values.
        verbose: show progress bars.
        **scale: ``max_memory``, the budget of the per-test-block buffers (distances,
            sort and values: about ``64 * n_train`` bytes per test sample; test batches
            are split into blocks that fit; the training batches themselves are held
            in memory). ``cache_dir`` and ``store_dtype`` do not apply (nothing is
            cached): a ``ValueError`` says so.
    """

    def __init__(
        self,
        k_neighbors: int,
        task: Any = None,
        distance_func: Callable[[Any, Any], Tensor] | None = None,
        *,
        label_key: str = "labels",
        device: str | torch.device = "cpu",
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        for name, value in scale.items():
            if name not in ("cache_dir", "store_dtype", "max_memory"):
                msg = f"KNNShapleyAttributor got an unexpected keyword argument {name!r}."
                raise TypeError(msg)
            if name != "max_memory" and value is not None:
                msg = (
                    f"KNNShapleyAttributor does not take {name}: it has no train-side "
                    "features to store (distances are computed on the batches at "
                    f"attribution time). Remove {name}=...; max_memory= bounds the "
                    "working memory."
                )
                raise ValueError(msg)
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            msg = f"k_neighbors must be a positive int, got {k_neighbors!r}."
            raise ValueError(msg)
        if task is not None:
            msg = (
                "KNNShapleyAttributor with a task is not implemented: pass task=None and "
                "a distance_func on your features (e.g. embeddings of a trained model)."
            )
            raise NotImplementedError(msg)
        if distance_func is not None and not callable(distance_func):
            msg = "distance_func must be callable: f(test_batch, train_batch) -> (B_test, B_train)."
            raise TypeError(msg)
        self.k_neighbors = k_neighbors
        self.task = None
        self.distance_func = distance_func or default_dist_func
        self.label_key = label_key
        self.device = resolve_device(device)
        self.verbose = verbose
        #: working-memory budget in bytes (None: one test batch at a time)
        self.max_memory = parse_memory(scale.get("max_memory"))

    def cache(self, full_train_dataloader: Iterable | None = None) -> None:
        """Nothing to precompute (KNN-Shapley is computed at attribution time).

        Args:
            full_train_dataloader: ignored (accepted for interface uniformity).
        """

    # ------------------------------------------------------------------ data
    def _batch_labels(self, batch: Any, name: str) -> Tensor:
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                msg = (
                    f"{name}: dict batch has no label entry {self.label_key!r} (keys: "
                    f"{list(batch)}); set label_key=... or pass the labels explicitly."
                )
                raise ValueError(msg)
            return batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[-1]
        msg = (
            f"{name}: cannot read labels from a batch of type {type(batch).__name__}; "
            "use (x, y) batches, dict batches with label_key, or pass the labels."
        )
        raise ValueError(msg)

    def _labels(
        self, batches: list[Any], labels: Sequence | Tensor | None, n: int, name: str
    ) -> Tensor:
        """``(n, L)`` labels: given, or read from the batches."""
        if labels is None:
            lab = torch.cat([self._batch_labels(b, f"{name}_dataloader") for b in batches])
        else:
            lab = torch.as_tensor(labels, device=self.device)
            if lab.shape[0] != n:
                msg = f"{name}_labels has {lab.shape[0]} entries but {name}_dataloader has {n}."
                raise ValueError(msg)
        return lab.reshape(n, -1)

    def _test_block(self, n_train: int) -> int | None:
        """Test samples per block under ``max_memory`` (None: whole test batches)."""
        if self.max_memory is None:
            return None
        per_row = 64 * max(n_train, 1)  # ~8 float64/int64 (B, n_train) buffers
        if self.max_memory < 2 * per_row:
            msg = (
                f"max_memory={self.max_memory} bytes is too small for one test sample "
                f"against {n_train} training samples; raise it to at least {2 * per_row}."
            )
            raise ValueError(msg)
        return self.max_memory // (2 * per_row)

    def _test_blocks(self, batches: list[Any], block: int | None) -> Iterator[Any]:
        for batch in batches:
            size = batch_size_of(batch)
            step = size if block is None else block
            for s in range(0, size, step):
                yield batch if step >= size else slice_batch(batch, slice(s, s + step))

    # --------------------------------------------------------------- scoring
    def _iter_tiles(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None,
        test_labels: Sequence | Tensor | None,
    ) -> tuple[int, int, int, Iterator[tuple[int, int, Tensor]]]:
        """``(n_train, n_test, row0, tiles)``: this rank's ``(row, col, (rows, cols))`` tiles."""
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        pairs = list(iter_row_batches(train_dataloader, True))
        train = [move_to_device(b, self.device) for _, b, _ in pairs]
        row0 = pairs[0][2] if pairs else 0
        n_local = sum(batch_size_of(b) for b in train)
        n_train = sum(batch_plan(train_dataloader)) if is_distributed() else n_local
        if train_labels is None:
            y_train = gather_rows(self._labels(train, None, n_local, "train"))
        else:
            y_train = self._labels(train, train_labels, n_train, "train")
        test = [
            move_to_device(b, self.device) for b in iterate(test_dataloader, "loading test", False)
        ]
        n_test = sum(batch_size_of(b) for b in test)
        y_test = self._labels(test, test_labels, n_test, "test")
        blocks = self._test_blocks(test, self._test_block(n_train))
        tiles = self._tiles(train, blocks, y_train, y_test, row0, n_local)
        return n_train, n_test, row0, tiles

    def _distances(self, batch: Any, train: list[Any], col: int) -> Tensor:
        try:
            if not train:
                return torch.zeros(batch_size_of(batch), 0, device=self.device)
            return torch.cat([self.distance_func(batch, tb) for tb in train], dim=1)
        except RuntimeError as err:
            msg = (
                f"distance_func failed on the test batch starting at test sample {col}: "
                f"{err}. Its features have shape {tuple(_features(batch).shape[1:])}, "
                f"the training features {tuple(_features(train[0]).shape[1:])}; "
                "test samples must have the training samples' feature size."
            )
            raise ValueError(msg) from err

    def _tiles(
        self,
        train: list[Any],
        blocks: Iterator[Any],
        y_train: Tensor,
        y_test: Tensor,
        row0: int,
        n_local: int,
    ) -> Iterator[tuple[int, int, Tensor]]:
        col = 0
        for batch in iterate(blocks, "KNN-Shapley", self.verbose):
            bt = batch_size_of(batch)
            dist = self._distances(batch, train, col)
            if is_distributed():
                dist = gather_rows(dist.T.contiguous()).T
            if dist.shape != (bt, y_train.shape[0]):
                msg = (
                    f"distance_func returned shape {tuple(dist.shape)}; expected "
                    f"(B_test, B_train) summing to {(bt, y_train.shape[0])}."
                )
                raise ValueError(msg)
            yt = y_test[col : col + bt]
            match = (y_train.unsqueeze(0) == yt.unsqueeze(1)).all(dim=-1)
            vals = knn_shapley_values(dist, match, self.k_neighbors)
            out_dtype = torch.float64 if dist.dtype == torch.float64 else torch.float32
            yield row0, col, vals[:, row0 : row0 + n_local].T.to(out_dtype)
            col += bt

    def _scores(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None,
        test_labels: Sequence | Tensor | None,
        out: str | os.PathLike | None,
        transpose: bool,
    ) -> Tensor:
        n_train, n_test, _, tiles = self._iter_tiles(
            train_dataloader, test_dataloader, train_labels, test_labels
        )
        first = next(tiles, None)  # the values' dtype follows the distances'
        if first is None:
            msg = "test_dataloader yielded no sample."
            raise ValueError(msg)
        dtype, tiles = first[2].dtype, itertools.chain([first], tiles)
        if transpose:  # upstream's (n_test, n_train) layout
            tiles = ((col, row, tile.T) for row, col, tile in tiles)
            n_train, n_test = n_test, n_train
        return scores_of_tiles(tiles, out, n_train, n_test, dtype, self.device)

    def attribute(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None = None,
        test_labels: Sequence | Tensor | None = None,
        *,
        out: ScoreFile = None,
    ) -> Tensor:
        """KNN-Shapley value of every training point for every test point.

        Args:
            train_dataloader: training samples (not shuffled).
            test_dataloader: test samples (not shuffled).
            train_labels: optional ``n_train`` labels (default: read from batches).
            test_labels: optional ``n_test`` labels (default: read from batches).
            out: path of a ``.npy`` file for the ``(n_test, n_train)`` values (written
                block by block; a memory-mapped float32 tensor on it is returned).

        Returns:
            ``(n_test, n_train)`` values (upstream layout; see
            :meth:`attribute_train_test` for ``(n_train, n_test)``); computed in
            float64, returned in float64 for float64 distances, else float32.
        """
        return self._scores(train_dataloader, test_dataloader, train_labels, test_labels, out, True)

    def attribute_train_test(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None = None,
        test_labels: Sequence | Tensor | None = None,
        *,
        out: ScoreFile = None,
    ) -> Tensor:
        """Same as :meth:`attribute` (same arguments) in the ``(n_train, n_test)`` layout.

        Returns:
            ``(n_train, n_test)`` values.
        """
        return self._scores(
            train_dataloader, test_dataloader, train_labels, test_labels, out, False
        )

    def attribute_topk(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        k: int,
        train_labels: Sequence | Tensor | None = None,
        test_labels: Sequence | Tensor | None = None,
    ) -> TopKResult:
        """Per-test top-k most/least valuable training points, streamed block by block.

        Args:
            train_dataloader: training samples.
            test_dataloader: test samples.
            k: training samples per side.
            train_labels: optional training labels.
            test_labels: optional test labels.

        Returns:
            A :class:`~dattri.algorithm.score.topk.TopKResult` with ``(n_test, k)`` tensors.
        """
        _, n_test, _, tiles = self._iter_tiles(
            train_dataloader, test_dataloader, train_labels, test_labels
        )
        return topk_of_tiles(tiles, k, n_test)

    def self_attribute(
        self, train_dataloader: Iterable, train_labels: Sequence | Tensor | None = None
    ) -> Tensor:
        """Value of each training point for predicting its own label.

        Equals ``attribute_train_test(train, train).diag()`` (the whole training set is
        the KNN's data), computed per block without the full matrix.

        Args:
            train_dataloader: training samples.
            train_labels: optional training labels.

        Returns:
            ``(n_train,)`` values.
        """
        _, _, row0, tiles = self._iter_tiles(
            train_dataloader, train_dataloader, train_labels, train_labels
        )
        parts = []
        for _, col, tile in tiles:
            # diagonal entries (i, i) of this tile: rows row0.., columns col..
            lo, hi = max(row0, col), min(row0 + tile.shape[0], col + tile.shape[1])
            if hi <= lo:
                continue
            idx = torch.arange(lo, hi, device=tile.device)
            parts.append(tile[idx - row0, idx - col])
        local = torch.cat(parts) if parts else torch.zeros(0, device=self.device)
        return gather_rows(local)
