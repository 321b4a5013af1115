"""Gradient compressors and loss adapters of the block-projected IF family.

Each selected layer ``l`` (``nn.Linear``, ``nn.Conv2d`` or ``nn.Embedding``) has a
per-sample gradient in matrix form ``G`` of shape ``(d_out, d_in)`` (``Linear``:
``[grad_W | grad_b]`` with the bias as an extra last input column; see
:func:`dattri.func.layer_grads.matrix_shape`). It is compressed in two stages:

1. *factorised sparsifier*: ``P_out G P_in^T`` with ``P_out (k_out, d_out)`` and
   ``P_in (k_in, d_in)``, computed from the layer's captured inputs and output
   gradients by :func:`dattri.func.per_sample_grad.per_sample_kron_projected`, so the
   full per-sample gradient is never formed; flattened row-major to ``k_out * k_in``;
2. *projector* (optional): a random projection of that vector to ``k`` coordinates
   (:func:`dattri.func.projection.random_project`, e.g. SJLT).

Factor types: ``"normal"`` (i.i.d. N(0, 1/k) entries, so ``E[P^T P] = I``),
``"rademacher"`` (±1/sqrt(k)), ``"random_mask"`` (``k`` distinct coordinates of the
``d`` available, sorted, no rescaling; ``k`` is capped at ``d``) and ``"identity"``
(``P = I``, no compression, ``k = d``). Factors are drawn on the CPU in float64 from a
``torch.Generator`` seeded with ``proj_seed + 10_000 * layer_index`` (``+1`` for the
input factor, ``+2`` for the projector), so they do not depend on the device, dtype
or global RNG.

:class:`BlockFeaturizer` turns one batch into the concatenated compressed rows
``[c_1 | ... | c_L]`` with the interface of
:class:`~dattri.algorithm.features.gradients.GradientFeaturizer`, so the shared stores
(memory, host memory, the resumable memmap store) keep them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dattri.algorithm.runtime.validation import required_positional_args
from dattri.func.layer_grads import layer_kind, matrix_shape
from dattri.func.layer_projection import per_sample_kron_projected
from dattri.loss_checks import explained_errors

__all__ = [
    "FACTOR_TYPES",
    "BlockFeaturizer",
    "LayerCompressor",
    "build_compressors",
    "factor_matrix",
    "functional_loss",
    "read_params",
    "resolve_layer_names",
]

#: factor (first-stage) projection types.
FACTOR_TYPES = ("normal", "rademacher", "random_mask", "identity")
#: layer kinds the Kronecker engine supports.
_KINDS = ("linear", "conv1d", "conv2d", "embedding")
#: seed offset between layers.
_LAYER_SEED_STRIDE = 10_000


def read_params(params: Any, defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Read projection settings from a params object or a dict.

    Args:
        params: None (use ``defaults``), a dict, or an object with attributes /
            ``model_dump()`` (e.g. ``LoGraProjectionParams``).
        defaults: ``{key: default}``; only these keys are read.
        what: argument name for error messages.

    Returns:
        ``{key: value}`` for every key of ``defaults``.

    Raises:
        TypeError: If ``params`` is neither None, a dict nor an object with the keys.
        ValueError: If a dict has keys that are not recognised.
    """
    if params is None:
        return dict(defaults)
    if isinstance(params, Mapping):
        allowed = set(defaults) | {"device", "feature_batch_size"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            msg = f"{what} has unknown keys {unknown}; allowed keys: {sorted(defaults)}."
            raise ValueError(msg)
        return {k: params.get(k, v) for k, v in defaults.items()}
    if hasattr(params, "model_dump"):
        dumped = params.model_dump()
        return {k: dumped.get(k, getattr(params, k, v)) for k, v in defaults.items()}
    if any(hasattr(params, k) for k in defaults):
        return {k: getattr(params, k, v) for k, v in defaults.items()}
    msg = (
        f"{what} must be None, a dict or a projection-params object with fields "
        f"{sorted(defaults)}; got {type(params).__name__}."
    )
    raise TypeError(msg)


def resolve_layer_names(model: nn.Module, layer_names: str | Sequence[str] | None) -> list[str]:
    """Validate the layers to attribute through.

    Args:
        model: The model.
        layer_names: None (every ``nn.Linear``, as upstream, and every
            ``transformers`` GPT-2 ``Conv1D``), one module name or a list of
            ``model.named_modules()`` names of ``nn.Linear``, ``Conv1D``,
            ``nn.Conv2d`` or ``nn.Embedding`` layers.

    Returns:
        The list of module names.

    Raises:
        TypeError: If ``layer_names`` is not a str / sequence of str.
        ValueError: If a name is unknown, unsupported, duplicated, or none is found.
    """
    modules = dict(model.named_modules())
    valid = [n for n, m in modules.items() if layer_kind(m) in _KINDS]
    if layer_names is None:
        names = [n for n, m in modules.items() if layer_kind(m) in ("linear", "conv1d")]
        if not names:
            msg = (
                "The model has no nn.Linear (or transformers Conv1D) layer; pass "
                "layer_names with nn.Conv2d / nn.Embedding layers."
                f" Supported layers of this model: {valid}."
            )
            raise ValueError(msg)
        return names
    if isinstance(layer_names, str):
        names = [layer_names]
    elif isinstance(layer_names, Sequence) and all(isinstance(n, str) for n in layer_names):
        names = list(layer_names)
    else:
        msg = f"layer_names must be None, a module name or a list of names, got {layer_names!r}."
        raise TypeError(msg)
    if not names:
        msg = "layer_names is empty; pass None (all nn.Linear layers) or module names."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"layer_names contains duplicates: {names}."
        raise ValueError(msg)
    bad = [n for n in names if n not in valid]
    if bad:
        msg = (
            f"layer_names {bad} are not nn.Linear / Conv1D / nn.Conv2d / nn.Embedding modules of "
            f"the model (exact types; Embedding without max_norm/scale_grad_by_freq). "
            f"Valid names: {valid}."
        )
        raise ValueError(msg)
    return names


def factor_matrix(proj_type: str, k: int, d: int, seed: int) -> Tensor:
    """A factor projection matrix, drawn on the CPU in float64.

    Args:
        proj_type: one of :data:`FACTOR_TYPES`.
        k: requested output dimension (ignored by ``"identity"``; capped at ``d``
            by ``"random_mask"``).
        d: input dimension.
        seed: generator seed.

    Returns:
        ``(k', d)`` matrix: ``k' = d`` for identity, ``min(k, d)`` for random_mask,
        else ``k``.

    Raises:
        ValueError: If ``proj_type`` is unknown or ``k < 1``.
    """
    if proj_type not in FACTOR_TYPES:
        msg = f"Factor projection type {proj_type!r} is not supported; use one of {FACTOR_TYPES}."
        raise ValueError(msg)
    if proj_type == "identity":
        return torch.eye(d, dtype=torch.float64)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        msg = f"The factor projection dimension must be a positive int, got {k!r}."
        raise ValueError(msg)
    gen = torch.Generator().manual_seed(int(seed))
    if proj_type == "random_mask":
        cols = torch.randperm(d, generator=gen)[: min(k, d)].sort().values
        mask = torch.zeros(len(cols), d, dtype=torch.float64)
        mask[torch.arange(len(cols)), cols] = 1.0
        return mask
    if proj_type == "normal":
        return torch.randn(k, d, generator=gen, dtype=torch.float64) / k**0.5
    signs = torch.randint(0, 2, (k, d), generator=gen).to(torch.float64) * 2 - 1
    return signs / k**0.5


@dataclass
class LayerCompressor:
    """Two-stage compressor of one layer's per-sample gradients.

    Attributes:
        name: module name.
        proj_in: ``(k_in, d_in)`` input-side factor (bias column included).
        proj_out: ``(k_out, d_out)`` output-side factor.
        projector: second stage ``(B, k_out * k_in) -> (B, dim)`` or None.
        dim: compressed dimension of the layer.
    """

    name: str
    proj_in: Tensor
    proj_out: Tensor
    projector: Callable[[Tensor], Tensor] | None
    dim: int

    def finish(self, kron: Tensor) -> Tensor:
        """Apply the second stage.

        Args:
            kron: ``(B, k_out * k_in)`` factor-projected gradients.

        Returns:
            ``(B, dim)``.
        """
        if self.projector is None:
            return kron
        return self.projector(kron)


def _stage2(
    in_dim: int, proj: Mapping[str, Any], seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[[Tensor], Tensor] | None, int]:
    """Build the second-stage projector of one layer.

    Args:
        in_dim: ``k_out * k_in``.
        proj: ``{"proj_dim", "proj_type", "proj_max_batch_size"}``.
        seed: projector seed.
        device: device of the projection.
        dtype: feature dtype.

    Returns:
        ``(projector or None, out_dim)``.

    Raises:
        ValueError: For a bad ``proj_dim``.
    """
    ptype, k = str(proj["proj_type"]), proj["proj_dim"]
    if ptype == "identity" or k is None or k == -1:
        return None, in_dim
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        msg = f"projector proj_dim must be a positive int (or -1 for none), got {k!r}."
        raise ValueError(msg)
    from dattri.func.projection import random_project
    from dattri.params.projection import RandomProjectionParams

    params = RandomProjectionParams(
        proj_dim=k,
        proj_max_batch_size=int(proj.get("proj_max_batch_size") or 64),
        proj_seed=int(seed),
        feature_batch_size=1,
        device=device,
        proj_type=ptype,
    )
    project = random_project(torch.zeros(1, in_dim, dtype=dtype, device=device), params)
    return (lambda x: project(x, ensemble_id=0)), k


def build_compressors(
    model: nn.Module,
    layer_names: Sequence[str],
    sparsifier: Mapping[str, Any],
    projector: Mapping[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> list[LayerCompressor]:
    """Build the compressor of every layer.

    Args:
        model: The model.
        layer_names: validated module names.
        sparsifier: ``{"proj_dim": k per side, "proj_type", "proj_seed"}``.
        projector: ``{"proj_dim", "proj_type", "proj_seed", "proj_max_batch_size"}``; type
            ``"identity"`` or ``proj_dim=-1`` skips the second stage.
        device: device of the factors and projections.
        dtype: dtype of the factors (the model's).

    Returns:
        One :class:`LayerCompressor` per layer, in ``layer_names`` order.
    """
    modules = dict(model.named_modules())
    seed0 = int(sparsifier.get("proj_seed") or 0)
    seed_proj = int(projector.get("proj_seed") or 0)
    out = []
    for idx, name in enumerate(layer_names):
        module = modules[name]
        d_out, d_in = matrix_shape(module, with_bias=True)
        seed = seed0 + _LAYER_SEED_STRIDE * idx
        ptype, k = str(sparsifier["proj_type"]), sparsifier["proj_dim"]
        p_out = factor_matrix(ptype, k, d_out, seed).to(device=device, dtype=dtype)
        p_in = factor_matrix(ptype, k, d_in, seed + 1).to(device=device, dtype=dtype)
        kron_dim = p_out.shape[0] * p_in.shape[0]
        stage2, dim = _stage2(
            kron_dim, projector, seed_proj + _LAYER_SEED_STRIDE * idx + 2, device, dtype
        )
        out.append(LayerCompressor(name, p_in, p_out, stage2, dim))
    return out


def _names_device_third(func: Callable) -> bool:
    """Whether the third positional parameter is called ``device`` (eager loss with a default).

    Args:
        func: A callable.

    Returns:
        True for ``loss(model, batch, device="cpu")``-style signatures.
    """
    try:
        params = [
            p
            for p in inspect.signature(func).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 3 and params[2].name == "device"


class _EagerLossModule(nn.Module):
    """Module whose forward evaluates an eager ``loss(model, batch, device)``."""

    def __init__(self, model: nn.Module, loss: Callable, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self._loss = loss
        self._device = device

    def forward(self, batch: Any) -> Tensor:
        """Evaluate the loss.

        Args:
            batch: the batch (here a single sample with a leading axis of 1).

        Returns:
            The loss.
        """
        return self._loss(self.model, batch, self._device)


def functional_loss(
    func: Callable, model: nn.Module, device: torch.device, what: str
) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """Turn a user loss into the functional per-sample form ``f(params, sample)``.

    Two formats are accepted, detected by the number of required positional
    arguments (a third positional parameter named ``device`` marks an eager loss
    even when it has a default):

    * functional ``f(params, data)`` (the task's dict-of-parameters convention), used
      as is; the sample it receives has a leading axis of size 1 (IF convention);
    * eager ``f(model, batch, device)`` (upstream LoGra convention). It is evaluated
      on a batch of ONE sample (shape ``(1, ...)``) with the model's parameters
      swapped for ``params`` through :func:`torch.func.functional_call`, under
      ``vmap``. Upstream requires it to return the batch mean; for a batch of one any
      reduction gives that sample's loss.

    Args:
        func: the user's loss / target function.
        model: the model the eager loss calls.
        device: passed to an eager loss as its ``device`` argument.
        what: name for error messages (``"loss_func"``/``"target_func"``).

    Returns:
        ``f(params, sample) -> scalar``.

    Raises:
        ValueError: "Wrong loss function format" if the signature matches neither.
    """
    n_args = required_positional_args(func)
    if n_args == 2 and not _names_device_third(func):
        return func
    if n_args == 3 or _names_device_third(func):
        wrapper = _EagerLossModule(model, func, device)

        def eager_as_functional(params: dict[str, Tensor], sample: Any) -> Tensor:
            prefixed = {f"model.{k}": v for k, v in params.items()}
            return torch.func.functional_call(wrapper, prefixed, (sample,))

        return eager_as_functional
    msg = (
        f"Wrong loss function format for {what}: expected an eager loss "
        "loss(model, batch, device) (upstream LoGra convention, mean over the batch) or "
        f"a functional loss loss(params, data); got a function with {n_args} required "
        "positional arguments."
    )
    raise ValueError(msg)


class BlockFeaturizer:
    """Compressed per-sample gradients of one batch: the featurizer of the block family.

    ``features(0, batch) = [c_1 | ... | c_L]`` (``(B, sum_l k_l)``), the layer-wise
    compressed gradients (:class:`LayerCompressor`) of the task's loss (or of its
    target with ``target=True``) at checkpoint 0, layers concatenated in
    ``layer_names`` order. It has the interface of
    :class:`~dattri.algorithm.features.gradients.GradientFeaturizer` (call, ``out_dim``,
    ``settings``, ``reuse_buffers``, ``grad_rows``), so the shared stores
    (:func:`~dattri.algorithm.store.scaled.collect_features_scaled`) keep its rows.
    Samples are seen as ``(1, ...)`` (``keep_batch_dim=True``).

    Args:
        task: the attribution task (checkpoint 0 is used).
        model: the task's model, on ``device``.
        layer_names: validated module names.
        sparsifier: first-stage settings (see :func:`build_compressors`).
        projector: second-stage settings (see :func:`build_compressors`).
        device: compute device.
    """

    def __init__(
        self,
        task: Any,
        model: nn.Module,
        layer_names: Sequence[str],
        sparsifier: Mapping[str, Any],
        projector: Mapping[str, Any],
        device: torch.device,
    ) -> None:
        self.task = task
        self.device = torch.device(device)
        self.layer_names = list(layer_names)
        self.sparsifier, self.projector = dict(sparsifier), dict(projector)
        # validate the loss formats early ("Wrong loss function format")
        self._losses = {
            target: functional_loss(
                task.original_target_func if target else task.original_loss_func,
                model,
                self.device,
                "target_func" if target else "loss_func",
            )
            for target in (False, True)
        }
        dtype = next(iter(task.get_param_dict(0).values())).dtype
        self.compressors = build_compressors(
            model, self.layer_names, self.sparsifier, self.projector, self.device, dtype
        )
        self.layer_dims = [c.dim for c in self.compressors]
        #: at most this many samples are compressed at once (None: whole batches).
        self.grad_rows: int | None = None

    @property
    def out_dim(self) -> int:
        """Feature dimension ``D = sum_l k_l``."""
        return sum(self.layer_dims)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """``(start, stop)`` columns of every layer in a feature row."""
        out, start = [], 0
        for d in self.layer_dims:
            out.append((start, start + d))
            start += d
        return out

    @property
    def sample_numel(self) -> int:
        """Elements held per sample while compressing (for a memory budget).

        Per layer: the captured input and output gradient (one position), their
        projections and the ``k_out * k_in`` outer product, summed over layers.
        """
        total = 0
        for c in self.compressors:
            (k_out, d_out), (k_in, d_in) = c.proj_out.shape, c.proj_in.shape
            total += d_out + d_in + k_out + k_in + k_out * k_in + c.dim
        return total

    def reuse_buffers(self) -> AbstractContextManager[None]:
        """No scratch buffer to reuse (the full gradients are never formed)."""
        return nullcontext()

    def __call__(self, ckpt_idx: int, batch: Any, target: bool = False, where: str = "") -> Tensor:
        """Compressed gradients ``(B, out_dim)`` of one (device) batch.

        Args:
            ckpt_idx: must be 0 (the family uses checkpoint 0).
            batch: the batch on ``device``.
            target: the task's target function instead of the loss.
            where: position of the batch, for error messages.

        Returns:
            ``(B, out_dim)`` in the model's dtype.
        """
        if ckpt_idx != 0:
            msg = f"The block-compressed features use checkpoint 0 only, got {ckpt_idx}."
            raise ValueError(msg)
        model = self.task.get_model()
        what = "a test batch" if target else "a training batch"
        with explained_errors(model, batch, f"{what}{where}"):
            kron = per_sample_kron_projected(
                model,
                self._losses[target],
                self.task.get_param_dict(0),
                batch,
                self.layer_names,
                {c.name: c.proj_in for c in self.compressors},
                {c.name: c.proj_out for c in self.compressors},
                keep_batch_dim=True,
                chunk_size=self.grad_rows if self.grad_rows else None,
            )
        return torch.cat([c.finish(kron[c.name]) for c in self.compressors], dim=1)

    def settings(self) -> dict[str, Any]:
        """JSON-serialisable description of the features (for a store manifest)."""
        return {
            "layers": self.layer_names,
            "layer_dims": self.layer_dims,
            "sparsifier": {k: str(v) for k, v in sorted(self.sparsifier.items())},
            "projector": {k: str(v) for k, v in sorted(self.projector.items())},
            "out_dim": self.out_dim,
        }


def method_params(
    proj_params: Any, params_class: str, proj_type: str
) -> tuple[Any, dict[str, Any]]:
    """The ``proj_params`` of LoGra / FactGraSS and the settings read from it.

    Args:
        proj_params: None (the defaults of ``params_class``), a dict or a params object.
        params_class: name of the default class in :mod:`dattri.params.projection`.
        proj_type: the method's default ``proj_type``.

    Returns:
        ``(proj_params object or dict, {"proj_dim_per_layer", "proj_type",
        "proj_seed", "proj_max_batch_size"})``.
    """
    if proj_params is None:
        from dattri.params import projection

        proj_params = getattr(projection, params_class)()
    defaults = {
        "proj_dim_per_layer": 4096,
        "proj_type": proj_type,
        "proj_seed": 0,
        "proj_max_batch_size": 64,
    }
    return proj_params, read_params(proj_params, defaults, "proj_params")
