"""Block-projected influence functions (the engine behind LoGra and FactGraSS).

For every selected layer ``l`` and training sample ``i`` the per-sample gradient is
compressed to ``c_il`` (``(k_l,)``, see :mod:`dattri.algorithm.features.block_compress`)
without forming the full gradient. With ``hessian="eFIM"`` each layer gets the
empirical Fisher of the compressed gradients

``F_l = (1/n) sum_i c_il c_il^T``  (``(k_l, k_l)``),

inverted with damping, ``(F_l + lambda_l I)^-1`` (Cholesky; an eigen-decomposition
pseudo-inverse if that fails). A number ``damping`` means upstream's relative damping
``lambda_l = damping * tr(F_l) / k_l``. ``damping=None`` (the default) means automatic:
``lambda_l = DEFAULT_DAMPING * tr(F_l) / r_l`` with ``r_l = min(k_l, n, rank of the
layer's compression map)``, the mean of the eigenvalues ``F_l`` can have. Dividing by
``k_l`` instead dilutes the damping whenever ``k_l`` exceeds the attainable rank (4096
coordinates of a 650-parameter layer, or more coordinates than samples): the inverse
then amplifies noise directions and LDS collapses (0.46 instead of 0.75 on digits-LR).
``hessian="Identity"`` uses ``F_l^-1 = I``. The score of training sample ``i`` on test
sample ``j`` is

``S[i, j] = sum_l c_il . F_l^-1 c_jl``  (``= IFVP_il . c_jl``, ``F_l`` symmetric),

where ``c_jl`` is the compressed gradient of the task's *target* function on the test
sample (the loss when the task has no target). No minus sign and no ``1/n``: larger =
more helpful, like the other influence attributors. Only the training rows ``c_il`` are
stored (memory, host memory or the shared memmap store); the block inverse is applied
to the test side, once per ``attribute`` call.

Only checkpoint 0 of the task is used (as upstream).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features.block_compress import (
    FACTOR_TYPES,
    BlockFeaturizer,
    read_params,
    resolve_layer_names,
)
from dattri.algorithm.runtime.batching import (
    batch_size_of,
    check_loader,
    iterate,
    move_to_device,
)
from dattri.algorithm.runtime.distributed import all_reduce_sum, gather_rows, shard_range
from dattri.algorithm.runtime.validation import (
    check_task,
    is_single_pass,
    resolve_device,
    validate_loader,
)
from dattri.algorithm.score.tiles import (
    ScoreFile,
    iter_loader_tiles,
    iter_store_tiles,
    make_sink,
    plan_tiles,
    topk_of_tiles,
)
from dattri.algorithm.score.topk import TopKResult
from dattri.algorithm.solve.block_inverse import BlockInverse, damped_fisher_inverse, stable_inverse
from dattri.algorithm.store.host_rows import OFFLOAD_MODES, HostRows
from dattri.algorithm.store.in_memory import ProjectedGradientStore, collect_features
from dattri.algorithm.store.memmap_store import batch_plan, iter_batches
from dattri.algorithm.store.scaled import ScaleOptions, collect_features_scaled
from dattri.task import AttributionTask

__all__ = ["DEFAULT_DAMPING", "BlockInverse", "BlockProjectedIFAttributor", "stable_inverse"]

HESSIANS = ("Identity", "eFIM")
#: automatic damping (``damping=None``): ``lambda_l = DEFAULT_DAMPING * tr(F_l) / r_l``,
#: i.e. the mean non-zero eigenvalue of ``F_l`` (``r_l`` = its attainable rank). Chosen on
#: the digits LR/MLP benchmarks (LDS is flat for 1-2x this value, falls off at 0.1x and
#: 10x). Upstream dattri used the relative ``1e-5 * tr(F_l) / k_l``; pass
#: ``damping=1e-5`` to reproduce it.
DEFAULT_DAMPING = 1.0

_SPARSIFIER_DEFAULTS = {
    "proj_dim": 32,
    "proj_type": "normal",
    "proj_seed": 0,
    "proj_max_batch_size": 64,
}
_PROJECTOR_DEFAULTS = {
    "proj_dim": -1,
    "proj_type": "identity",
    "proj_seed": 0,
    "proj_max_batch_size": 64,
}


def _check_damping(damping: Any) -> float | None:
    """Validate a damping value (None or a finite float ``>= 0``).

    Raises:
        TypeError: If not a number.
        ValueError: If negative or not finite.
    """
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        msg = f"damping must be None or a non-negative float, got {damping!r}."
        raise TypeError(msg)
    if not math.isfinite(damping) or damping < 0:
        msg = f"damping must be a finite non-negative float, got {damping}."
        raise ValueError(msg)
    return float(damping)


class BlockProjectedIFAttributor(BaseAttributor):
    """Influence functions on block-wise (per-layer) compressed gradients.

    The pipeline: :class:`~dattri.algorithm.features.block_compress.BlockFeaturizer`
    (featurize) -> the shared row stores (memory, host memory or the resumable memmap
    store) -> :class:`BlockInverse` (precondition: the damped per-layer empirical
    Fisher, applied to the test side) -> score tiles into a sink (tensor, ``.npy``
    file or streaming top-k).

    Args:
        task: the attribution task. Its loss may be eager ``loss(model, batch,
            device)`` (upstream LoGra convention; evaluated here on a batch of one
            sample, so per-sample gradients are exact) or functional
            ``loss(params, data)`` (sample seen as ``(1, ...)``). The test side uses
            ``task``'s target function (same formats). The selected layers'
            parameters must reach the loss only through their layer's forward (no
            weight-decay term in the loss): per-layer factors cannot represent it, and
            ``cache`` raises a ValueError saying so.
        layer_names: module names (``model.named_modules()``) of ``nn.Linear``,
            ``nn.Conv2d`` or ``nn.Embedding`` layers; None = every ``nn.Linear``.
        hessian: ``"eFIM"`` (per-layer empirical Fisher of the compressed
            gradients) or ``"Identity"``.
        damping: relative damping of the Fisher, ``F + damping * tr(F)/d * I``
            (upstream's meaning); None = automatic, ``F + tr(F)/r * I`` with ``r`` the
            attainable rank of ``F`` (see :data:`DEFAULT_DAMPING`; upstream's
            ``None`` meant 1e-5, which makes the inverse amplify noise).
        device: compute device; the model is moved there at construction.
        sparsifier_params: first stage, factorised per layer: a dict or params
            object with ``proj_dim`` (per side, ``k_out = k_in``; default 32),
            ``proj_type`` (``"normal"``, ``"rademacher"``, ``"random_mask"``,
            ``"identity"``; default ``"normal"``) and ``proj_seed`` (default 0).
        projector_params: optional second stage on the ``k_out * k_in`` vector:
            ``proj_dim`` (-1 = none), ``proj_type`` (any type of
            :func:`dattri.func.projection.random_project`, e.g. ``"sjlt"``;
            ``"identity"`` = none), ``proj_seed``, ``proj_max_batch_size``.
        offload: where the compressed training gradients live without ``cache_dir``:
            ``"none"`` (device) or ``"cpu"`` (host memory, moved to the device block
            by block). ``"disk"`` means the memmap store in ``cache_dir`` (required).
        cache_dir: directory of the resumable on-disk store of the compressed
            training gradients (the memmap + manifest store shared with TRAK/TracIn
            and torch.distributed ranks). When given, the rows go there whatever
            ``offload``; an interrupted :meth:`cache` resumes, a store written for
            other data or settings is refused.
        chunk_size: training batches scored together (row blocks of
            ``chunk_size x`` the first batch size) when ``max_memory`` is not set.
        verbose: show progress bars.
        store_dtype: storage dtype of the on-disk store (e.g. ``"float16"``);
            default: the model's. Scores are computed in the model's dtype (at least
            float32).
        max_memory: budget of the working buffers (bytes or e.g. ``"2GB"``): sets the
            tile sizes and the samples compressed at once, and spills the rows to a
            temporary store if needed.

    Raises:
        ValueError: for an unknown ``hessian``/``offload``, ``offload="disk"``
            without ``cache_dir``, bad layer names or a loss of the wrong format.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_names: str | Sequence[str] | None = None,
        hessian: str = "eFIM",
        damping: float | None = None,
        device: str | torch.device = "cpu",
        sparsifier_params: Any = None,
        projector_params: Any = None,
        offload: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int = 16,
        verbose: bool = True,
        *,
        store_dtype: str | torch.dtype | None = None,
        max_memory: int | str | None = None,
    ) -> None:
        check_task(task)
        if hessian not in HESSIANS:
            msg = f"hessian must be one of {HESSIANS}, got {hessian!r}."
            raise ValueError(msg)
        if offload not in OFFLOAD_MODES:
            msg = f"offload must be one of {OFFLOAD_MODES}, got {offload!r}."
            raise ValueError(msg)
        if offload == "disk" and cache_dir is None:
            msg = "cache_dir must be provided when offload='disk' (the folder of the store)."
            raise ValueError(msg)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            msg = f"chunk_size must be a positive int, got {chunk_size!r}."
            raise ValueError(msg)
        self.scale_options = ScaleOptions(cache_dir, store_dtype, max_memory)
        self.task = task
        self.hessian = hessian
        self.damping = _check_damping(damping)
        self.device = resolve_device(device)
        self.offload = offload
        self.cache_dir = cache_dir
        self.chunk_size = chunk_size
        self.verbose = verbose
        self.sparsifier_params = read_params(
            sparsifier_params, _SPARSIFIER_DEFAULTS, "sparsifier_params"
        )
        self.projector_params = read_params(
            projector_params, _PROJECTOR_DEFAULTS, "projector_params"
        )
        if self.sparsifier_params["proj_type"] not in FACTOR_TYPES:
            msg = (
                f"sparsifier_params proj_type {self.sparsifier_params['proj_type']!r} is not "
                f"a factorised type; use one of {FACTOR_TYPES} (put 'sjlt' etc. in "
                "projector_params)."
            )
            raise ValueError(msg)
        if len(task.get_checkpoints()) > 1:
            warnings.warn(
                f"{type(self).__name__} uses checkpoint 0 only; the other "
                f"{len(task.get_checkpoints()) - 1} checkpoint(s) are ignored.",
                UserWarning,
                stacklevel=2,
            )
        task.load_checkpoint(0)
        self.model = task.get_model()
        self.model.to(self.device)
        self.layer_names = resolve_layer_names(self.model, layer_names)
        self.featurizer = BlockFeaturizer(
            task,
            self.model,
            self.layer_names,
            self.sparsifier_params,
            self.projector_params,
            self.device,
        )
        self.compressors = self.featurizer.compressors
        self.layer_dims = self.featurizer.layer_dims
        self.total_proj_dim = self.featurizer.out_dim
        self.full_train_dataloader: Iterable | None = None
        self._store: ProjectedGradientStore | None = None
        self.preconditioner: BlockInverse | None = None
        self._damping_used: float | str | None = None

    # ----------------------------------------------------------------- helpers
    def _target_is_loss(self) -> bool:
        return self.task.original_target_func is self.task.original_loss_func

    def _cached(self, loader: Iterable | None) -> bool:
        return self._store is not None and self._store.is_for(loader)

    def _require_cache(self, what: str) -> ProjectedGradientStore:
        if self._store is None:
            msg = f"{what} needs cached gradients: call attributor.cache(full_train_dataloader)."
            raise ValueError(msg)
        return self._store

    def _ensure_cached(self, train_dataloader: Iterable) -> None:
        if self._store is not None:
            return
        warnings.warn(
            f"{type(self).__name__}: cache() was not called; caching on train_dataloader.",
            UserWarning,
            stacklevel=4,
        )
        self.cache(train_dataloader)

    def _check_loader(self, loader: Iterable, name: str, target: bool) -> None:
        """The loader is usable and the loss (``target``: the target) runs on its first batch."""
        check_loader(loader, name)
        validate_loader(self.task, loader, name, keep_batch_dim=True, target=target)

    def _precondition(self, rows: Tensor) -> Tensor:
        """``F^-1 rows`` block by block (``(m, D)`` in, ``(m, D)`` out)."""
        if self.preconditioner is None:
            self.compute_preconditioners()
        return rows @ self.preconditioner

    def _features(self, loader: Iterable, target: bool, desc: str) -> Tensor:
        """``(n, D)`` compressed gradients of a whole loader (kept in memory)."""
        return collect_features(
            self.featurizer, loader, 1, target=target, verbose=self.verbose, desc=desc
        ).features[0]

    def _test_side(self, test_dataloader: Iterable) -> Tensor:
        """``(n_test, D)`` preconditioned target gradients ``F^-1 c_j``."""
        if self._cached(test_dataloader) and self._target_is_loss():
            rows = self._store.features[0]
            test = getattr(rows, "materialize", lambda: rows)()
        else:
            self._check_loader(test_dataloader, "test_dataloader", target=True)
            test = self._features(test_dataloader, True, "test gradients")
        return self._precondition(test.to(self._score_dtype()))

    def _plan_rows(self, n_test: int) -> int:
        """Set the store's row block (``max_memory`` or ``chunk_size``); return the test block.

        Args:
            n_test: test columns of the tiles (1 for row-wise passes: Fisher sums,
                self-influence).
        """
        store = self._store
        if self.scale_options.max_memory is None:
            store.block_rows = self.chunk_size * store.state["first_batch"]
            return n_test
        plan = self.tile_plan(n_test)
        store.block_rows = plan.train_block
        return plan.test_block

    def tile_plan(self, n_test: int) -> Any:
        """The :class:`~dattri.algorithm.score.tiles.TilePlan` of scoring ``n_test`` columns.

        The budget holds the preconditioned test rows (``n_test x D``) and the
        factorised Fisher blocks (``sum_l k_l^2``), float64, plus the planned tiles.

        Args:
            n_test: number of test columns.

        Returns:
            The plan (``train_block``, ``test_block``).
        """
        store = self._require_cache("tile_plan")
        d = self.featurizer.out_dim
        blocks = 8 * sum(k * k for k in self.layer_dims) if self.hessian == "eFIM" else 0
        return plan_tiles(
            store.num_samples,
            n_test,
            d,
            self.scale_options.max_memory,
            itemsize=8,
            reserved=n_test * d * 8 + blocks,
        )

    def _iter_tiles(
        self, train_dataloader: Iterable, test: Tensor, shard: bool
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``(row_start, col_start, tile)`` of ``S = C_train F^-1 C_test^T``."""
        if self._cached(train_dataloader):
            block = self._plan_rows(test.shape[0])
            yield from iter_store_tiles(self._store, [test], None, None, block, shard)
            return

        def featurize(b: int, batch: Any) -> tuple[list[Tensor], None]:
            batch = move_to_device(batch, self.device)
            rows = self.featurizer(0, batch, where=f" {b} of train")
            return [rows.to(self._score_dtype())], None

        yield from iter_loader_tiles(
            train_dataloader, featurize, [test], None, test.shape[0], shard, self.verbose
        )

    def _train_rows(self, train_dataloader: Iterable) -> tuple[Iterable, bool]:
        """``(loader, cached)``; an uncached single-pass iterator is read into a list.

        Its batches are needed twice (their sizes, then their gradients).
        """
        check_loader(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        cached = self._cached(train_dataloader)
        if not cached and is_single_pass(train_dataloader):
            train_dataloader = list(train_dataloader)
        return train_dataloader, cached

    def _score_dtype(self) -> torch.dtype:
        return torch.promote_types(self.task.get_param(0)[0].dtype, torch.float32)

    # ------------------------------------------------------------------ phases
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Compress and store the training gradients, then factorise the Fisher blocks.

        With ``cache_dir`` the rows go to the resumable memmap store (a second call
        after an interruption continues where it stopped); under torch.distributed
        every rank compresses its share of the batches and the Fisher sums are
        all-reduced, so every rank holds the same preconditioner.

        Args:
            full_train_dataloader: the training data (not shuffled); its rows are the
                rows of :meth:`attribute` when the same loader object is passed there.
        """
        self._check_loader(full_train_dataloader, "full_train_dataloader", target=False)
        budget = self.scale_options.max_memory
        if budget is not None:
            f = self.featurizer
            plan = plan_tiles(1, 1, f.out_dim, budget, num_params=f.sample_numel, itemsize=8)
            f.grad_rows = plan.grad_rows
        self._store = self.preconditioner = None
        first: list[int] = []
        source = full_train_dataloader
        if is_single_pass(source):  # read once: note the first batch size on the way

            def recording(loader: Iterable) -> Iterator[Any]:
                for batch in loader:
                    first.append(batch_size_of(batch))
                    yield batch

            source = recording(source)
        # in memory: each batch's rows go to the host right away with offload="cpu",
        # and are kept in the score dtype (float32 at least)
        where, dtype = "cpu" if self.offload == "cpu" else self.device, self._score_dtype()
        store = collect_features_scaled(
            self.featurizer,
            source,
            1,
            self.scale_options,
            self,
            transform=lambda rows: rows.to(where, dtype),
            kind="BlockProjectedIF compressed gradients",
            verbose=self.verbose,
            desc="caching gradients",
        )
        if self.offload == "cpu" and isinstance(store.features[0], Tensor):
            store.features = [HostRows(store.features[0], self.device)]
        store.loader = full_train_dataloader
        store.state["first_batch"] = first[0] if first else batch_plan(full_train_dataloader)[0]
        self._store = store
        self.full_train_dataloader = full_train_dataloader
        self.compute_preconditioners()

    def _attainable_ranks(self, n: int) -> list[int]:
        """Upper bound of ``rank(F_l)`` per layer: ``min(k_l, n, rank of the compression)``."""
        out = []
        for c in self.compressors:
            k_out, d_out = c.proj_out.shape
            k_in, d_in = c.proj_in.shape
            out.append(max(1, min(c.dim, n, min(k_out, d_out) * min(k_in, d_in))))
        return out

    def _fisher_sums(self) -> list[Tensor]:
        """``sum_i c_il c_il^T`` per layer, this rank's rows all-reduced.

        Each row block's product is formed in the score dtype and summed in float64.
        """
        store = self._store
        self._plan_rows(1)
        acc = [torch.zeros(d, d, dtype=torch.float64, device=self.device) for d in self.layer_dims]
        blocks = list(store.row_blocks(self.featurizer.out_dim, shard=True))
        for rows in iterate(blocks, "Fisher", self.verbose):
            block = store.features[0][rows].to(self._score_dtype())
            for (s, e), a in zip(self.featurizer.offsets, acc, strict=True):
                a.add_((block[:, s:e].T @ block[:, s:e]).to(torch.float64))
        return all_reduce_sum(acc)

    def compute_preconditioners(self, damping: float | None = None) -> None:
        """Factorise the per-layer damped Fisher of the cached gradients.

        Args:
            damping: relative damping ``damping * tr(F_l) / k_l``; None = the
                constructor's, and if that is None too the automatic
                ``DEFAULT_DAMPING * tr(F_l) / r_l`` (``r_l`` = attainable rank).
        """
        store = self._require_cache("compute_preconditioners")
        damping = _check_damping(damping)
        if damping is None:
            damping = self.damping
        auto = damping is None
        if auto:
            damping = DEFAULT_DAMPING
        if self.hessian == "Identity":
            blocks = [None] * len(self.layer_names)
        else:
            n = store.num_samples
            ranks = self._attainable_ranks(n) if auto else [None] * len(self.layer_names)
            blocks = [
                damped_fisher_inverse(a / n, damping, rank)
                for a, rank in zip(self._fisher_sums(), ranks, strict=True)
            ]
        self.preconditioner = BlockInverse(self.featurizer.offsets, blocks, self._score_dtype())
        self._damping_used = f"auto ({DEFAULT_DAMPING} * tr(F) / rank)" if auto else damping

    def compute_ifvp(self) -> None:
        """Make sure the preconditioner is ready (upstream's IFVP step).

        ``IFVP = F^-1 c`` is not stored: the (symmetric) preconditioner is applied to
        the test side, ``c_i . (F^-1 c_j)``, so only the compressed gradients are kept.
        """
        self._require_cache("compute_ifvp")
        if self.preconditioner is None:
            self.compute_preconditioners()

    def attribute(
        self, train_dataloader: Iterable, test_dataloader: Iterable, *, out: ScoreFile = None
    ) -> Tensor:
        """Influence of every training sample on every test sample.

        Args:
            train_dataloader: training samples (rows). If it is the loader object given
                to :meth:`cache`, the stored gradients are used; any other loader has
                its gradients computed batch by batch against the cached Fisher. If
                :meth:`cache` was not called, it is called on this loader (warning).
            test_dataloader: test samples (columns), gradients of the target function.
            out: path of a ``.npy`` score file: tiles are written there and a
                memory-mapped float32 CPU tensor on it is returned.

        Returns:
            ``(n_train, n_test)`` scores on ``device``; larger = more helpful. With
            torch.distributed every rank scores its share of the training rows and
            returns the full matrix.
        """
        train_dataloader, cached = self._train_rows(train_dataloader)
        test = self._test_side(test_dataloader)
        n_train = self._store.num_samples if cached else sum(batch_plan(train_dataloader))
        sink = make_sink(out, n_train, test.shape[0], self._score_dtype(), self.device)
        for row, col, tile in self._iter_tiles(train_dataloader, test, shard=True):
            sink.add(row, col, tile)
        return sink.finalize()

    def attribute_topk(
        self, train_dataloader: Iterable, test_dataloader: Iterable, k: int
    ) -> TopKResult:
        """The ``k`` most helpful and most harmful training rows of every test sample.

        The score tiles of :meth:`attribute` are merged into a running top-k as they
        are produced (``O(n_test * k)`` memory besides one tile); under
        torch.distributed each rank keeps the candidates of its own rows and the
        candidates are merged.

        Args:
            train_dataloader: training samples (cached rows when it is the cached loader).
            test_dataloader: test samples.
            k: rows per side.

        Returns:
            A :class:`~dattri.algorithm.score.topk.TopKResult` of ``(n_test, k)`` tensors.
        """
        train_dataloader, _ = self._train_rows(train_dataloader)
        test = self._test_side(test_dataloader)
        tiles = self._iter_tiles(train_dataloader, test, shard=True)
        return topk_of_tiles(tiles, k, test.shape[0])

    def _self_scores(self, rows: Iterator[tuple[Tensor, Tensor]]) -> Tensor:
        """``c_i . F^-1 t_i`` of ``(train rows, target rows)`` pairs, gathered over ranks."""
        dtype = self._score_dtype()
        vals = [(f.to(dtype) * self._precondition(t.to(dtype))).sum(dim=1) for f, t in rows]
        local = torch.cat(vals) if vals else torch.zeros(0, dtype=dtype)
        return gather_rows(local.to(self.device))

    def _stored_pairs(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's stored row blocks, as ``(rows, rows)``."""
        store = self._store
        self._plan_rows(1)
        for rows in store.row_blocks(self.featurizer.out_dim, shard=True):
            block = store.features[0][rows]
            yield block, block

    def compute_self_attribution(self) -> Tensor:
        """Self-influence ``sum_l c_il^T F_l^-1 c_il`` of every cached training sample.

        Returns:
            ``(n_train,)`` on ``device``.
        """
        self._require_cache("compute_self_attribution")
        return self._self_scores(self._stored_pairs())

    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """Score each training sample against itself (diagonal of ``attribute(train, train)``).

        Args:
            train_dataloader: training samples.

        Returns:
            ``(n_train,)`` on ``device``.
        """
        train_dataloader, cached = self._train_rows(train_dataloader)
        if cached and self._target_is_loss():
            return self.compute_self_attribution()
        if cached and is_single_pass(train_dataloader):
            msg = (
                "self_attribute needs the target gradients of the training samples, but "
                "train_dataloader is the single-pass iterator already read by cache(): "
                "cache and self-attribute a re-iterable loader (a DataLoader or a list)."
            )
            raise ValueError(msg)
        sizes = batch_plan(train_dataloader)
        starts = [sum(sizes[:b]) for b in range(len(sizes))]
        mine = list(shard_range(len(sizes)))

        def pairs() -> Iterator[tuple[Tensor, Tensor]]:
            batches = iter_batches(train_dataloader, mine)
            for b, batch in iterate(batches, "self-attribution", self.verbose, total=len(mine)):
                batch = move_to_device(batch, self.device)
                where = f" {b} of train"
                if cached:
                    start = starts[b]
                    f = self._store.features[0][start : start + sizes[b]]
                else:
                    f = self.featurizer(0, batch, where=where)
                t = self.featurizer(0, batch, target=True, where=where)
                yield f, t

        return self._self_scores(pairs())
