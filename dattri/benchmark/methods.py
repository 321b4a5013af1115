"""Attribution methods as the benchmark runs them.

Each method builds its attributor for a prepared setting and returns scores in one
convention: ``(n_train, n_test)``, larger = the training sample helps (lowers the
test loss). Hyper-parameters are the library defaults except where a setting fixes
a physical quantity (the damping of the exact-Hessian IF methods equal to the
training weight decay, the training learning rate as TracIn's checkpoint weight).
EK-FAC, TRAK, LoGra and FactGraSS use their automatic damping/regularization (a
multiple of the mean eigenvalue of their own curvature estimate): their Fisher or
kernel lives on another scale than the Hessian, so the weight decay is not the
right shift for them (EK-FAC on digits-MLP: 0.46 with damping 1e-2, 0.64 automatic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.prepare import PreparedSetting
from dattri.task import AttributionTask

__all__ = ["METHODS", "MethodOutput", "run_method"]


@dataclass
class MethodOutput:
    """Scores of one method.

    Attributes:
        scores: ``(n_train, n_test)``.
        self_scores: ``(n_train,)`` self-influence (None if the method has none).
        cache_s: seconds spent in ``cache``.
        attribute_s: seconds spent in ``attribute`` (and ``self_attribute``).
    """

    scores: Tensor
    self_scores: Tensor | None
    cache_s: float
    attribute_s: float


# ----------------------------------------------------------------- loss functions
def _loss_if(model: nn.Module) -> Callable:
    def loss(params: dict, data: tuple) -> Tensor:
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _log_prob_sample(model: nn.Module, of_logp: Callable[[Tensor], Tensor]) -> Callable:
    """``f(params, (x, y)) = of_logp(log p(y | x))`` for one unbatched sample."""

    def f(params: dict, data: tuple) -> Tensor:
        x, y = data
        logp = -nn.functional.cross_entropy(
            functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0)
        )
        return of_logp(logp)

    return f


def _loss_sample(model: nn.Module) -> Callable:
    """The cross-entropy ``-log p`` of one sample."""
    return _log_prob_sample(model, torch.neg)


def _margin_sample(model: nn.Module) -> Callable:
    """TRAK's model output: the log-odds ``log p - log(1 - p)`` of the correct class."""
    return _log_prob_sample(
        model, lambda logp: logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))
    )


def _prob_sample(model: nn.Module) -> Callable:
    """The probability ``p`` of the correct class of one sample."""
    return _log_prob_sample(model, torch.exp)


def _eager_loss(model: nn.Module, batch: tuple, device: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x.to(device)), y.to(device))


# ----------------------------------------------------------------------- helpers
@dataclass
class _Context:
    prepared: PreparedSetting
    device: str
    verbose: bool
    batch_size: int

    @property
    def train_loader(self) -> DataLoader:
        p = self.prepared
        return DataLoader(TensorDataset(p.x_train, p.y_train), batch_size=self.batch_size)

    @property
    def test_loader(self) -> DataLoader:
        p = self.prepared
        return DataLoader(TensorDataset(p.x_test, p.y_test), batch_size=self.batch_size)

    def task(
        self, loss: Callable[[nn.Module], Callable], ckpts: str = "full", **kw: Any
    ) -> AttributionTask:
        model = self.prepared.model("full").to(self.device)
        if ckpts == "full":
            checkpoints: list = [self.prepared.state_dict("full")]
        else:
            checkpoints = self.prepared.checkpoint_paths(ckpts)
        return AttributionTask(loss_func=loss(model), model=model, checkpoints=checkpoints, **kw)

    @property
    def damping(self) -> float:
        s = self.prepared.setting
        return max(s.train_config.weight_decay, s.ihvp_damping)

    def options(self, method: str, **defaults: Any) -> dict[str, Any]:
        """``defaults`` updated with the setting's ``method_kwargs[method]``."""
        return {**defaults, **self.prepared.setting.method_kwargs.get(method, {})}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.prepared.model("full").parameters())


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    import time

    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _inner_product(ctx: _Context, attributor: Any, self_attr: bool = True) -> MethodOutput:
    _, t_cache = _timed(lambda: attributor.cache(ctx.train_loader))
    scores, t_attr = _timed(lambda: attributor.attribute(ctx.train_loader, ctx.test_loader))
    self_scores = None
    if self_attr and ctx.prepared.setting.self_attribution:
        self_scores, t_self = _timed(lambda: attributor.self_attribute(ctx.train_loader))
        t_attr += t_self
    return MethodOutput(
        scores.detach().cpu(),
        None if self_scores is None else self_scores.detach().cpu().reshape(-1),
        t_cache,
        t_attr,
    )


def _identity_or_default(ctx: _Context, dim: int = 512) -> Any:
    from dattri.params.projection import TracInProjectionParams

    if ctx.num_params <= 4 * dim:
        return TracInProjectionParams(proj_type="identity", proj_dim=ctx.num_params)
    return TracInProjectionParams(proj_dim=dim)


# ------------------------------------------------------------------------ methods
def _if_explicit(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.influence_function import IFAttributorExplicit

    a = IFAttributorExplicit(
        ctx.task(_loss_if), device=ctx.device, regularization=ctx.damping, verbose=ctx.verbose
    )
    return _inner_product(ctx, a)


def _if_cg(ctx: _Context, preconditioner: str | None = None) -> MethodOutput:
    from dattri.algorithm.influence_function import IFAttributorCG

    a = IFAttributorCG(
        ctx.task(_loss_if),
        device=ctx.device,
        regularization=ctx.damping,
        verbose=ctx.verbose,
        **ctx.options("if-cg", max_iter=100, tol=1e-6),
        preconditioner=preconditioner,
    )
    return _inner_product(ctx, a)


def _if_lissa(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.influence_function import IFAttributorLiSSA

    a = IFAttributorLiSSA(
        ctx.task(_loss_if),
        device=ctx.device,
        scaling="auto",
        regularization=ctx.damping,
        verbose=ctx.verbose,
        **ctx.options("if-lissa", batch_size=50, recursion_depth=1000),
    )
    return _inner_product(ctx, a)


def _if_arnoldi(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.influence_function import IFAttributorArnoldi

    p = ctx.num_params
    a = IFAttributorArnoldi(
        ctx.task(_loss_if),
        device=ctx.device,
        regularization=ctx.damping,
        verbose=ctx.verbose,
        **ctx.options("if-arnoldi", proj_dim=min(p, 200), max_iter=min(p, 300)),
    )
    return _inner_product(ctx, a)


def _if_datainf(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.influence_function import IFAttributorDataInf

    a = IFAttributorDataInf(ctx.task(_loss_if), device=ctx.device, verbose=ctx.verbose)
    return _inner_product(ctx, a)


def _if_ekfac(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    a = IFAttributorEKFAC(ctx.task(_loss_if), device=ctx.device, damping=None, verbose=ctx.verbose)
    return _inner_product(ctx, a)


def _tracin_like(ctx: _Context, ckpts: str, normalized: bool, weight: float) -> MethodOutput:
    from dattri.algorithm.tracin import TracInAttributor

    task = ctx.task(_loss_sample, ckpts=ckpts)
    k = len(task.get_checkpoints())
    a = TracInAttributor(
        task,
        weight_list=torch.full((k,), weight),
        normalized_grad=normalized,
        proj_params=_identity_or_default(ctx),
        device=ctx.device,
        verbose=ctx.verbose,
    )
    return _inner_product(ctx, a)


def _tracin(ctx: _Context) -> MethodOutput:
    return _tracin_like(ctx, "traj", False, ctx.prepared.setting.train_config.lr)


def _grad_dot(ctx: _Context) -> MethodOutput:
    return _tracin_like(ctx, "full", False, 1.0)


def _grad_cos(ctx: _Context) -> MethodOutput:
    return _tracin_like(ctx, "full", True, 1.0)


def _trak(ctx: _Context, ckpts: str) -> MethodOutput:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.params.projection import TRAKProjectionParams

    model = ctx.prepared.model("full").to(ctx.device)
    checkpoints = (
        [ctx.prepared.state_dict("full")]
        if ckpts == "full"
        else ctx.prepared.checkpoint_paths(ckpts)
    )
    task = AttributionTask(loss_func=_margin_sample(model), model=model, checkpoints=checkpoints)
    # library defaults: 512-d projection (none for smaller models) and the automatic
    # regularization; regularization=0 at a dimension near the gradients' rank makes
    # the kernel inverse amplify noise (digits-LR LDS 0.38 at 256-d, 0.23 at 512-d)
    default = TRAKProjectionParams()
    proj = (
        TRAKProjectionParams(proj_type="identity", proj_dim=ctx.num_params)
        if ctx.num_params <= default.proj_dim
        else default
    )
    a = TRAKAttributor(
        task,
        correct_probability_func=_prob_sample(model),
        proj_params=proj,
        regularization=None,
        device=ctx.device,
        verbose=ctx.verbose,
    )
    _, t_cache = _timed(lambda: a.cache(ctx.train_loader))
    scores, t_attr = _timed(lambda: a.attribute(ctx.test_loader))
    self_scores, t_self = _timed(lambda: a.self_attribute())
    return MethodOutput(scores.cpu(), self_scores.reshape(-1).cpu(), t_cache, t_attr + t_self)


def _rps(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.rps import RPSAttributor

    model = ctx.prepared.model("full").to(ctx.device)

    def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, targets)

    task = AttributionTask(
        loss_func=soft_ce,
        model=model,
        checkpoints=[ctx.prepared.state_dict("full")],
        target_func=soft_ce,
    )
    a = RPSAttributor(
        task,
        final_linear_layer_name=ctx.prepared.setting.final_layer,
        device=ctx.device,
        verbose=ctx.verbose,
    )
    return _inner_product(ctx, a)


def _knn_shapley(ctx: _Context) -> MethodOutput:
    from dattri.algorithm.data_shapley import KNNShapleyAttributor

    a = KNNShapleyAttributor(k_neighbors=10, verbose=ctx.verbose)
    a.cache()
    scores, t_attr = _timed(lambda: a.attribute(ctx.train_loader, ctx.test_loader))
    return MethodOutput(scores.T.cpu(), None, 0.0, t_attr)


def _logra_like(ctx: _Context, cls_name: str) -> MethodOutput:
    from dattri.algorithm import factgrass, logra
    from dattri.params.projection import FactGrassProjectionParams, LoGraProjectionParams

    cls = logra.LoGraAttributor if cls_name == "logra" else factgrass.FactGraSSAttributor
    model = ctx.prepared.model("full").to(ctx.device)
    task = AttributionTask(
        loss_func=_eager_loss, model=model, checkpoints=[ctx.prepared.state_dict("full")]
    )
    kw = ctx.prepared.setting.method_kwargs.get(cls_name, {})
    params = LoGraProjectionParams if cls_name == "logra" else FactGrassProjectionParams
    proj = params(**kw) if kw else None
    a = cls(task, device=ctx.device, proj_params=proj, offload="none", verbose=ctx.verbose)
    _, t_cache = _timed(lambda: a.cache(ctx.train_loader))
    scores, t_attr = _timed(lambda: a.attribute(ctx.train_loader, ctx.test_loader))
    self_scores = a.compute_self_attribution()
    return MethodOutput(scores.cpu(), self_scores.cpu(), t_cache, t_attr)


#: most bytes of per-sample gradients the DVEmb method records (else it reports why not).
_DVEMB_MAX_BYTES = 2**30


def _dvemb(ctx: _Context) -> MethodOutput:
    """DVEmb on a re-run of the attributed model's training (same recipe and seed).

    ``cache`` time is the recorded training run (per-sample gradients of every step)
    plus the embedding computation. The recipe's momentum and weight decay are applied
    by the optimizer; DVEmb's unrolling models plain SGD steps of size ``lr / B``.
    """
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.model_util.subset_train import _batches

    p, setting = ctx.prepared, ctx.prepared.setting
    cfg = setting.train_config
    stored = cfg.epochs * len(p.y_train) * ctx.num_params * 4
    if stored > _DVEMB_MAX_BYTES:
        msg = (
            f"DVEmb would record {stored / 2**30:.1f} GiB of per-sample gradients "
            f"({cfg.epochs} epochs x {len(p.y_train)} samples x {ctx.num_params} "
            f"parameters), over the benchmark's {_DVEMB_MAX_BYTES / 2**30:.0f} GiB limit."
        )
        raise ValueError(msg)

    def fit_and_record() -> DVEmbAttributor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the full model's initialisation seed
            model = setting.model_factory()
        model = model.to(device=ctx.device, dtype=cfg.dtype)
        task = AttributionTask(
            loss_func=_loss_sample(model), model=model, checkpoints=[model.state_dict()]
        )
        attr = DVEmbAttributor(task, verbose=False)
        loss_fn = cfg.loss if callable(cfg.loss) else None
        x, y = p.x_train.to(ctx.device), p.y_train.to(ctx.device)
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for epoch, batches in enumerate(_batches(len(y), cfg)):
            for idx in batches:
                attr.cache_gradients(epoch, (x[idx], y[idx]), idx, cfg.lr)  # / B inside
                out = model(x[idx])
                if loss_fn is None:
                    loss = nn.functional.cross_entropy(out, y[idx])
                else:
                    loss = loss_fn(out, y[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        attr.cache()
        return attr

    a, t_cache = _timed(fit_and_record)
    scores, t_attr = _timed(lambda: a.attribute(ctx.test_loader))
    return MethodOutput(scores.detach().cpu(), None, t_cache, t_attr)


def _magic(ctx: _Context) -> MethodOutput:
    """MAGIC through the setting's training run (the full model: init seed 0)."""
    from dattri.algorithm.magic import MAGICAttributor

    setting = ctx.prepared.setting
    cfg = dataclasses.replace(setting.train_config, device=ctx.device)
    n_test = len(ctx.prepared.y_test)
    a = MAGICAttributor(
        ctx.task(_loss_if),
        setting.model_factory,
        cfg,
        init_seed=0,
        test_block_size=min(n_test, 256),
        verbose=ctx.verbose,
    )
    tensors = (ctx.prepared.x_train, ctx.prepared.y_train)
    _, t_cache = _timed(lambda: a.cache(tensors))
    scores, t_attr = _timed(
        lambda: a.attribute(tensors, (ctx.prepared.x_test, ctx.prepared.y_test))
    )
    return MethodOutput(scores.detach().cpu(), None, t_cache, t_attr)


METHODS: dict[str, Callable[[_Context], MethodOutput]] = {
    "if-explicit": _if_explicit,
    "if-cg": _if_cg,
    "if-cg-diag": lambda ctx: _if_cg(ctx, "diagonal"),
    "if-cg-kfac": lambda ctx: _if_cg(ctx, "kfac"),
    "if-cg-ekfac": lambda ctx: _if_cg(ctx, "ekfac"),
    "if-cg-spectral": lambda ctx: _if_cg(ctx, "spectral"),
    "if-lissa": _if_lissa,
    "if-arnoldi": _if_arnoldi,
    "if-ekfac": _if_ekfac,
    "if-datainf": _if_datainf,
    "tracin": _tracin,
    "grad-dot": _grad_dot,
    "grad-cos": _grad_cos,
    "trak-1": lambda ctx: _trak(ctx, "full"),
    "trak-10": lambda ctx: _trak(ctx, "half"),
    "rps": _rps,
    "knn-shapley": _knn_shapley,
    "logra": lambda ctx: _logra_like(ctx, "logra"),
    "factgrass": lambda ctx: _logra_like(ctx, "factgrass"),
    "dvemb": _dvemb,
    "magic": _magic,
}


def run_method(
    name: str,
    prepared: PreparedSetting,
    device: str = "cpu",
    verbose: bool = False,
    batch_size: int = 256,
) -> MethodOutput:
    """Run one method on a prepared setting.

    Args:
        name: a key of :data:`METHODS`.
        prepared: the prepared setting.
        device: torch device.
        verbose: progress bars.
        batch_size: loader batch size (the setting's ``eval_batch_size`` wins).

    Returns:
        The method's scores and timings.

    Raises:
        ValueError: for an unknown method name.
    """
    if name not in METHODS:
        msg = f"Unknown method {name!r}; available: {list(METHODS)}."
        raise ValueError(msg)
    batch_size = prepared.setting.eval_batch_size or batch_size
    return METHODS[name](_Context(prepared, device, verbose, batch_size))
