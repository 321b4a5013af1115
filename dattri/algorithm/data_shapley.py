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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.runtime.batching import batch_size_of, check_loader, iterate, move_to_device
from dattri.algorithm.runtime.validation import resolve_device

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
    ) -> None:
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

    def _load(
        self, loader: Iterable, labels: Sequence | Tensor | None, name: str
    ) -> tuple[list[Any], Tensor]:
        """All batches of a loader (on device) and their labels ``(n, L)``."""
        check_loader(loader, f"{name}_dataloader")
        batches = [
            move_to_device(b, self.device) for b in iterate(loader, f"loading {name}", False)
        ]
        n = sum(batch_size_of(b) for b in batches)
        if labels is None:
            lab = torch.cat([self._batch_labels(b, f"{name}_dataloader") for b in batches])
        else:
            lab = torch.as_tensor(labels, device=self.device)
            if lab.shape[0] != n:
                msg = f"{name}_labels has {lab.shape[0]} entries but {name}_dataloader has {n}."
                raise ValueError(msg)
        return batches, lab.reshape(n, -1)

    # --------------------------------------------------------------- scoring
    def _iter_values(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None,
        test_labels: Sequence | Tensor | None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(col_start, values (B_test, n_train))`` per test batch."""
        train_batches, y_train = self._load(train_dataloader, train_labels, "train")
        test_batches, y_test = self._load(test_dataloader, test_labels, "test")
        col = 0
        for batch in iterate(test_batches, "KNN-Shapley", self.verbose):
            bt = batch_size_of(batch)
            try:
                dist = torch.cat([self.distance_func(batch, tb) for tb in train_batches], dim=1)
            except RuntimeError as err:
                msg = (
                    f"distance_func failed on the test batch starting at test sample {col}: "
                    f"{err}. Its features have shape {tuple(_features(batch).shape[1:])}, "
                    f"the training features {tuple(_features(train_batches[0]).shape[1:])}; "
                    "test samples must have the training samples' feature size."
                )
                raise ValueError(msg) from err
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
            yield col, vals.to(out_dtype)
            col += bt

    def attribute(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None = None,
        test_labels: Sequence | Tensor | None = None,
    ) -> Tensor:
        """KNN-Shapley value of every training point for every test point.

        Args:
            train_dataloader: training samples (not shuffled).
            test_dataloader: test samples (not shuffled).
            train_labels: optional ``n_train`` labels (default: read from batches).
            test_labels: optional ``n_test`` labels (default: read from batches).

        Returns:
            ``(n_test, n_train)`` values (upstream layout; see
            :meth:`attribute_train_test` for ``(n_train, n_test)``); computed in
            float64, returned in float64 for float64 distances, else float32.
        """
        it = self._iter_values(train_dataloader, test_dataloader, train_labels, test_labels)
        return torch.cat([v for _, v in it], dim=0)

    def attribute_train_test(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        train_labels: Sequence | Tensor | None = None,
        test_labels: Sequence | Tensor | None = None,
    ) -> Tensor:
        """Same as :meth:`attribute` in the library-wide ``(n_train, n_test)`` layout.

        Args:
            train_dataloader: training samples.
            test_dataloader: test samples.
            train_labels: optional training labels.
            test_labels: optional test labels.

        Returns:
            ``(n_train, n_test)`` values.
        """
        return self.attribute(train_dataloader, test_dataloader, train_labels, test_labels).T

    def _iter_score_blocks(
        self, train_dataloader: Iterable, test_dataloader: Iterable
    ) -> Iterator[tuple[int, Tensor]]:
        yield 0, self.attribute_train_test(train_dataloader, test_dataloader)

    def self_attribute(
        self, train_dataloader: Iterable, train_labels: Sequence | Tensor | None = None
    ) -> Tensor:
        """Value of each training point for predicting its own label.

        Equals ``attribute_train_test(train, train).diag()`` (the whole training set is
        the KNN's data), computed per batch without the full matrix.

        Args:
            train_dataloader: training samples.
            train_labels: optional training labels.

        Returns:
            ``(n_train,)`` values.
        """
        out = []
        for col, vals in self._iter_values(
            train_dataloader, train_dataloader, train_labels, train_labels
        ):
            rows = torch.arange(vals.shape[0], device=vals.device)
            out.append(vals[rows, rows + col])
        return torch.cat(out)
