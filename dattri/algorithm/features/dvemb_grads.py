"""DVEmb per-sample gradients: the featurizer of :class:`~dattri.algorithm.dvemb.DVEmbAttributor`.

One batch -> ``(B, d)`` per-sample gradient rows, exact or randomly projected:

* ``factorization_type="none"``: functional per-sample gradients
  (:mod:`dattri.func.per_sample_grad`) of the selected parameters, optionally projected
  as a whole to ``k`` dims;
* ``"kronecker"`` / ``"elementwise"``: per-layer gradients formed from the layer inputs
  and output gradients captured by hooks (:func:`capture_layer_calls`), optionally
  projected factor by factor (``P_out G P_in^T`` or the elementwise sketch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dattri.algorithm.runtime.batching import batch_size_of, move_to_device
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

__all__ = [
    "DVEmbGradients",
    "capture_layer_calls",
    "dense_projection_matrix",
    "full_projector",
]


class DVEmbGradients:
    """Per-sample (projected) gradients of DVEmb's loss or target, one batch at a time.

    Args:
        task: the task (its live model).
        proj_params: a ``DVEmbProjectionParams`` or None (no projection).
        factorization_type: ``"none"``, ``"kronecker"`` or ``"elementwise"``.
        layer_names: selected module (or, in ``"none"`` mode, parameter) names, or None.
        device: device of the model.
    """

    def __init__(
        self,
        task: AttributionTask,
        proj_params: Any,
        factorization_type: str,
        layer_names: list[str] | None,
        device: torch.device,
    ) -> None:
        self.task = task
        self.model = task.get_model()
        self.device = device
        self.factorization_type = factorization_type
        self.use_factorization = factorization_type != "none"
        if self.use_factorization:
            self._modules = self._select_modules(layer_names)
        else:
            self._param_names = self._select_params(layer_names)
        # upstream: default params with proj_dim_per_layer=None, proj_max_batch_size=64
        self.proj_params = DVEmbProjectionParams() if proj_params is None else proj_params
        self.proj_dim_per_layer = getattr(proj_params, "proj_dim_per_layer", None)
        self._proj_type = self._resolve_proj_type()
        self._projector: Callable | None = None
        self.projectors: dict[str, tuple[Tensor, Tensor]] = {}
        #: per-layer factors of the last recorded step (factorized, unprojected)
        self._step_factors: list[dict[str, Any]] | None = None

    def settings(self) -> dict[str, Any]:
        """JSON description of the features (part of a store's settings)."""
        return {
            "factorization_type": self.factorization_type,
            "proj_dim_per_layer": self.proj_dim_per_layer,
            "proj_type": self._proj_type,
            "proj_seed": int(getattr(self.proj_params, "proj_seed", 0)),
        }

    def pop_step_factors(self) -> list[dict[str, Any]] | None:
        """The per-layer factors of the last recorded step (then forgotten)."""
        out, self._step_factors = self._step_factors, None
        return out

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
                stacklevel=4,
            )
            ptype = "normal"
        if self.factorization_type == "kronecker" and math.isqrt(k) ** 2 != k:
            warnings.warn(
                f"kronecker factorization uses isqrt({k}) = {math.isqrt(k)} per factor, i.e. "
                f"{math.isqrt(k) ** 2} dims per layer; pass a perfect square.",
                UserWarning,
                stacklevel=4,
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

    def grads_from_records(self, store: dict, batch_size: int, record: bool = False) -> Tensor:
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
        return self.grads_from_records(store, batch_size_of(batch), record=not target)

    def __call__(self, batch: Any, target: bool) -> Tensor:
        """``(B, d)`` per-sample gradients of the loss (or the target) on ``batch``."""
        batch = move_to_device(batch, self.device)
        if self.use_factorization:
            return self._factor_batch_grads(batch, target)
        return self._none_grads(batch, target)


def full_projector(
    sample: Tensor, proj_dim: int, proj_type: str, proj_params: Any, device: str | torch.device
) -> Callable[[Tensor], Tensor]:
    """Random projection of ``(B, p)`` features to ``(B, proj_dim)``.

    Args:
        sample: a ``(B, p)`` feature batch (defines ``p`` and the dtype).
        proj_dim: output dimension ``k``.
        proj_type: projection type (``"normal"``, ``"rademacher"``, ``"sjlt"``, ...).
        proj_params: the user's projection parameters (``proj_seed`` and
            ``proj_max_batch_size`` are read from it when present).
        device: device of the projection.

    Returns:
        ``f(features (B, p)) -> (B, k)`` (the same projection for every call).
    """
    from dattri.func.projection import random_project
    from dattri.params.projection import RandomProjectionParams

    params = RandomProjectionParams(
        proj_dim=proj_dim,
        proj_max_batch_size=int(getattr(proj_params, "proj_max_batch_size", 64)),
        proj_seed=int(getattr(proj_params, "proj_seed", 0)),
        feature_batch_size=sample.shape[0],
        device=device,
        proj_type=proj_type,
    )
    project = random_project(sample, params)
    return lambda features: project(features, ensemble_id=0)


def dense_projection_matrix(
    dim: int,
    proj_dim: int,
    proj_type: str,
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    block: int = 1024,
) -> Tensor:
    """The matrix ``P`` of a random projection ``x -> P x`` as a dense tensor.

    Obtained by projecting the identity (in row blocks), so it includes the
    projector's scaling (e.g. ``1/sqrt(k)`` for ``"normal"``).

    Args:
        dim: input dimension ``d``.
        proj_dim: output dimension ``k``.
        proj_type: projection type.
        seed: projection seed.
        device: device of the matrix.
        dtype: dtype of the matrix.
        block: rows of the identity projected at once.

    Returns:
        ``(k, d)`` matrix.
    """
    eye = torch.eye(dim, dtype=dtype, device=device)

    class _Seed:
        proj_seed = seed
        proj_max_batch_size = block

    project = full_projector(eye[: min(block, dim)], proj_dim, proj_type, _Seed, device)
    cols = [project(eye[s : s + block]) for s in range(0, dim, block)]
    return torch.cat(cols, dim=0).T.contiguous()


@contextmanager
def capture_layer_calls(
    modules: Mapping[str, nn.Module], grad_hooks: bool
) -> Generator[dict[str, list[list[Tensor]]], None, None]:
    """Record every grad-enabled call of some layers as ``[input, output]``.

    With ``grad_hooks`` the output gradient is appended to the record during the
    caller's own backward (``[input, output, grad]``); without, the caller takes
    gradients with respect to the recorded outputs itself. Hooks are removed on exit.

    Args:
        modules: ``{name: module}`` to hook.
        grad_hooks: also capture output gradients through tensor hooks.

    Yields:
        ``{name: [record, ...]}``, one record per call, filled as the model runs.
    """
    store: dict[str, list[list[Tensor]]] = {n: [] for n in modules}
    handles = []

    def make(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, out: Tensor) -> None:
            if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad):
                return
            rec = [args[0].detach(), out]
            store[name].append(rec)
            if grad_hooks:
                out.register_hook(lambda g: rec.append(g.detach()))

        return hook

    try:
        for n, m in modules.items():
            handles.append(m.register_forward_hook(make(n)))
        yield store
    finally:
        for h in handles:
            h.remove()
