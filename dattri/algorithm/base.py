"""The shared attributor base classes.

Every attributor has three phases (Kronfluence style):

1. ``cache(train_loader)``: compute and keep the train-side quantities (Hessian
   factorisation, eigenspaces, projected train gradients, ...);
2. ``attribute(train_loader, test_loader)`` -> scores ``(n_train, n_test)``; larger
   score = the training sample helps the test target more. Every attributor also
   takes the loaders by role, ``attribute(train=..., test=...)`` (also
   ``attribute_topk`` and ``self_attribute(train=...)``), whatever its positional
   order (see :mod:`dattri.algorithm.runtime.loader_args`);
3. ``self_attribute(train_loader)`` -> ``(n_train,)``, each sample scored against
   itself (equal to the diagonal of ``attribute(train, train)``).

:class:`BaseInnerProductAttributor` implements the common case
``S[i, j] = sum_k w_k * T_train,k(g_i)^T T_test,k(g_j)`` over checkpoints ``k``: each test
representation is computed and transformed once per test batch, each train gradient
once per train batch, and the score is streamed block by block (so a per-test top-k
never needs the full matrix).
"""

from __future__ import annotations

import inspect
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.features.representations import TrainRepFeaturizer
from dattri.algorithm.runtime.batching import (
    ReusableBuffer,
    batch_size_of,
    check_loader,
    iterate,
    move_to_device,
    slice_batch,
)
from dattri.algorithm.runtime.distributed import gather_rows, is_distributed, shard_range
from dattri.algorithm.runtime.loader_args import WRAPPED_METHODS, loader_keywords
from dattri.algorithm.runtime.validation import (
    check_task,
    require_reiterable,
    resolve_device,
    validate_loader,
)
from dattri.algorithm.score.tiles import (
    ScoreFile,
    TilePlan,
    iter_loader_tiles,
    iter_store_tiles,
    plan_tiles,
    scores_of_tiles,
    topk_of_tiles,
)
from dattri.algorithm.score.topk import TopKAccumulator, TopKResult
from dattri.algorithm.store.in_memory import ProjectedGradientStore
from dattri.algorithm.store.memmap_store import batch_plan, iter_batches
from dattri.algorithm.store.scaled import ScaleOptions, collect_features_scaled
from dattri.task import AttributionTask

__all__ = ["BaseAttributor", "BaseInnerProductAttributor"]

RELATIF_METHODS = ("l", "theta")


class BaseAttributor(ABC):
    """Abstract base of every attributor.

    Subclasses implement :meth:`cache` and :meth:`attribute`; :meth:`self_attribute`
    and :meth:`attribute_topk` have generic fallbacks that subclasses may override
    with faster versions. Each of these methods, in every subclass, also takes its
    loaders by role (``train=``, ``test=``; see
    :func:`~dattri.algorithm.runtime.loader_args.loader_keywords`).
    """

    verbose: bool = True
    #: appended to the error for a role keyword a method has no loader for
    loader_hint: str = ""
    #: whether ``_iter_tiles(train, test, shard=True)`` yields ``(row, col, tile)`` score
    #: tiles of this rank's training rows (the streamed :meth:`attribute_topk` uses it).
    streams_tiles: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give the subclass's loader-taking methods the ``train=``/``test=`` keywords."""
        super().__init_subclass__(**kwargs)
        for name in WRAPPED_METHODS:
            if inspect.isfunction(cls.__dict__.get(name)):
                setattr(cls, name, loader_keywords(cls.__dict__[name], hint=cls.loader_hint))

    @abstractmethod
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Compute and keep the train-side quantities.

        Args:
            full_train_dataloader: the training data (not shuffled).
        """

    @abstractmethod
    @loader_keywords
    def attribute(self, train_dataloader: Iterable, test_dataloader: Iterable) -> Tensor:
        """Score every (train, test) pair.

        Args:
            train_dataloader: training samples (rows of the result).
            test_dataloader: test samples (columns of the result).

        Returns:
            ``(n_train, n_test)`` scores; larger = more helpful.
        """

    def _iter_score_blocks(
        self, train_dataloader: Iterable, test_dataloader: Iterable
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(row_start, block (B_train, n_test))`` score blocks.

        The fallback computes the full matrix once and yields it as one block.
        """
        yield 0, self.attribute(train_dataloader, test_dataloader)

    @loader_keywords
    def attribute_topk(
        self, train_dataloader: Iterable, test_dataloader: Iterable, k: int
    ) -> TopKResult:
        """The ``k`` most helpful and most harmful training samples per test sample.

        Scores are streamed block by block; memory is ``O(n_test * k)`` plus one block.

        Args:
            train_dataloader: training samples.
            test_dataloader: test samples.
            k: number of training samples per side.

        Returns:
            A :class:`~dattri.algorithm.score.topk.TopKResult` with ``(n_test, k)`` tensors.
        """
        if self.streams_tiles:  # tiles of this rank's rows, merged over ranks
            check_loader(test_dataloader, "test_dataloader")
            tiles = self._iter_tiles(train_dataloader, test_dataloader, shard=True)
            return topk_of_tiles(tiles, k, sum(batch_plan(test_dataloader)))
        acc = TopKAccumulator(k)
        for row_start, block in self._iter_score_blocks(train_dataloader, test_dataloader):
            acc.update(block, row_start)
        return acc.result()

    def _setup(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None,
        device: str | torch.device,
        verbose: bool,
        *,
        cache_dir: str | os.PathLike | None = None,
        store_dtype: str | torch.dtype | None = None,
        max_memory: int | str | None = None,
    ) -> None:
        """Check and keep the arguments every attributor shares (in one place)."""
        check_task(task, layer_name)
        self.task = task
        self.layer_name = layer_name
        self.device = resolve_device(device)
        self.verbose = verbose
        self.scale_options = ScaleOptions(cache_dir, store_dtype, max_memory)

    def _check_train_loader(
        self, loader: Iterable, *, keep_batch_dim: bool, mean_batch: bool = False
    ) -> None:
        """The checks every ``cache()`` runs on its loader (kind, first batch vs task)."""
        check_loader(loader, "full_train_dataloader")
        validate_loader(
            self.task,
            loader,
            "full_train_dataloader",
            keep_batch_dim=keep_batch_dim,
            mean_batch=mean_batch,
            target=False,
        )

    @loader_keywords
    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """Score each training sample against itself.

        The fallback computes ``attribute(batch, batch).diag()`` batch by batch.

        Args:
            train_dataloader: training samples.

        Returns:
            ``(n_train,)`` self-influence scores.
        """
        check_loader(train_dataloader, "train_dataloader")
        out = []
        for batch in iterate(train_dataloader, "self-attribution", self.verbose):
            out.append(self.attribute([batch], [batch]).diagonal())
        return torch.cat(out)


class BaseInnerProductAttributor(BaseAttributor):
    """Base of attributors whose score is an inner product of transformed gradients.

    ``S[i, j] = sum_k w_k * <T_train,k(g_loss,k(z_i)), T_test,k(g_target,k(z_j))> / d_i``
    where ``k`` runs over checkpoints with weights ``w_k`` (:meth:`checkpoint_weights`,
    default: the mean), and ``d_i`` is the optional RelatIF denominator.

    Subclasses override :meth:`cache` (calling ``super().cache``) and the hooks
    :meth:`transform_train_rep` / :meth:`transform_test_rep` (identity by default),
    and may override :meth:`generate_train_rep` / :meth:`generate_test_rep`.

    Args:
        task: the attribution task.
        layer_name: None (all parameters), one parameter name or a list of names.
        device: device for the computation.
        verbose: show progress bars.
        cache_dir: directory of a resumable on-disk store of the training rows
            (``transform_train_rep`` of the per-sample gradients) written by
            :meth:`cache` and read by :meth:`attribute` for the cached loader (shared by
            torch.distributed ranks); None: the rows are recomputed per call.
        store_dtype: storage dtype of that store (e.g. ``"float16"``); default: the
            model's. Scores are computed in the model's dtype (at least float32).
        max_memory: budget of the scoring buffers (bytes or e.g. ``"2GB"``): sets the
            tile sizes and the rows whose per-sample gradients are formed at once.
    """

    #: whether the user's loss sees a sample as ``(1, ...)`` (IF convention, upstream
    #: ``in_dims=(None, 1)``) rather than un-batched (TRAK/TracIn convention).
    keep_batch_dim: bool = True
    #: if True, ``attribute`` before ``cache`` warns and caches on the train loader;
    #: if False it raises.
    cache_on_attribute: bool = True
    #: whether the loss is also evaluated on whole batches as their MEAN loss (HVPs):
    #: a sum-reduced loss is then reported.
    mean_batch_loss: bool = False
    #: whether ``transform_test_rep`` runs no collective, so that under torch.distributed
    #: each rank may transform its share of the test batches (LiSSA); methods whose
    #: transform all-reduces over sharded training batches (CG, DataInf) keep False.
    shard_test_transform: bool = False

    def __init__(
        self,
        task: AttributionTask,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        verbose: bool = True,
        *,
        cache_dir: str | os.PathLike | None = None,
        store_dtype: str | torch.dtype | None = None,
        max_memory: int | str | None = None,
    ) -> None:
        scale = {"cache_dir": cache_dir, "store_dtype": store_dtype, "max_memory": max_memory}
        self._setup(task, layer_name, device, verbose, **scale)
        self.full_train_dataloader: Iterable | None = None
        self._cached = False
        #: per-batch training gradients of the scoring loop (see generate_train_rep)
        self._train_rep_buffer = ReusableBuffer()
        self._store: ProjectedGradientStore | None = None

    # ----------------------------------------------------------------- phases
    @property
    def num_checkpoints(self) -> int:
        """Number of checkpoints of the task."""
        return len(self.task.get_checkpoints())

    def checkpoint_weights(self) -> list[float]:
        """Weight of each checkpoint in the ensemble (default: the mean)."""
        n = self.num_checkpoints
        return [1.0 / n] * n

    def cache(self, full_train_dataloader: Iterable) -> None:
        """Keep the training loader and compute per-checkpoint train-side state.

        Subclasses with train-side state implement :meth:`_cache_checkpoint`.

        Args:
            full_train_dataloader: the training data defining the Hessian/Fisher etc.
        """
        require_reiterable(full_train_dataloader, "full_train_dataloader", type(self).__name__)
        self._check_train_loader(
            full_train_dataloader,
            keep_batch_dim=self.keep_batch_dim,
            mean_batch=self.mean_batch_loss,
        )
        self.full_train_dataloader = full_train_dataloader
        for ckpt_idx in range(self.num_checkpoints):
            try:
                self._cache_checkpoint(ckpt_idx, full_train_dataloader)
            except (RuntimeError, IndexError) as err:
                clear = self._explain_error(err, ckpt_idx)
                if clear is None:
                    raise
                raise clear from err
        self._cached = True
        self._store = None
        if self.scale_options.cache_dir is not None:
            self._store = collect_features_scaled(
                TrainRepFeaturizer(self),
                full_train_dataloader,
                self.num_checkpoints,
                self.scale_options,
                self,
                kind=f"{type(self).__name__} training rows",
                verbose=self.verbose,
                desc="train rows",
            )

    def train_transform_digest(self, ckpt_idx: int) -> str:
        """Fingerprint of the state :meth:`transform_train_rep` uses (stored rows).

        The default transform is the identity; subclasses whose train transform has
        state (Arnoldi's Ritz vectors) return a digest of it.
        """
        return "identity"

    def _cache_checkpoint(self, ckpt_idx: int, full_train_dataloader: Iterable) -> None:
        """Compute the train-side state of one checkpoint (default: nothing)."""

    def _explain_error(self, err: BaseException, ckpt_idx: int) -> BaseException | None:
        """A clear error for a raw one raised on the training data (default: None)."""
        return None

    def _ensure_cached(self, train_dataloader: Iterable) -> None:
        if self._cached:
            return
        if not self.cache_on_attribute:
            msg = (
                f"{type(self).__name__}.attribute was called before cache(): call "
                "attributor.cache(full_train_dataloader) first."
            )
            raise ValueError(msg)
        warnings.warn(
            f"{type(self).__name__}: cache() was not called; caching on train_dataloader.",
            UserWarning,
            stacklevel=3,
        )
        self.cache(train_dataloader)

    # ------------------------------------------------------------------ hooks
    def generate_train_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """Per-sample gradients of the loss, ``(B, p)``.

        Inside the scoring loop the result lives in a buffer reused by the next batch
        (see :class:`~dattri.algorithm.runtime.batching.ReusableBuffer`).
        """
        out = None
        if self._train_rep_buffer.is_active:
            cols, dtype, device = self.task.grad_layout(self.layer_name)
            out = self._train_rep_buffer.get(batch_size_of(data), cols, dtype, device)
        return self.task.per_sample_grads(
            data,
            ckpt_idx,
            self.layer_name,
            target=False,
            keep_batch_dim=self.keep_batch_dim,
            out=out,
        )

    def generate_test_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """Per-sample gradients of the target, ``(B, p)``."""
        return self.task.per_sample_grads(
            data, ckpt_idx, self.layer_name, target=True, keep_batch_dim=self.keep_batch_dim
        )

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        """Transform train representations ``(B, p) -> (B, d)`` (identity)."""
        return train_rep

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """Transform test representations ``(B, p) -> (B, d)`` (identity)."""
        return test_rep

    def relatif_denominator(self, ckpt_idx: int, data: Any, relatif_method: str) -> Tensor:
        """RelatIF normaliser of each training sample, ``(B,)``.

        ``"l"``: ``sqrt(|g^T H^-1 g|)``; ``"theta"``: ``||H^-1 g||``, with ``g`` the
        target gradient of the training sample and ``H^-1`` this attributor's inverse
        (applied by :meth:`transform_test_rep`). Clamped at 1e-12.
        """
        g = self.generate_test_rep(ckpt_idx, data)
        t = self.transform_test_rep(ckpt_idx, g)
        if relatif_method == "l":
            val = (self.transform_train_rep(ckpt_idx, g) * t).sum(dim=1).abs().sqrt()
        else:
            val = t.norm(dim=1)
        return val.clamp_min(1e-12)

    def _check_relatif(self, relatif_method: str | None) -> None:
        if relatif_method is not None and relatif_method not in RELATIF_METHODS:
            msg = f"relatif_method={relatif_method!r} is unknown; use None, 'l' or 'theta'."
            raise ValueError(msg)

    # ---------------------------------------------------------------- scoring
    def _test_reps(self, test_dataloader: Iterable) -> list[Tensor]:
        """Transformed test representations per checkpoint, each ``(n_test, d)``.

        Under torch.distributed with :attr:`shard_test_transform`, each rank transforms
        its contiguous share of the test batches and the rows are gathered.
        """
        reps: list[list[Tensor]] = [[] for _ in range(self.num_checkpoints)]
        shard = self.shard_test_transform and is_distributed()
        if shard:
            mine = list(shard_range(len(batch_plan(test_dataloader))))
            batches = (b for _, b in iter_batches(test_dataloader, mine))
        else:
            batches = iter(test_dataloader)
        for batch in iterate(batches, "test gradients", self.verbose):
            batch = move_to_device(batch, self.device)
            for ckpt_idx in range(self.num_checkpoints):
                g = self.generate_test_rep(ckpt_idx, batch)
                try:
                    reps[ckpt_idx].append(self.transform_test_rep(ckpt_idx, g))
                except (RuntimeError, IndexError) as err:  # e.g. in HVPs on training data
                    clear = self._explain_error(err, ckpt_idx)
                    if clear is None:
                        raise
                    raise clear from err
        if not shard:
            return [torch.cat(r) for r in reps]
        out = []
        for ckpt_idx, r in enumerate(reps):
            if r:
                local = torch.cat(r)
            else:  # this rank had no test batch: an empty block of the right width
                g = self.generate_test_rep(ckpt_idx, next(iter(test_dataloader)))
                local = self.transform_test_rep(ckpt_idx, move_to_device(g, self.device))[:0]
            out.append(gather_rows(local))
        return out

    def _prepare_scoring(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        relatif_method: str | None,
    ) -> list[Tensor]:
        """Check the arguments, cache if needed; the test side ``(n_test, d)`` per ckpt."""
        self._check_relatif(relatif_method)
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        validate_loader(
            self.task,
            test_dataloader,
            "test_dataloader",
            keep_batch_dim=self.keep_batch_dim,
            target=True,
        )
        return self._test_reps(test_dataloader)

    def _stored_rows(self, train_dataloader: Iterable, relatif_method: str | None) -> bool:
        store = self._store
        return store is not None and store.is_for(train_dataloader) and relatif_method is None

    def _tiles(
        self,
        train_dataloader: Iterable,
        test_reps: list[Tensor],
        relatif_method: str | None,
        shard: bool,
        test_block: int | None = None,
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Score tiles ``(row_start, col_start, (rows, cols))`` (this rank's rows if shard).

        ``S = sum_k w_k T_train,k(g_i)^T T_test,k(g'_j) / d_k(i)`` with the training rows
        read from the store of :meth:`cache` (``cache_dir``) when ``train_dataloader``
        is the cached loader, else featurized batch by batch.
        """
        weights = self.checkpoint_weights()
        n_test = test_reps[0].shape[0]
        block = n_test if test_block is None else test_block
        plan = self._plan(train_dataloader, n_test)
        if self._stored_rows(train_dataloader, relatif_method):
            if plan.train_block:  # rows read per tile, from max_memory
                self._store.block_rows = plan.train_block
            yield from iter_store_tiles(self._store, test_reps, weights, None, block, shard)
            return
        n_ckpt = len(weights)
        grad_rows = plan.grad_rows

        def featurize(b: int, batch: Any) -> tuple[list[Tensor], Tensor | None]:
            batch = move_to_device(batch, self.device)
            # denominators first: their transform may reuse the train-gradient buffer
            invs = [
                self.relatif_denominator(k, batch, relatif_method).reciprocal()
                for k in range(n_ckpt)
                if relatif_method is not None
            ]
            feats = [
                self._train_rows(k, batch, grad_rows, keep=k < n_ckpt - 1) for k in range(n_ckpt)
            ]
            if not invs or n_ckpt == 1:
                return feats, invs[0] if invs else None
            return [f * inv.to(f.dtype)[:, None] for f, inv in zip(feats, invs)], None

        with self._train_rep_buffer.active():
            yield from iter_loader_tiles(
                train_dataloader, featurize, test_reps, weights, block, shard, self.verbose
            )

    def _train_rows(self, ckpt_idx: int, batch: Any, grad_rows: int | None, keep: bool) -> Tensor:
        """``transform_train_rep`` of the batch's gradients, ``grad_rows`` samples at a time.

        ``keep``: the rows must survive the next gradient call (several checkpoints).
        """
        n = batch_size_of(batch)
        if grad_rows is None or grad_rows >= n:
            rep = self.transform_train_rep(ckpt_idx, self.generate_train_rep(ckpt_idx, batch))
            return rep.clone() if keep and self._train_rep_buffer.is_active else rep
        parts = []
        for start in range(0, n, grad_rows):
            sub = slice_batch(batch, slice(start, start + grad_rows))
            parts.append(
                self.transform_train_rep(ckpt_idx, self.generate_train_rep(ckpt_idx, sub)).clone()
            )
        return torch.cat(parts)

    def _plan(self, train_dataloader: Iterable, n_test: int) -> TilePlan:
        """Tile sizes from ``max_memory`` (whole test set, loader batches without one)."""
        budget = self.scale_options.max_memory
        if budget is None:
            return TilePlan(train_block=0, test_block=n_test)
        cols, dtype, _ = self.task.grad_layout(self.layer_name)
        item = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
        if self._stored_rows(train_dataloader, None):
            n_train = self._store.num_samples
        else:
            n_train = max(batch_plan(train_dataloader))
        dim = TrainRepFeaturizer(self).out_dim * self.num_checkpoints
        return plan_tiles(n_train, n_test, dim, budget, num_params=cols, itemsize=item)

    def _iter_score_blocks(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        relatif_method: str | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        test_reps = self._prepare_scoring(train_dataloader, test_dataloader, relatif_method)
        for row, _, tile in self._tiles(train_dataloader, test_reps, relatif_method, False):
            yield row, tile

    def attribute(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        relatif_method: str | None = None,
        *,
        out: ScoreFile = None,
    ) -> Tensor:
        """Score every (train, test) pair.

        Args:
            train_dataloader: training samples (rows), not shuffled.
            test_dataloader: test samples (columns), not shuffled.
            relatif_method: None, ``"l"`` or ``"theta"`` (RelatIF normalisation).
            out: path of a ``.npy`` score file: tiles are written there and a
                memory-mapped float32 CPU tensor on it is returned.

        Returns:
            ``(n_train, n_test)`` scores on ``device`` (on CPU with ``out``). With
            torch.distributed, each rank scores its share of the training rows and every
            rank returns the whole matrix.
        """
        test_reps = self._prepare_scoring(train_dataloader, test_dataloader, relatif_method)
        n_test = test_reps[0].shape[0]
        if out is None and not is_distributed() and self.scale_options.max_memory is None:
            tiles = self._tiles(train_dataloader, test_reps, relatif_method, False)
            return torch.cat([tile for _, _, tile in tiles])
        if self._stored_rows(train_dataloader, relatif_method):
            n_train = self._store.num_samples
        else:
            n_train = sum(batch_plan(train_dataloader))
        block = self._plan(train_dataloader, n_test).test_block
        tiles = self._tiles(train_dataloader, test_reps, relatif_method, True, block)
        return scores_of_tiles(tiles, out, n_train, n_test, test_reps[0].dtype, self.device)

    def attribute_topk(
        self,
        train_dataloader: Iterable,
        test_dataloader: Iterable,
        k: int,
        relatif_method: str | None = None,
    ) -> TopKResult:
        """Per-test top-k helpful/harmful training samples, streamed tile by tile.

        Memory is ``O(n_test * k)`` plus one tile; with torch.distributed, ranks score
        their share of the rows and merge their candidates.
        """
        TopKAccumulator(k)  # validates k before any gradient is computed
        test_reps = self._prepare_scoring(train_dataloader, test_dataloader, relatif_method)
        n_test = test_reps[0].shape[0]
        block = self._plan(train_dataloader, n_test).test_block
        tiles = self._tiles(train_dataloader, test_reps, relatif_method, True, block)
        return topk_of_tiles(tiles, k, n_test)

    def self_attribute(
        self, train_dataloader: Iterable, relatif_method: str | None = None
    ) -> Tensor:
        """Score each training sample against itself, for any number of batches.

        Args:
            train_dataloader: training samples.
            relatif_method: None, ``"l"`` or ``"theta"``.

        Returns:
            ``(n_train,)``; equals ``attribute(train, train).diag()``. With
            torch.distributed, each rank scores its share of the batches.
        """
        self._check_relatif(relatif_method)
        check_loader(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        weights = self.checkpoint_weights()
        # a test transform that runs collectives must be called by every rank alike
        shard = is_distributed() and self.shard_test_transform
        if shard:
            mine = list(shard_range(len(batch_plan(train_dataloader))))
            batches = (b for _, b in iter_batches(train_dataloader, mine))
        else:
            batches = iter(train_dataloader)
        out = []
        for batch in iterate(batches, "self-attribution", self.verbose):
            batch = move_to_device(batch, self.device)
            total: Tensor | None = None
            for ckpt_idx, w in enumerate(weights):
                tr = self.transform_train_rep(ckpt_idx, self.generate_train_rep(ckpt_idx, batch))
                te = self.transform_test_rep(ckpt_idx, self.generate_test_rep(ckpt_idx, batch))
                val = (tr * te).sum(dim=1)
                if relatif_method is not None:
                    val = val / self.relatif_denominator(ckpt_idx, batch, relatif_method)
                total = w * val if total is None else total + w * val
            out.append(total)
        if not shard:
            return torch.cat(out)
        local = torch.cat(out) if out else torch.zeros(0, device=self.device)
        return gather_rows(local)
