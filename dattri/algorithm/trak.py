"""TRAK (Park et al., 2023): random-projected after-kernel attribution.

Per checkpoint ``k`` the per-sample gradients of the loss (usually the log-odds margin
``log p - log(1 - p)``) are scaled by ``1 / sqrt(p_sel)`` (``p_sel`` = number of
SELECTED parameters) and projected: ``Phi_k`` ``(n_train, d)`` for the training set,
``phi_k`` ``(n_test, d)`` for the test samples (gradients of the target function). With
``Q_i = mean_k (1 - p_k(z_i))`` (``p`` from ``correct_probability_func``) the scores are

``S[i, j] = Q_i * mean_k  Phi_k[i] (Phi_k^T Phi_k + lambda I)^-1 phi_k[j]^T``

i.e. upstream's ``(mean_k phi_k (Phi_k^T Phi_k + lambda I)^-1 Phi_k^T * mean_k Q)^T``.
A "TRAK-k" ensemble is simply a task with ``k`` checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features.gradients import GradientFeaturizer, resolve_projection
from dattri.algorithm.runtime.batching import check_loader, iterate, move_to_device
from dattri.algorithm.runtime.validation import validate_loader
from dattri.algorithm.score.tiles import (
    BUDGET_SHARES,
    ScoreFile,
    iter_loader_tiles,
    iter_store_tiles,
    make_sink,
    plan_tiles,
)
from dattri.algorithm.store.in_memory import ProjectedGradientStore, collect_features
from dattri.algorithm.store.memmap_store import batch_plan
from dattri.algorithm.store.scaled import collect_features_scaled
from dattri.func.linalg import DampedSymmetricInverse
from dattri.loss_checks import explained_errors
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["KernelInverse", "TRAKAttributor", "factor_kernel"]

#: a squared Cholesky pivot ratio (min / max) below this = singular.
_PIVOT_RTOL = 1e-12
#: automatic regularization (``regularization=None``): ``lambda = AUTO_REGULARIZATION *
#: tr(Phi^T Phi) / min(n, d, p)``, a tenth of the mean non-zero eigenvalue of the kernel.
#: Scale-free (the features' scale, projection dimension and sample count cancel).
#: Without it the kernel inverse amplifies its smallest directions as soon as ``d``
#: approaches the rank of the gradients (digits-LR LDS 0.38 at d=256 and 0.23 at
#: d=512 with ``lambda=0``; 0.68 at d=512 with the default).
AUTO_REGULARIZATION = 0.1


class KernelInverse(DampedSymmetricInverse):
    """``(Phi^T Phi + lambda I)^-1`` (or its pseudo-inverse), applied in float64.

    A :class:`~dattri.func.linalg.DampedSymmetricInverse` (``inverse @ v``,
    ``rows @ inverse``, :meth:`matrix`) with TRAK's names: :meth:`apply` for rows and
    :attr:`regularization` for the ``lambda`` used. Holds either the Cholesky factor
    ``chol`` or, for a singular kernel, the kept eigenpairs of its pseudo-inverse.
    Built by :func:`factor_kernel`.
    """

    @property
    def regularization(self) -> float:
        """The ``lambda`` added to the kernel diagonal."""
        return self.damping

    def apply(self, phi: Tensor) -> Tensor:
        """Return ``(K^-1 phi^T)^T`` for ``(m, d)`` ``phi``, in ``phi``'s dtype."""
        return self.solve(phi)


def factor_kernel(
    phi: Tensor,
    regularization: float | None,
    what: str = "the kernel",
    block_rows: int | None = None,
    *,
    max_rank: int | None = None,
) -> KernelInverse:
    """Invert ``K = Phi^T Phi + lambda I`` (``d x d``) in float64.

    A Cholesky factorisation is used when ``K`` is positive definite. If it is
    singular (``lambda = 0`` with fewer samples than features, a failed Cholesky or a
    squared pivot ratio below ``1e-12``), the pseudo-inverse (eigenvalues below
    ``max(n, d) * eps * max(eig)`` dropped) is used instead, with a warning: it is the
    ``lambda -> 0`` limit of the regularised scores.

    Args:
        phi: ``(n, d)`` features.
        regularization: ``lambda >= 0``, or None for the automatic
            ``AUTO_REGULARIZATION * tr(K) / min(n, d, max_rank)``.
        what: name used in the warning.
        block_rows: rows of ``phi`` read at once (default: ``2**24 / d``); ``phi``
            may be any row source supporting ``shape``, ``device`` and row slicing.
        max_rank: a bound on the rank of the features (e.g. the number of
            parameters), used by the automatic regularization.

    Returns:
        A :class:`KernelInverse`; its ``regularization`` attribute is the ``lambda``
        used.

    Raises:
        ValueError: if every feature is zero (nothing to invert).
    """
    n, d = phi.shape
    kernel = torch.zeros(d, d, dtype=torch.float64, device=phi.device)
    step = block_rows or max(1, (1 << 24) // max(d, 1))
    for s in range(0, n, step):
        block = phi[s : s + step].to(torch.float64)
        kernel.addmm_(block.T, block)
    if regularization is None:
        rank = min(n, d) if max_rank is None else min(n, d, max_rank)
        regularization = AUTO_REGULARIZATION * float(kernel.diagonal().sum()) / max(rank, 1)
    out = KernelInverse(
        kernel,
        float(regularization),
        singular="pinv",
        rtol=max(n, d) * torch.finfo(torch.float64).eps,
        pivot_rtol=_PIVOT_RTOL,
        cholesky=not (regularization == 0 and n < d),
        check_finite=None,
        what=f"TRAK: {what} Phi^T Phi + {regularization} I (from {n} samples)",
        fix="use regularization > 0 or a projection dimension below the number of training samples",
        stacklevel=3,
    )
    if out.rank == 0:
        msg = f"TRAK: {what} is zero (all features vanish); cannot attribute."
        raise ValueError(msg)
    return out


class TRAKAttributor(BaseAttributor):
    """TRAK attributor.

    ``S[i, j] = Q_i * mean_k Phi_k[i] (Phi_k^T Phi_k + lambda I)^-1 phi_k[j]^T`` where
    ``Phi_k`` are the projected, scaled loss gradients of the training samples (the
    cached training set defines the kernel), ``phi_k`` the projected, scaled target
    gradients of the test samples and ``Q_i = mean_k (1 - p_k(z_i))``. The user's loss
    sees un-batched samples.

    Differences from upstream (documented fixes): gradients are scaled by
    ``1/sqrt(#selected parameters)`` (upstream used the whole model's count even with
    ``layer_name``); :meth:`self_attribute` works before and after :meth:`cache`;
    after :meth:`cache`, ``attribute(test, train)`` with another training loader scores
    its samples against the cached kernel (upstream raised ValueError); NaN/inf
    gradients raise instead of being zeroed; a singular kernel is pseudo-inverted
    with a warning.

    Args:
        task: the attribution task (its loss is usually the margin
            ``log p - log(1 - p)``).
        correct_probability_func: ``f(params_dict, sample) -> p(correct)`` for ONE
            un-batched sample; ``params_dict`` maps parameter names to tensors (use
            ``torch.func.functional_call``). It is vmapped over the batch.
        proj_params: projection params (``TRAKProjectionParams``) or None (defaults:
            ``proj_dim=512``, ``"normal"``); ``proj_type="identity"`` disables it.
        layer_name: None (all parameters), a parameter name or a list of names.
        device: device of the computation (and of the returned scores).
        regularization: ``lambda >= 0`` added to the kernel diagonal, or None (the
            default) for the automatic ``0.1 * tr(Phi^T Phi) / min(n, d, p)`` per
            checkpoint (see :data:`AUTO_REGULARIZATION`). Upstream's default was 0.0,
            whose inverse amplifies noise when ``d`` nears the gradients' rank; pass
            ``0.0`` to reproduce it.
        projector_kwargs: the older dict form of the projection settings.
        verbose: show progress bars.
        **scale: ``cache_dir`` (a resumable on-disk store of the projected training
            gradients, shared by torch.distributed ranks), ``store_dtype`` (its storage
            dtype, e.g. ``"float16"``; scores are computed in the model's dtype, at
            least float32) and ``max_memory`` (bytes or e.g. ``"2GB"``: sets the block
            sizes and spills the features to a temporary store if needed).
    """

    streams_tiles = True

    def __init__(
        self,
        task: AttributionTask,
        correct_probability_func: Callable,
        proj_params: Any | None = None,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        regularization: float | None = None,
        projector_kwargs: Mapping[str, Any] | None = None,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        self._setup(task, layer_name, device, verbose, **scale)
        if not callable(correct_probability_func):
            msg = (
                "correct_probability_func must be callable: f(params_dict, sample) -> "
                "probability of the correct label."
            )
            raise TypeError(msg)
        if regularization is not None and (
            isinstance(regularization, bool)
            or not isinstance(regularization, (int, float))
            or not regularization >= 0
        ):
            msg = (
                f"regularization must be None (automatic) or a float >= 0, got {regularization!r}."
            )
            raise ValueError(msg)
        from dattri.params.projection import TRAKProjectionParams

        self.correct_probability_func = correct_probability_func
        self.regularization = None if regularization is None else float(regularization)
        self.proj_params = resolve_projection(proj_params, projector_kwargs, TRAKProjectionParams)
        scale = 1.0 / float(task.num_params(layer_name)) ** 0.5
        self.featurizer = GradientFeaturizer(
            task, layer_name, self.proj_params, self.device, scale=scale
        )
        self._prob_funcs: dict[int, Callable] = {}
        self._store: ProjectedGradientStore | None = None

    # ----------------------------------------------------------------- helpers
    @property
    def num_checkpoints(self) -> int:
        """Number of checkpoints ``K``."""
        return len(self.task.get_checkpoints())

    def _target_is_loss(self) -> bool:
        return self.task.original_target_func is self.task.original_loss_func

    def _one_minus_p(self, ckpt_idx: int, batch: Any) -> Tensor:
        """``1 - p_k(z)`` for one batch, ``(B,)``."""
        params = self.task.get_param_dict(ckpt_idx)
        func = torch.func.vmap(
            self.correct_probability_func, in_dims=(None, 0), randomness="different"
        )
        with torch.no_grad():
            model = self.task.get_model()
            with explained_errors(model, batch, "a batch", "correct_probability_func"):
                p = func(params, batch)
        if not isinstance(p, Tensor):
            msg = "correct_probability_func must return a tensor (the probability)."
            raise TypeError(msg)
        p = p.reshape(p.shape[0], -1) if p.dim() > 0 else p.reshape(1, 1)
        if p.shape[1] != 1:
            msg = (
                "correct_probability_func must return one probability per sample (a "
                f"scalar for an un-batched sample), got {p.shape[1]} values per sample."
            )
            raise ValueError(msg)
        return 1.0 - p[:, 0]

    def _build(self, loader: Iterable, desc: str) -> ProjectedGradientStore:
        """Features, Cholesky factors and ``Q`` of a training loader."""
        self.featurizer.apply_budget(self.scale_options.max_memory)
        store = collect_features_scaled(
            self.featurizer,
            loader,
            self.num_checkpoints,
            self.scale_options,
            self,
            extra=self._one_minus_p,
            kind="TRAK train features",
            verbose=self.verbose,
            desc=desc,
        )
        rows = None
        if self.scale_options.max_memory is not None:
            d = self.featurizer.out_dim
            rows = max(1, self.scale_options.max_memory // (BUDGET_SHARES * 8 * max(d, 1)))
        store.state["inverse"] = [
            factor_kernel(
                f,
                self.regularization,
                f"the kernel of checkpoint {k}",
                rows,
                max_rank=self.task.num_params(self.layer_name),
            )
            for k, f in enumerate(store.features)
        ]
        q = torch.stack(store.extras).mean(dim=0)
        store.state["q"] = q.to(store.features[0].dtype)
        store.extras = []
        return store

    def _solve(self, store: ProjectedGradientStore, ckpt_idx: int, phi: Tensor) -> Tensor:
        """``(Phi^T Phi + lambda I)^-1 phi^T`` for ``(m, d)`` ``phi``, returned ``(m, d)``."""
        return store.state["inverse"][ckpt_idx].apply(phi)

    def _test_transform(self, store: ProjectedGradientStore, test_dataloader: Iterable) -> list:
        """Per checkpoint ``(n_test, d)``: ``K_k^-1 phi_k / n_ckpt``."""
        if store.is_for(test_dataloader) and self._target_is_loss():
            phis = [getattr(f, "materialize", lambda f=f: f)() for f in store.features]
        else:
            phis = collect_features(
                self.featurizer,
                test_dataloader,
                self.num_checkpoints,
                target=True,
                verbose=self.verbose,
                desc="test gradients",
            ).features
        n = self.num_checkpoints
        return [self._solve(store, k, phi) / n for k, phi in enumerate(phis)]

    def _state_for(self, train_dataloader: Iterable | None) -> ProjectedGradientStore:
        if self._store is not None:
            return self._store
        if train_dataloader is None:
            msg = (
                "TRAKAttributor needs training data: call cache(full_train_dataloader) "
                "first or pass train_dataloader."
            )
            raise ValueError(msg)
        check_loader(train_dataloader, "train_dataloader")
        return self._build(train_dataloader, "train gradients")

    # ------------------------------------------------------------------ phases
    def cache(self, full_train_dataloader: Iterable) -> None:
        """Compute and keep ``Phi_k``, the Cholesky factor of each kernel and ``Q``.

        Memory: ``K x (n, d)`` features plus ``K`` ``(d, d)`` float64 factors on
        ``device``. Passing this same loader object to :meth:`attribute` /
        :meth:`self_attribute` reuses the stored rows.

        Args:
            full_train_dataloader: the training set (not shuffled); it defines the
                kernel and the default rows of :meth:`attribute`.
        """
        self._check_train_loader(full_train_dataloader, keep_batch_dim=False)
        self._store = self._build(full_train_dataloader, "train gradients")

    def _test_block(self, store: ProjectedGradientStore, n_test: int) -> int:
        """Set the row block of ``store`` from ``max_memory``; return the test block."""
        budget = self.scale_options.max_memory
        if budget is None:
            return n_test
        d, n_ckpt = self.featurizer.out_dim, self.num_checkpoints
        reserved = n_ckpt * (n_test * d * 8 + d * d * 8)
        plan = plan_tiles(
            store.num_samples, n_test, d * n_ckpt, budget, itemsize=8, reserved=reserved
        )
        store.block_rows = plan.train_block
        return plan.test_block

    def _iter_tiles(
        self,
        train_dataloader: Iterable | None,
        test_dataloader: Iterable,
        shard: bool = False,
        full_width: bool = False,
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(row_start, col_start, tile)`` score tiles (see :meth:`attribute`)."""
        check_loader(test_dataloader, "test_dataloader")
        self._check_order(test_dataloader, train_dataloader)
        validate_loader(
            self.task, test_dataloader, "test_dataloader", keep_batch_dim=False, target=True
        )
        store = self._state_for(train_dataloader)
        tests = self._test_transform(store, test_dataloader)
        n_test = tests[0].shape[0]
        if train_dataloader is None or store.is_for(train_dataloader):
            block = self._test_block(store, n_test)
            block = n_test if full_width else block
            yield from iter_store_tiles(store, tests, None, store.state["q"], block, shard)
            return
        # Cached kernel, other training rows: featurize them batch by batch.
        check_loader(train_dataloader, "train_dataloader")

        def featurize(b: int, batch: Any) -> tuple[list[Tensor], Tensor]:
            batch = move_to_device(batch, self.device)
            feats = [self.featurizer(k, batch, where=f" {b} of train") for k in range(len(tests))]
            q = torch.stack([self._one_minus_p(k, batch) for k in range(len(tests))])
            return feats, q.mean(dim=0)

        with self.featurizer.reuse_buffers():
            yield from iter_loader_tiles(
                train_dataloader, featurize, tests, None, n_test, shard, self.verbose
            )

    def _check_order(self, first: Iterable, second: Iterable | None) -> None:
        """Raise if ``attribute(train, test)`` was called (TRAK's order is (test, train)).

        Detected after :meth:`cache` when the first loader is the cached training
        loader (or iterates the same dataset object) and the second is another one.
        """
        store = self._store
        if store is None or second is None or store.is_for(second):
            return
        cached = store.loader
        same = store.is_for(first) or (
            getattr(first, "dataset", None) is not None
            and getattr(first, "dataset", None) is getattr(cached, "dataset", object())
        )
        if same:
            msg = (
                "TRAKAttributor.attribute(test_dataloader, train_dataloader=None): the "
                "first argument is the cached training loader, so the arguments look "
                "swapped. TRAK keeps upstream's order (test, train), unlike the other "
                "attributors: call attribute(test_loader) or attribute(test_loader, "
                "train_loader)."
            )
            raise ValueError(msg)

    def _iter_score_blocks(
        self, train_dataloader: Iterable | None, test_dataloader: Iterable
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(row_start, (B, n_test))`` score blocks (train may be None if cached)."""
        for row, _, block in self._iter_tiles(train_dataloader, test_dataloader, full_width=True):
            yield row, block

    def _n_rows(self, loader: Iterable | None) -> int:
        if loader is None or (self._store is not None and self._store.is_for(loader)):
            return self._state_for(loader).num_samples
        return sum(batch_plan(loader))

    def attribute(
        self,
        test_dataloader: Iterable,
        train_dataloader: Iterable | None = None,
        *,
        out: ScoreFile = None,
    ) -> Tensor:
        """Score every (train, test) pair (note the upstream argument order).

        Without :meth:`cache`, ``train_dataloader`` is required and defines both the
        kernel and the rows. After :meth:`cache`, the cached set defines the kernel;
        ``train_dataloader=None`` (or the cached loader) scores the cached samples,
        another loader scores its own samples against the cached kernel.

        Scores are produced in ``(train block, test block)`` tiles (sizes from
        ``max_memory``). With torch.distributed each rank scores its share of the
        training rows and every rank returns the full matrix.

        Args:
            test_dataloader: test samples (columns), not shuffled.
            train_dataloader: training samples (rows), or None after :meth:`cache`.
            out: path of a ``.npy`` score file: tiles are written there and a
                memory-mapped float32 CPU tensor on it is returned, so the full matrix
                is never held in memory.

        Returns:
            ``(n_train, n_test)`` scores on ``device`` (memory-mapped with ``out``).

        Raises:
            ValueError: if neither :meth:`cache` was called nor a train loader given.
        """
        if out is None and not self.scale_options.active:
            blocks = self._iter_score_blocks(train_dataloader, test_dataloader)
            return torch.cat([b for _, b in blocks])
        check_loader(test_dataloader, "test_dataloader")
        n_train, n_test = self._n_rows(train_dataloader), sum(batch_plan(test_dataloader))
        dtype = torch.promote_types(self.task.get_param(0)[0].dtype, torch.float32)
        sink = make_sink(out, n_train, n_test, dtype, self.device)
        for row, col, tile in self._iter_tiles(train_dataloader, test_dataloader, shard=True):
            sink.add(row, col, tile)
        return sink.finalize()

    def self_attribute(self, train_dataloader: Iterable | None = None) -> Tensor:
        """Score each training sample against itself.

        Equals the diagonal of ``attribute(train, train)`` under the same rules as
        :meth:`attribute` (the kernel is the cached one if :meth:`cache` was called,
        else that of ``train_dataloader``).

        Args:
            train_dataloader: training samples, or None after :meth:`cache`.

        Returns:
            ``(n_train, 1)`` scores on ``device`` (upstream's shape; ``.squeeze()``
            gives ``(n_train,)``).
        """
        store = self._state_for(train_dataloader)
        n = self.num_checkpoints
        if train_dataloader is None or store.is_for(train_dataloader):
            if self._target_is_loss():
                tgt = store.features
            else:
                tgt = collect_features(
                    self.featurizer,
                    store.loader,
                    n,
                    target=True,
                    verbose=self.verbose,
                    desc="target gradients",
                ).features
            total = None
            for k, (f, t) in enumerate(zip(store.features, tgt)):
                parts = [
                    (f[rows] * self._solve(store, k, t[rows])).sum(dim=1)
                    for rows in store.row_blocks(f.shape[1])
                ]
                part = torch.cat(parts)
                total = part if total is None else total + part
            return (store.state["q"] * total / n).unsqueeze(1)
        check_loader(train_dataloader, "train_dataloader")
        with self.featurizer.reuse_buffers():
            return self._self_attribute_uncached(store, train_dataloader, n)

    def _self_attribute_uncached(self, store: Any, train_dataloader: Iterable, n: int) -> Tensor:
        out = []
        for b, batch in enumerate(iterate(train_dataloader, "self-attribution", self.verbose)):
            batch = move_to_device(batch, self.device)
            where = f" {b} of train"
            total = None
            qs = []
            for k in range(n):
                f = self.featurizer(k, batch, where=where)
                t = f if self._target_is_loss() else self.featurizer(k, batch, True, where)
                part = (f * self._solve(store, k, t)).sum(dim=1)
                total = part if total is None else total + part
                qs.append(self._one_minus_p(k, batch))
            q = torch.stack(qs).mean(dim=0).to(total.dtype)
            out.append(q * total / n)
        return torch.cat(out).unsqueeze(1)
