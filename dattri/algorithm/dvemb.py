"""Data value embeddings (DVEmb; Wang et al., ICLR 2025).

"Capturing the Temporal Dependence of Training Data Influence": during SGD,
``theta_{t+1} = theta_t - eta_t sum_{i in B_t} g_{t,i}`` with ``eta_t = lr_t / |B_t|``
(mean loss) and ``g_{t,i}`` the per-sample gradient at ``theta_t``. To first order,
training on sample ``i`` at step ``t`` lowers a test loss at the final parameters by
``emb_{t,i} . grad l(z_test; theta_T)`` with the *data value embedding*

``emb_{t,i} = eta_t (I - eta_{T-1} H_{T-1}) ... (I - eta_{t+1} H_{t+1}) g_{t,i}``,
``H_s = sum_{j in B_s} g_{s,j} g_{s,j}^T`` (Gauss-Newton approximation),

computed backwards in time as ``emb_{t,i} = eta_t (I - M) g_{t,i}`` with
``M = sum_{s>t} sum_j emb_{s,j} g_{s,j}^T`` (see
:func:`~dattri.algorithm.features.dvemb_embeddings.dvemb_embeddings`). A sample's embedding
of an epoch
is the sum over its steps in that epoch; scores sum the epochs (or use one).

Gradients are taken at the live model (the task's checkpoints are not used): record
them during training with :meth:`DVEmbAttributor.cache_gradients` (an extra
forward/backward) or, in the factorized modes, the context manager
:meth:`DVEmbAttributor.cache_gradients_context` around your own training step.

Phases: :mod:`~dattri.algorithm.features.dvemb_grads` (per-sample gradients, projected
or factorized), :mod:`~dattri.algorithm.features.dvemb_embeddings` (the backward
recursion, in memory or in a resumable on-disk store), then tiles of
``S = E g_test^T`` into a sink (:mod:`~dattri.algorithm.score.tiles`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from dattri.algorithm.base import BaseAttributor
from dattri.algorithm.features.dvemb_embeddings import (
    EmbeddingRows,
    cache_embeddings,
    check_step_args,
    recorded_steps,
)
from dattri.algorithm.features.dvemb_grads import DVEmbGradients, capture_layer_calls
from dattri.algorithm.runtime.batching import check_loader, iterate, move_to_device
from dattri.algorithm.runtime.distributed import gather_rows
from dattri.algorithm.runtime.validation import (
    check_task,
    required_positional_args,
    scan_huge_values,
    validate_loader,
)
from dattri.algorithm.score.tiles import (
    ScoreFile,
    iter_row_batches,
    iter_store_tiles,
    plan_tiles,
    scores_of_tiles,
    topk_of_tiles,
)
from dattri.algorithm.score.topk import TopKResult
from dattri.algorithm.store.in_memory import ProjectedGradientStore
from dattri.task import AttributionTask

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dattri.algorithm.store.scaled import ScaleKwargs

__all__ = ["DVEmbAttributor"]

FACTORIZATIONS = ("none", "kronecker", "elementwise")
_WRONG_FORMAT = "Wrong loss function format"
_NO_TRAIN_LOADER = (
    "DVEmb scores the training samples whose embeddings cache() recorded during "
    "training; choose rows with train_data_indices= and pass test=."
)


class DVEmbAttributor(BaseAttributor):
    """Data value embeddings (trajectory-specific influence of each training sample).

    Loss formats (checked at construction, ``ValueError`` "Wrong loss function format"):

    * ``factorization_type="none"``: functional ``loss(params, sample)`` seeing ONE
      un-batched sample (``params`` a ``{name: tensor}`` dict for
      ``torch.func.functional_call``); per-sample gradients of all trainable
      parameters (or those of ``layer_names``) by :mod:`dattri.func.per_sample_grad`.
    * ``"kronecker"`` / ``"elementwise"``: eager ``loss(model, batch, device)``
      returning the MEAN loss of the batch; per-sample gradients of the
      ``nn.Linear``/``nn.Conv2d`` layers ``layer_names`` (default all ``nn.Linear``)
      are formed from layer inputs and output gradients (samples must not interact,
      e.g. no BatchNorm in train mode).

    The task's target function (default: the loss) gives the test gradients and must
    have the same format.

    Projection (``proj_params``, a ``DVEmbProjectionParams``): none if ``proj_params``
    or its ``proj_dim_per_layer`` is None. Else ``k = proj_dim_per_layer`` with
    ``proj_params.proj_type`` (``"identity"``, the class default, means ``"normal"``
    when a dimension is given, as upstream; a warning says so):

    * ``"none"``: the whole gradient is projected to ``k`` dims.
    * ``"kronecker"``: per layer ``P_out G P_in^T`` with ``sqrt(k) x d_out`` and
      ``sqrt(k) x (d_in + 1)`` factor projections (``G = [grad_W | grad_b]``, bias kept),
      ``k`` per layer.
    * ``"elementwise"``: per layer ``sqrt(k) * (P_out s) * (P_in [a, 1])`` summed over
      positions, with ``k x d_out`` / ``k x (d_in + 1)`` factors; an unbiased sketch of
      ``<G, G'>`` for Gaussian factors.

    Layer ``l`` uses projection seeds ``proj_seed + 1000 l`` (input) and
    ``proj_seed + 1000 l + 1`` (output). Without projection all modes give the exact
    per-sample gradient ``[W.flatten(), b]`` per layer (same as ``"none"`` on those
    parameters).

    Args:
        task: the task (its model is the live model being trained).
        proj_params: projection configuration, or None.
        factorization_type: ``"none"``, ``"kronecker"`` or ``"elementwise"``.
        layer_names: module names (or, in ``"none"`` mode, also parameter names).
        verbose: show progress bars.
        **scale: ``cache_dir`` (a resumable on-disk store of the embeddings written by
            :meth:`cache`: one ``(n, d)`` array per epoch, plus the recursion state
            after the last finished epoch), ``store_dtype`` (its storage dtype; default
            the gradients') and ``max_memory`` (budget of the scoring buffers, e.g.
            ``"2GB"``: tile sizes, and a temporary store for the embeddings when they
            take more than half of it; the recursion itself keeps ``d x d`` or
            ``N x d``).

    Under torch.distributed the ranks split the embedding columns of the recursion
    (it is sequential in time; with ``cache_dir`` rank 0 runs it and the others read
    the store) and each scores its share of the embedding rows; every rank returns
    the full result.
    """

    #: how attribute() picks training rows instead of a training loader
    loader_hint = _NO_TRAIN_LOADER

    def __init__(
        self,
        task: AttributionTask,
        proj_params: Any = None,
        factorization_type: str = "none",
        layer_names: str | Sequence[str] | None = None,
        *,
        verbose: bool = True,
        **scale: Unpack[ScaleKwargs],
    ) -> None:
        check_task(task)
        if factorization_type not in FACTORIZATIONS:
            msg = f"factorization_type must be one of {FACTORIZATIONS}, got {factorization_type!r}."
            raise ValueError(msg)
        self.model = task.get_model()
        try:
            device = next(self.model.parameters()).device  # the live model's
        except StopIteration as exc:
            msg = "The task's model has no parameters."
            raise ValueError(msg) from exc
        self._setup(task, None, device, verbose, **scale)
        self.factorization_type = factorization_type
        self.use_factorization = factorization_type != "none"
        want = 3 if self.use_factorization else 2
        for what, func in (
            ("loss", task.original_loss_func),
            ("target", task.original_target_func),
        ):
            if required_positional_args(func) != want:
                form = "loss(model, batch, device)" if want == 3 else "loss(params, sample)"
                msg = (
                    f"{_WRONG_FORMAT} for factorization_type={factorization_type!r}: the "
                    f"task's {what} function must be {form} ({want} required arguments)."
                )
                raise ValueError(msg)
        if isinstance(layer_names, str):
            layer_names = [layer_names]
        self.layer_names = None if layer_names is None else list(layer_names)
        self.featurizer = DVEmbGradients(
            task, proj_params, factorization_type, self.layer_names, self.device
        )
        self.proj_params = self.featurizer.proj_params
        self.proj_dim_per_layer = self.featurizer.proj_dim_per_layer
        self.cached_gradients: dict[Any, list[Tensor]] = {}
        # factorized modes without projection: {epoch: [[{"A", "B", "has_bias"}, ...]]}
        self.cached_factors: dict[Any, list[list[dict[str, Any]]]] = {}
        self.learning_rates: dict[Any, list[float]] = {}
        self.data_indices: dict[Any, list[Tensor]] = {}
        #: ``{epoch: (n, d)}`` embeddings (tensors, or stored rows with a store)
        self.embeddings: dict[Any, Any] = {}
        self._caching_method: str | None = None

    # -------------------------------------------------- upstream attributes
    @property
    def projector(self) -> Callable[[Tensor], Tensor] | None:
        """Upstream name: the ``"none"``-mode projection ``(B, p) -> (B, k)``.

        ``None`` without projection, in the factorized modes, or before the
        first gradient is recorded (it is built from the first batch, as upstream).
        """
        return self.featurizer._projector

    @projector.setter
    def projector(self, value: Callable[[Tensor], Tensor] | None) -> None:
        self.featurizer._projector = value

    @property
    def projectors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Dense ``(k_in, d_in + 1)`` / ``(k_out, d_out)`` factor projections per layer."""
        return self.featurizer.projectors

    @property
    def projection_dim_per_layer(self) -> int | None:
        """Upstream name: the per-factor projection dimension.

        ``isqrt(proj_dim_per_layer)`` for ``"kronecker"`` (each factor is
        projected to ``sqrt(k)`` dims so a layer has ``k``), ``proj_dim_per_layer``
        otherwise, ``None`` without projection.
        """
        k = self.proj_dim_per_layer
        if k is None or self.factorization_type != "kronecker":
            return k
        return math.isqrt(k)

    @property
    def projection_dim(self) -> int | None:
        """Alias of :attr:`projection_dim_per_layer` (newer upstream name)."""
        return self.projection_dim_per_layer

    @property
    def _linear_layers(self) -> list[nn.Module]:
        """Upstream name: the hooked layer modules, in order (factorized modes)."""
        return list(self.featurizer._modules.values()) if self.use_factorization else []

    @property
    def random_projectors(
        self,
    ) -> list[tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] | None:
        """Upstream name: per layer ``(project_input, project_output)`` callables.

        See :attr:`~dattri.algorithm.features.dvemb_grads.DVEmbGradients.random_projectors`.
        """
        return self.featurizer.random_projectors

    # -------------------------------------------------------------- caching
    def _record(self, epoch: Any, grads: Tensor, indices: Tensor, learning_rate: float) -> None:
        if grads.shape[0] != indices.shape[0]:
            msg = f"indices has {indices.shape[0]} entries but the batch has {grads.shape[0]}."
            raise ValueError(msg)
        self.cached_gradients.setdefault(epoch, []).append(grads.detach().cpu())
        self.learning_rates.setdefault(epoch, []).append(float(learning_rate) / grads.shape[0])
        self.data_indices.setdefault(epoch, []).append(indices.detach().cpu().long())
        factors = self.featurizer.pop_step_factors()
        if factors is not None:
            self.cached_factors.setdefault(epoch, []).append(factors)

    def _set_method(self, method: str) -> None:
        if self._caching_method not in (None, method):
            warnings.warn(
                "Both cache_gradients() and cache_gradients_context() were used on this "
                "attributor; mixing them is allowed but each step must be recorded once.",
                UserWarning,
                stacklevel=3,
            )
        self._caching_method = method

    def cache_gradients(
        self, epoch: Any, batch_data: Any, indices: Tensor | Sequence[int], learning_rate: float
    ) -> None:
        """Record the per-sample gradients of one training step (call before the step).

        Runs an extra forward/backward at the current parameters; the model's
        ``.grad`` fields are not touched.

        Args:
            epoch: epoch key (any sortable value; epochs are processed in sorted order).
            batch_data: the batch of the step (tuple/list/dict of tensors).
            indices: ``(B,)`` dataset indices of the batch samples.
            learning_rate: learning rate of the step (the loss is a batch mean, so the
                per-sample step size is ``learning_rate / B``).
        """
        idx = check_step_args(indices, learning_rate)
        self._set_method("direct")
        scan_huge_values(batch_data, "cache_gradients", 0, idx)
        if not self.cached_gradients and not self.use_factorization:
            self.task.check_functions(
                move_to_device(batch_data, self.device),
                keep_batch_dim=False,
                target=False,
                where="the first batch given to cache_gradients",
                ckpt_idx=None,  # the live model being trained: load nothing
            )
        grads = self.featurizer(batch_data, target=False)
        self._record(epoch, grads, idx, learning_rate)

    @contextmanager
    def cache_gradients_context(
        self, epoch: Any, indices: Tensor | Sequence[int], learning_rate: float
    ) -> Generator[None, None, None]:
        """Record one step of your own training loop (factorized modes only).

        Wrap the forward, ``loss.backward()`` (of the plain batch-MEAN loss, no loss
        scaling) and ``optimizer.step()``; layer inputs and output gradients are
        captured by hooks, so no extra forward/backward is run.

        Args:
            epoch: epoch key.
            indices: ``(B,)`` dataset indices of the batch samples.
            learning_rate: learning rate of the step.

        Yields:
            Nothing.

        Raises:
            NotImplementedError: for ``factorization_type="none"``.
        """
        if not self.use_factorization:
            msg = (
                "cache_gradients_context only supports the factorized modes "
                "(factorization_type='kronecker' or 'elementwise'); use cache_gradients() "
                "with factorization_type='none'."
            )
            raise NotImplementedError(msg)
        idx = check_step_args(indices, learning_rate)
        self._set_method("context")
        with capture_layer_calls(self.featurizer._modules, grad_hooks=True) as store:
            yield
        for recs in store.values():
            for c in recs:
                c[1] = None
        grads = self.featurizer.grads_from_records(store, idx.shape[0], record=True)
        self._record(epoch, grads, idx, learning_rate)

    def clear_cache(self) -> None:
        """Drop the recorded gradients, factors, learning rates and indices (embeddings stay)."""
        self.cached_gradients.clear()
        self.cached_factors.clear()
        self.learning_rates.clear()
        self.data_indices.clear()

    def cache(
        self,
        gradients: dict[Any, list[Tensor]] | None = None,
        learning_rates: dict[Any, list[float]] | None = None,
        memory_saving: bool = True,
        *,
        data_indices: dict[Any, list[Tensor]] | None = None,
        method: str = "auto",
    ) -> None:
        """Compute the embeddings of every epoch from the recorded steps.

        With ``cache_dir`` (or a ``max_memory`` spill) each epoch's embedding and the
        recursion state after it are written to the store: a second ``cache()`` after
        an interruption continues after the last finished epoch, a complete store is
        reused, and a store written from other recorded steps is refused.

        Args:
            gradients: optional ``{epoch: [grads (B_t, d), ...]}`` replacing the recorded
                per-sample gradients (``"none"`` mode only).
            learning_rates: optional ``{epoch: [eta_t, ...]}`` replacing the recorded
                step sizes; used verbatim as the per-sample step ``eta_t`` (``lr / B``
                for a mean loss).
            memory_saving: clear the recorded gradients afterwards.
            data_indices: optional ``{epoch: [indices (B_t,), ...]}`` (needed with
                external gradients if no step was recorded).
            method: ``"auto"``, ``"dense"`` or ``"low_rank"``, see
                :func:`~dattri.algorithm.features.dvemb_embeddings.dvemb_embeddings`.

        Raises:
            ValueError: if nothing is recorded, external gradients in a factorized mode,
                inconsistent inputs, or NaN/inf.
        """
        if gradients is not None and self.use_factorization:
            msg = "External gradients are not supported with gradient factorization."
            raise ValueError(msg)
        grads = self.cached_gradients if gradients is None else gradients
        lrs = self.learning_rates if learning_rates is None else learning_rates
        idxs = self.data_indices if data_indices is None else data_indices
        steps, n = recorded_steps(grads, lrs, idxs)
        self.embeddings = cache_embeddings(
            steps,
            n,
            self.device,
            method,
            self.scale_options,
            self,
            self.featurizer.settings(),
            self.verbose,
        )
        if memory_saving:
            self.clear_cache()

    # ----------------------------------------------------------- attribution
    def _rows(self, epoch: Any, train_data_indices: Any) -> EmbeddingRows:
        """The selected embedding rows (summed over epochs for ``epoch=None``)."""
        if not self.embeddings:
            msg = "Embeddings not computed: call cache() after recording the training steps."
            raise RuntimeError(msg)
        if epoch is None:
            sources = list(self.embeddings.values())
        elif epoch in self.embeddings:
            sources = [self.embeddings[epoch]]
        else:
            msg = f"No embeddings for epoch {epoch!r}; recorded epochs: {sorted(self.embeddings)}."
            raise ValueError(msg)
        if train_data_indices is None:
            return EmbeddingRows(sources, None)
        idx = torch.as_tensor(train_data_indices).reshape(-1).long().cpu().numpy()
        n = sources[0].shape[0]
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            msg = f"train_data_indices must lie in [0, {n})."
            raise ValueError(msg)
        return EmbeddingRows(sources, idx)

    def _test_grads(self, test_dataloader: Iterable) -> Tensor:
        """``(n_test, d)`` target gradients at the live model."""
        check_loader(test_dataloader, "test_dataloader")
        if not self.use_factorization:
            validate_loader(
                self.task,
                test_dataloader,
                "test_dataloader",
                keep_batch_dim=False,
                target=True,
                ckpt_idx=None,  # the live model
            )
        grads = [
            self.featurizer(b, target=True)
            for b in iterate(test_dataloader, "DVEmb test gradients", self.verbose)
        ]
        return torch.cat(grads)

    def _tiles(
        self, test_dataloader: Iterable, epoch: Any, train_data_indices: Any
    ) -> tuple[EmbeddingRows, Tensor, Iterator[tuple[int, int, Tensor]]]:
        """Rows, test gradients and this rank's ``(row, col, tile)`` of ``S = E g^T``."""
        rows = self._rows(epoch, train_data_indices)
        test = self._test_grads(test_dataloader).to(device=rows.device, dtype=rows.dtype)
        (n_test, d), item = test.shape, test.element_size()
        budget = self.scale_options.max_memory
        reserved = n_test * d * item if budget else 0
        plan = plan_tiles(rows.shape[0], n_test, d, budget, itemsize=item, reserved=reserved)
        store = ProjectedGradientStore(loader=None, features=[rows], block_rows=plan.train_block)
        return rows, test, iter_store_tiles(store, [test], None, None, plan.test_block, True)

    def attribute(
        self,
        test_dataloader: Iterable,
        epoch: Any = None,
        train_data_indices: Sequence[int] | Tensor | None = None,
        *,
        out: ScoreFile = None,
    ) -> Tensor:
        """Score every recorded training sample against every test sample.

        Args:
            test_dataloader: test samples (gradients of the target at the live model).
            epoch: one epoch's embeddings, or None for the sum over epochs.
            train_data_indices: rows to return (dataset indices); default all
                ``0 .. max recorded index``.
            out: path of a ``.npy`` score file: tiles are written there and a
                memory-mapped float32 CPU tensor on it is returned.

        Returns:
            ``(n_train, n_test)``; larger = the sample lowered the test loss more.

        Raises:
            RuntimeError: before :meth:`cache`.
            ValueError: for an unknown epoch or out-of-range indices.
        """
        rows, test, tiles = self._tiles(test_dataloader, epoch, train_data_indices)
        return scores_of_tiles(tiles, out, rows.shape[0], test.shape[0], rows.dtype, rows.device)

    def attribute_topk(
        self,
        test_dataloader: Iterable,
        k: int,
        epoch: Any = None,
        train_data_indices: Sequence[int] | Tensor | None = None,
    ) -> TopKResult:
        """Per-test top-k helpful/harmful training rows, streamed tile by tile.

        Args:
            test_dataloader: test samples.
            k: training rows per side.
            epoch: one epoch, or None for all.
            train_data_indices: the candidate rows (positions in the result refer to
                this list); default all.

        Returns:
            A :class:`~dattri.algorithm.score.topk.TopKResult` with ``(n_test, k)`` tensors.
        """
        _, test, tiles = self._tiles(test_dataloader, epoch, train_data_indices)
        return topk_of_tiles(tiles, k, test.shape[0])

    def self_attribute(
        self,
        train_dataloader: Iterable,
        epoch: Any = None,
        train_data_indices: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Score each training sample against itself.

        Args:
            train_dataloader: training samples; sample ``k`` has dataset index
                ``train_data_indices[k]`` (default ``k``).
            epoch: one epoch, or None for all.
            train_data_indices: dataset indices of the loader's samples.

        Returns:
            ``(n,)``, equal to ``attribute(train_dataloader, epoch, idx).diag()``.
        """
        check_loader(train_dataloader, "train_dataloader")
        self._rows(epoch, None)  # cached, valid epoch
        pairs = iter_row_batches(train_dataloader, True, "DVEmb self-attribution", self.verbose)
        given = None
        if train_data_indices is not None:
            given = torch.as_tensor(train_data_indices).reshape(-1).long().cpu().numpy()
        out = []
        for _, b, pos in pairs:
            g = self.featurizer(b, target=True)
            stop = pos + g.shape[0]
            idx = np.arange(pos, stop) if given is None else given[pos:stop]
            emb = self._rows(epoch, idx)[0 : len(idx)]
            out.append((emb * g.to(emb)).sum(dim=1))
        rows = self._rows(epoch, None)
        local = torch.cat(out) if out else torch.zeros(0, dtype=rows.dtype, device=rows.device)
        return gather_rows(local)
