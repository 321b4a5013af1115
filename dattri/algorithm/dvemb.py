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
:func:`~dattri.algorithm.utils.dvemb_embeddings`). A sample's embedding of an epoch
is the sum over its steps in that epoch; scores sum the epochs (or use one).

Gradients are taken at the live model (the task's checkpoints are not used): record
them during training with :meth:`DVEmbAttributor.cache_gradients` (an extra
forward/backward) or, in the factorized modes, the context manager
:meth:`DVEmbAttributor.cache_gradients_context` around your own training step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dattri.algorithm.runtime.batching import batch_size_of, check_loader, iterate, move_to_device
from dattri.algorithm.runtime.loader_args import loader_keywords
from dattri.algorithm.runtime.validation import scan_huge_values, validate_loader
from dattri.algorithm.utils import (
    capture_layer_calls,
    dense_projection_matrix,
    dvemb_embeddings,
    full_projector,
    required_positional_args,
)
from dattri.func.layer_grads import (
    factor_grads,
    kron_project,
    layer_kind,
    linear_factors,
    matrix_shape,
)
from dattri.func.per_sample_grad import per_sample_grad
from dattri.loss_checks import explained_errors
from dattri.params.projection import DVEmbProjectionParams
from dattri.task import AttributionTask

__all__ = ["DVEmbAttributor"]

FACTORIZATIONS = ("none", "kronecker", "elementwise")
_WRONG_FORMAT = "Wrong loss function format"
_NO_TRAIN_LOADER = (
    "DVEmb scores the training samples whose embeddings cache() recorded during "
    "training; choose rows with train_data_indices= and pass test=."
)


class DVEmbAttributor:
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
    """

    def __init__(
        self,
        task: AttributionTask,
        proj_params: Any = None,
        factorization_type: str = "none",
        layer_names: str | Sequence[str] | None = None,
        *,
        verbose: bool = True,
    ) -> None:
        if not isinstance(task, AttributionTask):
            msg = f"task must be a dattri.task.AttributionTask, got {type(task).__name__}."
            raise TypeError(msg)
        if factorization_type not in FACTORIZATIONS:
            msg = f"factorization_type must be one of {FACTORIZATIONS}, got {factorization_type!r}."
            raise ValueError(msg)
        self.task = task
        self.model = task.get_model()
        try:
            self.device = next(self.model.parameters()).device
        except StopIteration as exc:
            msg = "The task's model has no parameters."
            raise ValueError(msg) from exc
        self.factorization_type = factorization_type
        self.use_factorization = factorization_type != "none"
        self.verbose = verbose
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
        if self.use_factorization:
            self._modules = self._select_modules(self.layer_names)
        else:
            self._param_names = self._select_params(self.layer_names)
        # upstream: default params with proj_dim_per_layer=None, proj_max_batch_size=64
        self.proj_params = DVEmbProjectionParams() if proj_params is None else proj_params
        self.proj_dim_per_layer = getattr(proj_params, "proj_dim_per_layer", None)
        self._proj_type = self._resolve_proj_type()
        self._projector: Callable | None = None
        self.projectors: dict[str, tuple[Tensor, Tensor]] = {}
        self.cached_gradients: dict[Any, list[Tensor]] = {}
        # factorized modes without projection: {epoch: [[{"A", "B", "has_bias"}, ...]]}
        self.cached_factors: dict[Any, list[list[dict[str, Any]]]] = {}
        self._step_factors: list[dict[str, Any]] | None = None
        self.learning_rates: dict[Any, list[float]] = {}
        self.data_indices: dict[Any, list[Tensor]] = {}
        self.embeddings: dict[Any, Tensor] = {}
        self._caching_method: str | None = None

    # -------------------------------------------------- upstream attributes
    @property
    def projector(self) -> Callable[[Tensor], Tensor] | None:
        """Upstream name: the ``"none"``-mode projection ``(B, p) -> (B, k)``.

        ``None`` without projection, in the factorized modes, or before the
        first gradient is recorded (it is built from the first batch, as upstream).
        """
        return self._projector

    @projector.setter
    def projector(self, value: Callable[[Tensor], Tensor] | None) -> None:
        self._projector = value

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
        return list(self._modules.values()) if self.use_factorization else []

    @property
    def random_projectors(
        self,
    ) -> list[tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] | None:
        """Upstream name: per layer ``(project_input, project_output)`` callables.

        Only in the factorized modes with projection (else ``None``).
        ``project_input`` maps layer inputs ``(N, d_in)`` (or ``(N, d_in + 1)``
        with the bias column of ones, which this implementation keeps; it is
        appended when absent) to ``(N, projection_dim_per_layer)``;
        ``project_output`` maps output gradients ``(N, d_out)`` likewise.
        """
        if not self.use_factorization or self._proj_type is None:
            return None
        out = []
        for idx, (name, module) in enumerate(self._modules.items()):
            p_in, p_out = self._factor_projectors(name, idx, module)

            def proj_in(x: Tensor, p: Tensor = p_in) -> Tensor:
                if x.shape[-1] == p.shape[1] - 1:
                    x = torch.cat([x, x.new_ones((*x.shape[:-1], 1))], dim=-1)
                return x @ p.T.to(x)

            def proj_out(x: Tensor, p: Tensor = p_out) -> Tensor:
                return x @ p.T.to(x)

            out.append((proj_in, proj_out))
        return out

    # ------------------------------------------------------------- selection
    def _select_modules(self, names: list[str] | None) -> dict[str, nn.Module]:
        modules = dict(self.model.named_modules())
        ok = {n: m for n, m in modules.items() if self._factorizable(m)}
        if names is None:
            chosen = {n: m for n, m in modules.items() if layer_kind(m) in ("linear", "conv1d")}
        else:
            bad = [n for n in names if n not in ok]
            if bad:
                msg = (
                    f"layer_names {bad} are not nn.Linear/Conv1D/nn.Conv2d (groups=1) modules of "
                    f"the model; valid names: {list(ok)}."
                )
                raise ValueError(msg)
            chosen = {n: ok[n] for n in names}
        if not chosen:
            msg = "No Linear layers found for gradient factorization; pass layer_names."
            raise ValueError(msg)
        return chosen

    @staticmethod
    def _factorizable(module: nn.Module) -> bool:
        kind = layer_kind(module)
        return kind in ("linear", "conv1d") or (kind == "conv2d" and module.groups == 1)

    def _select_params(self, names: list[str] | None) -> list[str]:
        params = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if names is None:
            return params
        modules = dict(self.model.named_modules())
        chosen: list[str] = []
        for name in names:
            if name in params:
                chosen.append(name)
            elif name in modules:
                prefix = f"{name}." if name else ""
                chosen += [p for p in params if p.startswith(prefix)]
            else:
                msg = f"layer_names entry {name!r} is neither a module nor a parameter name."
                raise ValueError(msg)
        chosen = [p for p in params if p in set(chosen)]  # model order, no duplicates
        if not chosen:
            msg = f"layer_names {names} select no trainable parameter."
            raise ValueError(msg)
        return chosen

    def _resolve_proj_type(self) -> str | None:
        if self.proj_dim_per_layer is None:
            return None
        k = self.proj_dim_per_layer
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            msg = f"proj_params.proj_dim_per_layer must be a positive int or None, got {k!r}."
            raise ValueError(msg)
        ptype = str(getattr(self.proj_params.proj_type, "value", self.proj_params.proj_type))
        if ptype == "identity":
            warnings.warn(
                "DVEmbProjectionParams has proj_type='identity' (the default) but "
                f"proj_dim_per_layer={k}: using a 'normal' projection as upstream dattri. Set "
                "proj_type explicitly to choose, or proj_dim_per_layer=None for none.",
                UserWarning,
                stacklevel=3,
            )
            ptype = "normal"
        if self.factorization_type == "kronecker" and math.isqrt(k) ** 2 != k:
            warnings.warn(
                f"kronecker factorization uses isqrt({k}) = {math.isqrt(k)} per factor, i.e. "
                f"{math.isqrt(k) ** 2} dims per layer; pass a perfect square.",
                UserWarning,
                stacklevel=3,
            )
        return ptype

    # ----------------------------------------------------------- projection
    def _factor_projectors(self, name: str, idx: int, module: nn.Module) -> tuple[Tensor, Tensor]:
        """Dense ``(k_in, d_in + 1)`` and ``(k_out, d_out)`` factor projections."""
        if name not in self.projectors:
            k = self.proj_dim_per_layer
            k_f = math.isqrt(k) if self.factorization_type == "kronecker" else k
            w = module.weight
            d_out, d_in = matrix_shape(module, with_bias=True)  # Conv1D: transposed
            seed = int(getattr(self.proj_params, "proj_seed", 0)) + 1000 * idx
            p_in = dense_projection_matrix(d_in, k_f, self._proj_type, seed, w.device, w.dtype)
            p_out = dense_projection_matrix(
                d_out, k_f, self._proj_type, seed + 1, w.device, w.dtype
            )
            self.projectors[name] = (p_in, p_out)
        return self.projectors[name]

    def _project_full(self, grads: Tensor) -> Tensor:
        if self._proj_type is None:
            return grads
        if self._projector is None:
            self._projector = full_projector(
                grads, self.proj_dim_per_layer, self._proj_type, self.proj_params, self.device
            )
        return self._projector(grads)

    # ---------------------------------------------------------- gradients
    def _none_grads(self, batch: Any, target: bool) -> Tensor:
        func = self.task.original_target_func if target else self.task.original_loss_func
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        where = "a test batch" if target else "the batch given to cache_gradients"
        with explained_errors(self.model, batch, where):
            g = per_sample_grad(
                self.model, func, params, batch, param_names=self._param_names, keep_batch_dim=False
            )
        return self._project_full(g)

    def _factor_grads_from(self, store: dict, batch_size: int, record: bool = False) -> Tensor:
        """Per-sample (projected) layer gradients from ``[input, output, grad]`` records.

        The recorded output gradients are those of the batch's MEAN loss; they are
        multiplied by the batch size to get each sample's own loss gradient. With
        ``record`` and no projection, the per-layer factors of the step are kept in
        ``self._step_factors`` for :attr:`cached_factors`.
        """
        parts = []
        factors: list[dict[str, Any]] = []
        for idx, (name, module) in enumerate(self._modules.items()):
            calls = [(c[0], sum(c[2:])) for c in store[name] if len(c) >= 3]
            if not calls:
                msg = (
                    f"No output gradient was recorded for layer {name!r}: the loss must be "
                    "computed through it (with gradients enabled) and backpropagated."
                )
                raise ValueError(msg)
            total = None
            for a, ds in calls:
                ds = ds * batch_size
                if self._proj_type is None:
                    attrs = ["weight", "bias"] if module.bias is not None else ["weight"]
                    g = factor_grads(module, a, ds, attrs)
                    r = torch.cat([g[t].reshape(batch_size, -1) for t in attrs], dim=1)
                else:
                    p_in, p_out = self._factor_projectors(name, idx, module)
                    if self.factorization_type == "kronecker":
                        r = kron_project(module, a, ds, p_in, p_out)
                    else:
                        fa, fs = linear_factors(module, a, ds, bias_column=True)
                        r = ((fa @ p_in.T.to(fa)) * (fs @ p_out.T.to(fs))).sum(1)
                        r = r * math.sqrt(p_in.shape[0])
                total = r if total is None else total + r
            if record and self._proj_type is None:
                facs = [linear_factors(module, a, ds * batch_size, False) for a, ds in calls]
                fa = torch.cat([f[0] for f in facs], dim=1).detach().cpu()
                fs = torch.cat([f[1] for f in facs], dim=1).detach().cpu()
                if fa.shape[1] == 1:  # one position: upstream's 2-D (B, d) factors
                    fa, fs = fa[:, 0], fs[:, 0]
                factors.append({"A": fa, "B": fs, "has_bias": module.bias is not None})
            parts.append(total)
        if record and self._proj_type is None:
            self._step_factors = factors
        return torch.cat(parts, dim=1)

    def _factor_batch_grads(self, batch: Any, target: bool) -> Tensor:
        func = self.task.original_target_func if target else self.task.original_loss_func
        with capture_layer_calls(self._modules, grad_hooks=False) as store, torch.enable_grad():
            loss = func(self.model, batch, self.device)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                msg = "The factorized loss(model, batch, device) must return a scalar mean loss."
                raise ValueError(msg)
            recs = [c for n in store for c in store[n]]
            if not recs or not loss.requires_grad:
                msg = "The loss does not depend on the selected layers (layer_names)."
                raise ValueError(msg)
            grads = torch.autograd.grad(loss, [c[1] for c in recs], allow_unused=True)
        for c, g in zip(recs, grads):
            c.append(torch.zeros_like(c[1]) if g is None else g.detach())
            c[1] = None  # release the graph
        return self._factor_grads_from(store, batch_size_of(batch), record=not target)

    def _batch_grads(self, batch: Any, target: bool) -> Tensor:
        batch = move_to_device(batch, self.device)
        if self.use_factorization:
            return self._factor_batch_grads(batch, target)
        return self._none_grads(batch, target)

    # -------------------------------------------------------------- caching
    def _record(self, epoch: Any, grads: Tensor, indices: Tensor, learning_rate: float) -> None:
        if grads.shape[0] != indices.shape[0]:
            msg = f"indices has {indices.shape[0]} entries but the batch has {grads.shape[0]}."
            raise ValueError(msg)
        self.cached_gradients.setdefault(epoch, []).append(grads.detach().cpu())
        self.learning_rates.setdefault(epoch, []).append(float(learning_rate) / grads.shape[0])
        self.data_indices.setdefault(epoch, []).append(indices.detach().cpu().long())
        if self._step_factors is not None:
            self.cached_factors.setdefault(epoch, []).append(self._step_factors)
            self._step_factors = None

    @staticmethod
    def _check_step_args(indices: Any, learning_rate: Any) -> Tensor:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
            msg = f"learning_rate must be a number, got {type(learning_rate).__name__}."
            raise TypeError(msg)
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.is_floating_point() or (idx.numel() and int(idx.min()) < 0):
            msg = "indices must be non-negative integer dataset indices of the batch samples."
            raise ValueError(msg)
        return idx

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
        idx = self._check_step_args(indices, learning_rate)
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
        grads = self._batch_grads(batch_data, target=False)
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
        idx = self._check_step_args(indices, learning_rate)
        self._set_method("context")
        with capture_layer_calls(self._modules, grad_hooks=True) as store:
            yield
        for recs in store.values():
            for c in recs:
                c[1] = None
        grads = self._factor_grads_from(store, idx.shape[0], record=True)
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
                :func:`dvemb_embeddings`.

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
        n = int(max(int(ix.max()) for _, _, _, ix in steps)) + 1
        self.embeddings = dvemb_embeddings(steps, n, self.device, method, self.verbose)
        if memory_saving:
            self.clear_cache()

    # ----------------------------------------------------------- attribution
    def _embedding(self, epoch: Any, train_data_indices: Any) -> Tensor:
        if not self.embeddings:
            msg = "Embeddings not computed: call cache() after recording the training steps."
            raise RuntimeError(msg)
        if epoch is None:
            emb = sum(self.embeddings.values())
        elif epoch in self.embeddings:
            emb = self.embeddings[epoch]
        else:
            msg = f"No embeddings for epoch {epoch!r}; recorded epochs: {sorted(self.embeddings)}."
            raise ValueError(msg)
        if train_data_indices is None:
            return emb
        idx = torch.as_tensor(train_data_indices, device=emb.device).reshape(-1).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= emb.shape[0]):
            msg = f"train_data_indices must lie in [0, {emb.shape[0]})."
            raise ValueError(msg)
        return emb[idx]

    @loader_keywords(hint=_NO_TRAIN_LOADER)
    def attribute(
        self,
        test_dataloader: Iterable,
        epoch: Any = None,
        train_data_indices: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Score every recorded training sample against every test sample.

        Args:
            test_dataloader: test samples (gradients of the target at the live model).
            epoch: one epoch's embeddings, or None for the sum over epochs.
            train_data_indices: rows to return (dataset indices); default all
                ``0 .. max recorded index``.

        Returns:
            ``(n_train, n_test)``; larger = the sample lowered the test loss more.

        Raises:
            RuntimeError: before :meth:`cache`.
            ValueError: for an unknown epoch or out-of-range indices.
        """
        emb = self._embedding(epoch, train_data_indices)
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
        cols = [
            emb @ self._batch_grads(b, target=True).to(emb).T
            for b in iterate(test_dataloader, "DVEmb test gradients", self.verbose)
        ]
        return torch.cat(cols, dim=1)

    @loader_keywords
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
        full = self._embedding(epoch, None)
        out, pos = [], 0
        for b in iterate(train_dataloader, "DVEmb self-attribution", self.verbose):
            g = self._batch_grads(b, target=True).to(full)
            if train_data_indices is None:
                idx = torch.arange(pos, pos + g.shape[0])
            else:
                idx = torch.as_tensor(train_data_indices).reshape(-1)[pos : pos + g.shape[0]]
            pos += g.shape[0]
            out.append((self._embedding(epoch, idx) * g).sum(dim=1))
        return torch.cat(out)
