"""Train many small models on data subsets at once (vectorised LDS ground truth).

Training semantics (shared exactly by the vectorised and the sequential path):

* Model ``s`` is created by ``model_factory()`` right after
  ``torch.manual_seed(init_seeds[s])`` (the global RNG state is restored
  afterwards), so the same seed gives the same initialisation.
* Every epoch visits the *full* training set in one shared order: a permutation
  from ``torch.Generator().manual_seed(config.seed)`` (one per epoch, drawn in
  sequence), cut into batches of ``config.batch_size`` (last one may be
  smaller). ``batch_size=None`` means full-batch gradient descent (one step per
  epoch, no shuffling).
* The loss of model ``s`` on a batch is the mean per-sample loss over the batch
  samples inside subset ``s`` (``masks[s] == 1``), i.e. a masked mean; a batch
  without any of its samples gives zero loss gradient, but the optimizer still
  steps (weight decay and momentum act).
* Loss weights: the loss of a batch is :func:`~dattri.model_util.train_step.weighted_mean_loss`
  of the per-sample losses with the mask as weights (MAGIC differentiates the same
  function in continuous weights).
* Optimizer: :func:`~dattri.model_util.train_step.optimizer_update`, SGD with
  momentum and L2 weight decay (``torch.optim.SGD`` semantics) or Adam
  (``torch.optim.Adam`` semantics), learning rate
  :func:`~dattri.model_util.train_step.lr_at` (constant, linear or cosine decay,
  optional warm-up), ``config.epochs`` epochs. Every step goes through
  :func:`train_step`, the one update shared with
  :class:`~dattri.algorithm.magic.MAGICAttributor`'s replay.

The vectorised path stacks all models with ``torch.func.stack_module_state``
and evaluates them with ``vmap(functional_call)``; SGD is element-wise, so one
optimizer over the stacked parameters equals one optimizer per model. Models
with dropout or batch norm are rejected (their training behaviour would differ
between the two paths).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from dattri.model_util._data import atomic_torch_save, func_name
from dattri.model_util.retrain import plan_lds
from dattri.model_util.train_step import (
    init_optimizer_state,
    lr_at,
    optimizer_update,
    weighted_mean_loss,
)

__all__ = ["SubsetTrainConfig", "retrain_lds_vectorized", "train_step", "train_subset_models"]

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("constant", "linear", "cosine")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SubsetTrainConfig:
    """Hyper-parameters of :func:`train_subset_models`.

    Attributes:
        epochs: Passes over the full training set.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 coefficient (SGD ``weight_decay``).
        batch_size: Batch size over the full training set; ``None`` = full batch.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable
            ``loss(outputs (B, ...), targets (B, ...)) -> (B,)`` per-sample losses.
        seed: Seed of the shared batch order (and default init seeds ``seed + s``).
        device: Training device.
        dtype: Floating dtype of parameters and inputs.
        model_chunk_size: Train at most this many models at once in the
            vectorised path (``None``: all); bounds memory.
        optimizer: ``"sgd"`` (momentum, weight decay) or ``"adam"`` (``betas``,
            ``eps``, L2 ``weight_decay``; ``momentum`` unused).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's ``eps``.
        lr_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay over all steps
            (see :func:`dattri.model_util.train_step.lr_at`).
        warmup_steps: Steps of linear learning-rate warm-up.
    """

    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int | None = 128
    loss: str | LossFn = "cross_entropy"
    seed: int = 0
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    model_chunk_size: int | None = None
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        """Validate fields.

        Raises:
            ValueError: On an invalid field (message names it).
        """
        if int(self.epochs) != self.epochs or self.epochs < 1:
            msg = f"SubsetTrainConfig.epochs must be a positive integer; got {self.epochs}."
            raise ValueError(msg)
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            msg = "SubsetTrainConfig needs lr > 0, momentum >= 0 and weight_decay >= 0."
            raise ValueError(msg)
        if self.batch_size is not None and (self.batch_size < 1):
            msg = f"SubsetTrainConfig.batch_size must be >= 1 or None; got {self.batch_size}."
            raise ValueError(msg)
        if isinstance(self.loss, str) and self.loss not in ("cross_entropy", "mse"):
            msg = (
                "SubsetTrainConfig.loss must be 'cross_entropy', 'mse' or a callable; "
                f"got {self.loss!r}."
            )
            raise ValueError(msg)
        if self.model_chunk_size is not None and self.model_chunk_size < 1:
            msg = "SubsetTrainConfig.model_chunk_size must be >= 1 or None."
            raise ValueError(msg)
        if self.optimizer not in _OPTIMIZERS:
            msg = (
                f"SubsetTrainConfig.optimizer must be one of {_OPTIMIZERS}; got {self.optimizer!r}."
            )
            raise ValueError(msg)
        if self.lr_schedule not in _SCHEDULES:
            msg = (
                f"SubsetTrainConfig.lr_schedule must be one of {_SCHEDULES}; "
                f"got {self.lr_schedule!r}."
            )
            raise ValueError(msg)
        if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            msg = (
                f"SubsetTrainConfig.warmup_steps must be an integer >= 0; got {self.warmup_steps}."
            )
            raise ValueError(msg)
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1) or self.eps <= 0:
            msg = "SubsetTrainConfig needs 0 <= betas < 1 and eps > 0 (Adam)."
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict for metadata files."""
        d = asdict(self)
        d["loss"] = self.loss if isinstance(self.loss, str) else func_name(self.loss)
        d["device"] = str(self.device)
        d["dtype"] = str(self.dtype)
        d["betas"] = list(self.betas)
        return d


# --------------------------------------------------------------------------- helpers


def _loss_fn(loss: str | LossFn) -> LossFn:
    if loss == "cross_entropy":
        return lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")
    if loss == "mse":
        return lambda out, y: (
            (out.reshape(out.shape[0], -1) - y.reshape(y.shape[0], -1)) ** 2
        ).mean(1)
    return loss


def _batches(n: int, config: SubsetTrainConfig) -> list[list[torch.Tensor]]:
    """Per epoch, the list of index batches (shared by all models)."""
    if config.batch_size is None:
        return [[torch.arange(n)] for _ in range(config.epochs)]
    gen = torch.Generator().manual_seed(int(config.seed))
    out = []
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        out.append(list(perm.split(int(config.batch_size))))
    return out


def _make_model(
    factory: Callable[[], nn.Module], seed: int, config: SubsetTrainConfig
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = factory()
    if not isinstance(model, nn.Module):
        msg = f"model_factory must return an nn.Module; got {type(model).__name__}."
        raise TypeError(msg)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p == 0:
            continue  # the identity
        if isinstance(mod, nn.modules.dropout._DropoutNd | nn.modules.batchnorm._NormBase):
            msg = (
                f"Module {name!r} ({type(mod).__name__}) is stochastic or keeps running "
                "statistics; train_subset_models supports deterministic models only."
            )
            raise NotImplementedError(msg)
    return model.to(device=config.device, dtype=config.dtype)


def _check_inputs(
    dataset_tensors: tuple[torch.Tensor, torch.Tensor], masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (isinstance(dataset_tensors, tuple | list) and len(dataset_tensors) == 2):
        msg = "`dataset_tensors` must be a pair (inputs (n, ...), targets (n, ...))."
        raise ValueError(msg)
    x, y = (torch.as_tensor(t) for t in dataset_tensors)
    if x.shape[0] != y.shape[0]:
        msg = (
            f"`dataset_tensors` inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}."
        )
        raise ValueError(msg)
    masks = torch.as_tensor(masks)
    if masks.dim() != 2 or masks.shape[1] != x.shape[0]:
        msg = f"`masks` must have shape (n_models, n={x.shape[0]}); got {tuple(masks.shape)}."
        raise ValueError(msg)
    if not torch.isin(masks.double(), torch.tensor([0.0, 1.0], dtype=torch.float64)).all():
        msg = "`masks` must be 0/1 (or bool): 1 = sample is in the model's subset."
        raise ValueError(msg)
    return x, y, masks


def _to_device(
    x: torch.Tensor, y: torch.Tensor, config: SubsetTrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(config.device)
    if x.is_floating_point():
        x = x.to(config.dtype)
    y = y.to(config.device)
    if y.is_floating_point():
        y = y.to(config.dtype)
    return x, y


def train_step(
    loss_of: Callable[[list[torch.Tensor]], torch.Tensor],
    params: list[torch.Tensor],
    state: list[torch.Tensor],
    step: int,
    total_steps: int,
    config: SubsetTrainConfig,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One training step: gradient of ``loss_of(params)`` then the optimizer update.

    Args:
        loss_of: ``params -> scalar`` weighted batch loss (a sum over models when
            models are stacked; they do not interact).
        params: parameter tensors (detached).
        state: optimizer state (:func:`~dattri.model_util.train_step.init_optimizer_state`).
        step: 0-based global step.
        total_steps: steps of the whole run (learning-rate schedule).
        config: training settings.

    Returns:
        ``(new_params, new_state)``, detached.
    """
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    with torch.no_grad():
        lr = lr_at(config, step, total_steps)
        return optimizer_update(params, state, grads, step, lr, config)


def _train_sequential(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    batches: list[list[torch.Tensor]],
    config: SubsetTrainConfig,
    loss_fn: LossFn,
    bar: tqdm,
) -> None:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(named)
    params = [p.detach().clone() for p in named.values()]
    state = init_optimizer_state(params, config)
    weights = mask.to(config.dtype)
    total = sum(len(e) for e in batches)
    step = 0
    for epoch in batches:
        for idx in epoch:
            w = weights[idx]

            def loss_of(
                ps: list[torch.Tensor], idx: torch.Tensor = idx, w: torch.Tensor = w
            ) -> torch.Tensor:
                out = functional_call(model, dict(zip(names, ps, strict=True)), (x[idx],))
                return weighted_mean_loss(loss_fn(out, y[idx]), w)

            params, state = train_step(loss_of, params, state, step, total, config)
            step += 1
        bar.update(1)
    with torch.no_grad():
        for name, value in zip(names, params, strict=True):
            named[name].copy_(value)


def _train_vectorized(
    models: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    batches: list[list[torch.Tensor]],
    config: SubsetTrainConfig,
    loss_fn: LossFn,
    bar: tqdm,
) -> None:
    stacked, buffers = stack_module_state(models)
    names = list(stacked)
    base = copy.deepcopy(models[0]).to("meta")

    def forward(
        p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    batched = vmap(forward, in_dims=(0, 0, None), randomness="error")
    params = [stacked[n].detach() for n in names]
    state = init_optimizer_state(params, config)
    weights = masks.to(config.dtype)
    n_models = len(models)
    total = sum(len(e) for e in batches)
    step = 0
    for epoch in batches:
        for idx in epoch:
            w = weights[:, idx]  # (S, B)

            def loss_of(
                ps: list[torch.Tensor], idx: torch.Tensor = idx, w: torch.Tensor = w
            ) -> torch.Tensor:
                out = batched(dict(zip(names, ps, strict=True)), buffers, x[idx])  # (S, B, ...)
                yb = y[idx].repeat(n_models, *([1] * (y.dim() - 1)))  # model-major (S*B, ...)
                per = loss_fn(out.reshape(n_models * idx.numel(), *out.shape[2:]), yb)
                return weighted_mean_loss(per.reshape(n_models, idx.numel()), w).sum()

            params, state = train_step(loss_of, params, state, step, total, config)
            step += 1
        bar.update(1)
    with torch.no_grad():
        for s, model in enumerate(models):
            named = dict(model.named_parameters())
            for name, value in zip(names, params, strict=True):
                named[name].copy_(value[s])


# --------------------------------------------------------------------------- public API


def train_subset_models(
    model_factory: Callable[[], nn.Module],
    dataset_tensors: tuple[torch.Tensor, torch.Tensor],
    masks: torch.Tensor,
    config: SubsetTrainConfig | None = None,
    *,
    init_seeds: Sequence[int] | None = None,
    vectorized: bool = True,
    verbose: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Train one model per subset mask, vectorised or sequentially (same semantics).

    See the module docstring for the exact training semantics.

    Args:
        model_factory: Zero-argument callable building a fresh (deterministic,
            no dropout/batch norm) model on CPU.
        dataset_tensors: ``(inputs (n, ...), targets (n, ...))`` of the full
            training set.
        masks: ``(n_models, n)`` 0/1 or bool; ``masks[s, i] = 1`` if sample ``i``
            is in subset ``s``.
        config: Hyper-parameters (default ``SubsetTrainConfig()``).
        init_seeds: ``(n_models,)`` initialisation seeds (default
            ``config.seed + s``).
        vectorized: Train all models together with ``vmap`` (True) or one after
            the other (False).
        verbose: Show a tqdm progress bar.

    Returns:
        ``n_models`` CPU state_dicts, in mask order.

    Raises:
        ValueError: On shape/value errors in the inputs.
        NotImplementedError: For models with dropout or batch norm.
    """
    config = config or SubsetTrainConfig()
    x, y, masks = _check_inputs(dataset_tensors, masks)
    n_models = masks.shape[0]
    seeds = [config.seed + s for s in range(n_models)] if init_seeds is None else list(init_seeds)
    if len(seeds) != n_models:
        msg = f"`init_seeds` has {len(seeds)} entries for {n_models} masks."
        raise ValueError(msg)
    x, y = _to_device(x, y, config)
    masks = masks.to(device=config.device, dtype=torch.bool)
    loss_fn = _loss_fn(config.loss)
    batches = [[b.to(config.device) for b in epoch] for epoch in _batches(x.shape[0], config)]
    chunk = (config.model_chunk_size or n_models) if vectorized else 1
    starts = range(0, n_models, chunk)
    out: list[dict[str, torch.Tensor]] = []
    with tqdm(
        total=len(starts) * config.epochs,
        desc="train_subset_models" + (" (vmap)" if vectorized else ""),
        unit="epoch",
        disable=not verbose,
    ) as bar:
        for start in starts:
            stop = min(n_models, start + chunk)
            models = [_make_model(model_factory, seeds[s], config) for s in range(start, stop)]
            if vectorized:
                _train_vectorized(models, x, y, masks[start:stop], batches, config, loss_fn, bar)
            else:
                _train_sequential(models[0], x, y, masks[start], batches, config, loss_fn, bar)
            out.extend(
                {k: v.detach().to("cpu").clone() for k, v in m.state_dict().items()} for m in models
            )
    return out


def retrain_lds_vectorized(
    model_factory: Callable[[], nn.Module],
    dataset_tensors: tuple[torch.Tensor, torch.Tensor],
    path: str | Path,
    num_subsets: int = 100,
    subset_ratio: float = 0.5,
    num_runs_per_subset: int = 1,
    seed: int | None = None,
    config: SubsetTrainConfig | None = None,
    *,
    start_id: int = 0,
    total_num_subsets: int = 0,
    vectorized: bool = True,
    verbose: bool = True,
) -> None:
    """LDS retraining with :func:`train_subset_models`, same layout as ``retrain_lds``.

    Subset ``i`` uses the same positions as :func:`dattri.model_util.retrain_lds`
    with the same ``seed`` (``default_rng(seed + i).choice(n, int(n * ratio))``);
    run ``j`` of subset ``i`` is initialised with seed
    ``seed + i * num_runs_per_subset + j``. The batch order is shared by all
    models (``config.seed``). Existing weights files are skipped (resumable), and
    models already on disk are not retrained.

    Args:
        model_factory: Zero-argument callable building a fresh model.
        dataset_tensors: ``(inputs (n, ...), targets (n, ...))``; position ``i`` =
            row ``i`` of the score matrix.
        path: Output directory.
        num_subsets: Number of subsets.
        subset_ratio: Fraction of samples per subset, in ``(0, 1]``.
        num_runs_per_subset: Models per subset.
        seed: Base seed (``None``: random).
        config: Training hyper-parameters.
        start_id: Id of this call's first subset (distributed use, as ``retrain_lds``).
        total_num_subsets: Total subsets over all jobs (0: this call only).
        vectorized: Use the vectorised trainer (False: sequential, same result).
        verbose: Show progress bars.

    Raises:
        ValueError: On invalid arguments or if ``path`` holds a different run.
    """
    config = config or SubsetTrainConfig()
    n = int(torch.as_tensor(dataset_tensors[0]).shape[0])
    plan = plan_lds(
        path,
        range(n),
        num_subsets,
        subset_ratio,
        num_runs_per_subset,
        seed,
        start_id=start_id,
        total_num_subsets=total_num_subsets,
    )
    if plan.jobs:
        masks = torch.zeros(len(plan.jobs), n, dtype=torch.bool)
        for row, (_, positions, _) in enumerate(plan.jobs):
            masks[row, torch.from_numpy(positions)] = True
        state_dicts = train_subset_models(
            model_factory,
            dataset_tensors,
            masks,
            config,
            init_seeds=[plan.run_seed(i, j) for i, _, j in plan.jobs],
            vectorized=vectorized,
            verbose=verbose,
        )
        for (i, _, j), sd in zip(plan.jobs, state_dicts, strict=True):
            atomic_torch_save(sd, plan.weights_file(i, j))
    plan.finalize(f"train_subset_models:{func_name(model_factory)}", trainer=config.to_dict())
