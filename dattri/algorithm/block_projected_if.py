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

``S[i, j] = sum_l IFVP_il . c_jl``,  ``IFVP_il = F_l^-1 c_il``,

where ``c_jl`` is the compressed gradient of the task's *target* function on the test
sample (the loss when the task has no target). No minus sign and no ``1/n``: larger =
more helpful, like the other influence attributors.

Only checkpoint 0 of the task is used (as upstream).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features.block_compress import (
    FACTOR_TYPES,
    LayerCompressor,
    build_compressors,
    functional_loss,
    read_params,
    resolve_layer_names,
)
from dattri.algorithm.runtime.batching import check_loader, iterate, move_to_device
from dattri.algorithm.runtime.validation import resolve_device, validate_loader
from dattri.algorithm.store.block_rows import (
    OFFLOAD_MODES,
    MatrixStore,
    RowStore,
    write_metadata,
)
from dattri.func.linalg import DampedSymmetricInverse
from dattri.func.per_sample_grad import per_sample_kron_projected
from dattri.loss_checks import explained_errors
from dattri.task import AttributionTask

__all__ = ["DEFAULT_DAMPING", "BlockProjectedIFAttributor", "stable_inverse"]

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


def stable_inverse(fisher: Tensor, damping: float, rank: int | None = None) -> Tensor:
    """Inverse of ``fisher + damping * tr(fisher) / r * I`` (relative damping).

    Args:
        fisher: symmetric PSD ``(d, d)`` matrix.
        damping: relative damping ``>= 0`` (absolute ``damping`` if the trace is 0).
        rank: ``r``, the number of eigenvalues the trace is averaged over; None = ``d``
            (upstream's convention). Pass the attainable rank of ``fisher`` to damp by
            a multiple of its mean non-zero eigenvalue.

    Returns:
        ``(d, d)`` symmetric inverse, same dtype as ``fisher``. Falls back to an
        eigen-decomposition pseudo-inverse (with a warning) when the damped matrix
        is not positive definite.
    """
    d = fisher.shape[0]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        msg = f"rank must be None or a positive int, got {rank!r}."
        raise ValueError(msg)
    trace = float(torch.trace(fisher))
    shift = damping * trace / (d if rank is None else min(rank, d)) if trace > 0 else damping
    inv = DampedSymmetricInverse(
        fisher,
        shift,
        singular="pinv",
        check_finite=None,
        what=f"The damped Fisher (damping={damping})",
        fix="increase damping",
        stacklevel=3,
    ).matrix()
    return (inv + inv.T) / 2


def _check_damping(damping: Any) -> float | None:
    """Validate a damping value.

    Args:
        damping: None or a non-negative number.

    Returns:
        The value as float (or None).

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
        offload: where compressed gradients, IFVPs and preconditioners live:
            ``"none"`` (device), ``"cpu"`` or ``"disk"`` (memory-mapped files in
            ``cache_dir``).
        cache_dir: folder for ``offload="disk"`` (created if missing; files are
            overwritten by a new ``cache``; use one folder per attributor). Nothing
            is written elsewhere, and nothing is ever read back from a previous run.
        chunk_size: number of training batches processed together when streaming
            stored gradients (Fisher, IFVP and scoring blocks).
        verbose: show progress bars.

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
        cache_dir: str | Path | None = None,
        chunk_size: int = 16,
        verbose: bool = True,
    ) -> None:
        if not isinstance(task, AttributionTask):
            msg = f"task must be a dattri.task.AttributionTask, got {type(task).__name__}."
            raise TypeError(msg)
        if hessian not in HESSIANS:
            msg = f"hessian must be one of {HESSIANS}, got {hessian!r}."
            raise ValueError(msg)
        if offload not in OFFLOAD_MODES:
            msg = f"offload must be one of {OFFLOAD_MODES}, got {offload!r}."
            raise ValueError(msg)
        if offload == "disk" and cache_dir is None:
            msg = "cache_dir must be provided when offload='disk' (a folder for the memmaps)."
            raise ValueError(msg)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            msg = f"chunk_size must be a positive int, got {chunk_size!r}."
            raise ValueError(msg)
        self.task = task
        self.hessian = hessian
        self.damping = _check_damping(damping)
        self.device = resolve_device(device)
        self.offload = offload
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
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
        # validate the loss formats early ("Wrong loss function format")
        functional_loss(task.original_loss_func, self.model, self.device, "loss_func")
        functional_loss(task.original_target_func, self.model, self.device, "target_func")
        dtype = next(iter(task.get_param_dict(0).values())).dtype
        self.compressors: list[LayerCompressor] = build_compressors(
            self.model,
            self.layer_names,
            self.sparsifier_params,
            self.projector_params,
            self.device,
            dtype,
        )
        self.layer_dims = [c.dim for c in self.compressors]
        self.total_proj_dim = sum(self.layer_dims)
        self.full_train_dataloader: Iterable | None = None
        self._grads: RowStore | None = None
        self._ifvp: RowStore | None = None
        self._precond: MatrixStore | None = None
        self._batch_sizes: list[int] = []
        self._damping_used: float | str | None = None

    # ----------------------------------------------------------------- helpers
    @property
    def _offsets(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for d in self.layer_dims:
            out.append((start, start + d))
            start += d
        return out

    @property
    def _block_rows(self) -> int:
        first = self._batch_sizes[0] if self._batch_sizes else 64
        return max(1, self.chunk_size * first)

    def _disk_dir(self) -> Path | None:
        """The cache folder (created) for ``offload="disk"``, else None."""
        if self.offload != "disk":
            return None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir

    def _path(self, name: str) -> Path | None:
        folder = self._disk_dir()
        return None if folder is None else folder / name

    def _compress(self, batch: Any, target: bool) -> Tensor:
        """Compressed per-sample gradients of one (device) batch, ``(B, total_proj_dim)``.

        Args:
            batch: the batch on ``device``.
            target: use the task's target function instead of the loss.

        Returns:
            ``(B, total_proj_dim)``, layers concatenated in ``layer_names`` order.
        """
        params = self.task.get_param_dict(0)
        model = self.task.get_model()
        func = self.task.original_target_func if target else self.task.original_loss_func
        loss = functional_loss(func, model, self.device, "target_func" if target else "loss_func")
        with explained_errors(model, batch, "a test batch" if target else "a training batch"):
            kron = per_sample_kron_projected(
                model,
                loss,
                params,
                batch,
                self.layer_names,
                {c.name: c.proj_in for c in self.compressors},
                {c.name: c.proj_out for c in self.compressors},
                keep_batch_dim=True,
            )
        return torch.cat([c.finish(kron[c.name]) for c in self.compressors], dim=1)

    def _target_is_loss(self) -> bool:
        return self.task.original_target_func is self.task.original_loss_func

    def _require_cache(self, what: str) -> None:
        if self._grads is None:
            msg = f"{what} needs cached gradients: call attributor.cache(full_train_dataloader)."
            raise ValueError(msg)

    def _preconditioners(self) -> list[Tensor | None]:
        if self._precond is None:
            self.compute_preconditioners()
        return [self._precond.get(i) for i in range(len(self.layer_names))]

    def _apply_precond(self, rows: Tensor, precs: list[Tensor | None]) -> Tensor:
        """``F_l^-1 c_il`` for a block of compressed gradients.

        Args:
            rows: ``(B, total_proj_dim)``.
            precs: per-layer inverses (None = identity).

        Returns:
            ``(B, total_proj_dim)`` in the dtype of ``rows``.
        """
        if all(p is None for p in precs):
            return rows
        parts = []
        for (s, e), prec in zip(self._offsets, precs, strict=True):
            block = rows[:, s:e]
            parts.append(block if prec is None else (block.to(prec.dtype) @ prec).to(rows.dtype))
        return torch.cat(parts, dim=1)

    def _close_stores(self) -> None:
        ifvp, grads = self._ifvp, self._grads
        self._ifvp = self._grads = None
        if ifvp is not None and ifvp is not grads:
            ifvp.close()
        if grads is not None:
            grads.close()

    def _write_metadata(self) -> None:
        if self.offload != "disk" or self._grads is None:
            return
        ifvp = self._ifvp.path.name if self._ifvp is not None and self._ifvp.path else None
        write_metadata(
            self.cache_dir,
            {
                "format": "dattri.BlockProjectedIFAttributor",
                "version": 1,
                "layer_names": self.layer_names,
                "layer_dims": self.layer_dims,
                "n_train": self._grads.n,
                "batch_sizes": self._batch_sizes,
                "dtype": str(self._grads.dtype).replace("torch.", ""),
                "row_layout": "row-major (n_train, sum(layer_dims)), layers concatenated",
                "hessian": self.hessian,
                "damping": self._damping_used,
                "files": {
                    "train_grads": self._grads.path.name,
                    "train_ifvp": ifvp,
                    "preconditioners": "preconditioner_<layer index>.npy (eFIM only)",
                },
            },
        )

    # ------------------------------------------------------------------ phases
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Compress and store the training gradients, then the Fisher inverse and IFVPs.

        Args:
            full_train_dataloader: the training data (not shuffled); its rows are the
                rows of :meth:`attribute` when the same loader object is passed there.
        """
        check_loader(full_train_dataloader, "full_train_dataloader")
        validate_loader(
            self.task,
            full_train_dataloader,
            "full_train_dataloader",
            keep_batch_dim=True,
            target=False,
        )
        self._close_stores()
        self._precond = None
        grads = RowStore(self.offload, self.device, self._path("train_grads.bin"))
        sizes = []
        for batch in iterate(full_train_dataloader, "caching gradients", self.verbose):
            rows = self._compress(move_to_device(batch, self.device), target=False)
            grads.append(rows)
            sizes.append(int(rows.shape[0]))
        if not sizes:
            msg = "full_train_dataloader yielded no batch."
            raise ValueError(msg)
        grads.finalize()
        self._grads, self._batch_sizes = grads, sizes
        self.full_train_dataloader = full_train_dataloader
        self.compute_preconditioners()
        self.compute_ifvp()

    def _attainable_ranks(self, n: int) -> list[int]:
        """Upper bound of ``rank(F_l)`` per layer: ``min(k_l, n, rank of the compression)``."""
        out = []
        for c in self.compressors:
            k_out, d_out = c.proj_out.shape
            k_in, d_in = c.proj_in.shape
            out.append(max(1, min(c.dim, n, min(k_out, d_out) * min(k_in, d_in))))
        return out

    def compute_preconditioners(self, damping: float | None = None) -> None:
        """Compute the per-layer inverse (damped) Fisher of the cached gradients.

        Args:
            damping: relative damping ``damping * tr(F_l) / k_l``; None = the
                constructor's, and if that is None too the automatic
                ``DEFAULT_DAMPING * tr(F_l) / r_l`` (``r_l`` = attainable rank).
                Cached IFVPs are recomputed on next use.
        """
        self._require_cache("compute_preconditioners")
        damping = _check_damping(damping)
        if damping is None:
            damping = self.damping
        auto = damping is None
        if auto:
            damping = DEFAULT_DAMPING
        store = MatrixStore(self.offload, self.device, self._disk_dir(), "preconditioner")
        if self.hessian == "Identity":
            for i in range(len(self.layer_names)):
                store.put(i, None)
        else:
            acc = [
                torch.zeros(d, d, dtype=torch.float64, device=self.device) for d in self.layer_dims
            ]
            n_blocks = -(-self._grads.n // self._block_rows)
            blocks = self._grads.iter_blocks(self._block_rows)
            for _, rows in iterate(blocks, "Fisher", self.verbose, total=n_blocks):
                work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
                for (s, e), a in zip(self._offsets, acc, strict=True):
                    block = work[:, s:e]
                    a.add_((block.T @ block).to(torch.float64))
            n = self._grads.n
            ranks = self._attainable_ranks(n) if auto else [None] * len(acc)
            for i, (a, rank) in enumerate(zip(acc, ranks, strict=True)):
                inv = stable_inverse(a / n, damping, rank=rank)
                dtype = torch.float64 if self._grads.dtype == torch.float64 else torch.float32
                store.put(i, inv.to(dtype))
        self._precond = store
        self._damping_used = f"auto ({DEFAULT_DAMPING} * tr(F) / rank)" if auto else damping
        if self._ifvp is not None and self._ifvp is not self._grads:
            self._ifvp.close()
        self._ifvp = None

    def compute_ifvp(self) -> None:
        """Compute and store ``IFVP_il = F_l^-1 c_il`` for every cached sample."""
        self._require_cache("compute_ifvp")
        precs = self._preconditioners()
        if self._ifvp is not None and self._ifvp is not self._grads:
            self._ifvp.close()
        if all(p is None for p in precs):
            self._ifvp = self._grads
        else:
            store = RowStore(self.offload, self.device, self._path("train_ifvp.bin"))
            for _, rows in self._grads.iter_blocks(self._block_rows):
                store.append(self._apply_precond(rows, precs))
            store.finalize()
            self._ifvp = store
        self._write_metadata()

    def _ifvp_store(self) -> RowStore:
        if self._ifvp is None:
            self.compute_ifvp()
        return self._ifvp

    def _ensure_cached(self, train_dataloader: Iterable) -> None:
        if self._grads is not None:
            return
        warnings.warn(
            f"{type(self).__name__}: cache() was not called; caching on train_dataloader.",
            UserWarning,
            stacklevel=4,
        )
        self.cache(train_dataloader)

    def _test_reps(self, test_dataloader: Iterable) -> Tensor:
        validate_loader(
            self.task, test_dataloader, "test_dataloader", keep_batch_dim=True, target=True
        )
        reps = [
            self._compress(move_to_device(batch, self.device), target=True)
            for batch in iterate(test_dataloader, "test gradients", self.verbose)
        ]
        return torch.cat(reps)

    def _train_ifvp_blocks(self, train_dataloader: Iterable) -> Iterator[tuple[int, Tensor]]:
        """IFVP rows of the training loader: cached if it is the cached loader."""
        if train_dataloader is self.full_train_dataloader:
            yield from self._ifvp_store().iter_blocks(self._block_rows)
            return
        precs = self._preconditioners()
        row = 0
        for batch in iterate(train_dataloader, "train gradients", self.verbose):
            rows = self._compress(move_to_device(batch, self.device), target=False)
            yield row, self._apply_precond(rows, precs)
            row += rows.shape[0]

    @staticmethod
    def _dot(a: Tensor, b: Tensor) -> Tensor:
        if a.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        return a @ b.to(a.dtype).T

    def _iter_score_blocks(
        self, train_dataloader: Iterable, test_dataloader: Iterable
    ) -> Iterator[tuple[int, Tensor]]:
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        test = self._test_reps(test_dataloader)
        for row, ifvp in self._train_ifvp_blocks(train_dataloader):
            yield row, self._dot(ifvp, test)

    def attribute(self, train_dataloader: Iterable, test_dataloader: Iterable) -> Tensor:
        """Influence of every training sample on every test sample.

        Args:
            train_dataloader: training samples (rows). If it is the loader object given
                to :meth:`cache`, the stored IFVPs are used; any other loader has its
                gradients computed and preconditioned with the cached Fisher. If
                :meth:`cache` was not called, it is called on this loader (warning).
            test_dataloader: test samples (columns), gradients of the target function.

        Returns:
            ``(n_train, n_test)`` scores on ``device``; larger = more helpful.
        """
        return torch.cat([b for _, b in self._iter_score_blocks(train_dataloader, test_dataloader)])

    def compute_self_attribution(self) -> Tensor:
        """Self-influence ``sum_l c_il^T F_l^-1 c_il`` of every cached training sample.

        Returns:
            ``(n_train,)`` on ``device``.
        """
        self._require_cache("compute_self_attribution")
        ifvp = self._ifvp_store()
        out = []
        for start, grads in self._grads.iter_blocks(self._block_rows):
            rows = ifvp.rows(start, start + grads.shape[0])
            out.append(self._dot_rows(rows, grads))
        return torch.cat(out)

    @staticmethod
    def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
        if a.dtype not in (torch.float32, torch.float64):
            a, b = a.float(), b.float()
        return (a * b.to(a.dtype)).sum(dim=1)

    def self_attribute(self, train_dataloader: Iterable) -> Tensor:
        """Score each training sample against itself (diagonal of ``attribute(train, train)``).

        Args:
            train_dataloader: training samples.

        Returns:
            ``(n_train,)`` on ``device``.
        """
        check_loader(train_dataloader, "train_dataloader")
        self._ensure_cached(train_dataloader)
        if train_dataloader is self.full_train_dataloader and self._target_is_loss():
            return self.compute_self_attribution()
        out = []
        cached = train_dataloader is self.full_train_dataloader
        precs = None if cached else self._preconditioners()
        row = 0
        for batch in iterate(train_dataloader, "self-attribution", self.verbose):
            batch = move_to_device(batch, self.device)
            target = self._compress(batch, target=True)
            b = target.shape[0]
            if cached:
                ifvp = self._ifvp_store().rows(row, row + b)
            else:
                ifvp = self._apply_precond(self._compress(batch, target=False), precs)
            out.append(self._dot_rows(ifvp, target))
            row += b
        return torch.cat(out)
