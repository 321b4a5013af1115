"""Fixed tiny problems and the attributor configurations of the golden tests.

Two float64 problems on seeded random data (40 train / 10 test, 6 features, 3 classes):

* ``lr``: multinomial logistic regression ``nn.Sequential(nn.Linear(6, 3))`` (p = 21);
* ``mlp``: ``nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))`` (p = 83);

both trained by full-batch L-BFGS on the mean cross-entropy + ``0.5 * WD * ||theta||^2``
(so the influence functions use ``regularization = WD`` on the loss without the L2
term, as the benchmark does). The data, the trained parameters, two extra checkpoints
(the trained ones plus seeded noise, for TracIn / TRAK ensembles), the initial MLP
parameters and the SGD schedule of the DVEmb run are **stored** in
``tests/data/golden/problems.npz``: the golden tests never retrain, so they do not
depend on L-BFGS reproducing bit for bit.

Every entry of :data:`CASES` runs one attributor with the options it is used with in
the README / docs / benchmark (``dattri/benchmark/methods.py``), seeded and with fixed
iteration counts, and returns its outputs as numpy arrays: ``scores``
``(n_train, n_test)``, ``self`` ``(n_train,)`` and the ``attribute_topk`` result
(``topk_*``, ``k = TOPK``) where the method has them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"
PROBLEMS_FILE = DATA_DIR / "problems.npz"

N_TRAIN, N_TEST, D_IN, HIDDEN, N_CLASSES = 40, 10, 6, 8, 3
WD = 1e-2  # training weight decay = the IF damping
#: LiSSA converges at rate 1 - lambda / scaling per step: a larger damping keeps the
#: recursion short (200 steps) on this tiny problem; the reference uses the same value.
LISSA_REG = 0.1
TRAIN_BS, TEST_BS = 16, 4  # several batches on both sides (last batch smaller)
TOPK = 5
TRACIN_LRS = (0.3, 0.2, 0.1)  # TracInCP checkpoint weights (learning rates)
DVEMB_EPOCHS, DVEMB_BS, DVEMB_LR = 2, 10, 0.2


# --------------------------------------------------------------------- problems
def make_model(kind: str) -> nn.Module:
    """The architecture of a problem (float64), parameters not yet loaded."""
    if kind == "lr":
        model = nn.Sequential(nn.Linear(D_IN, N_CLASSES))
    else:
        model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, N_CLASSES))
    return model.to(torch.float64)


@dataclass
class GoldenProblem:
    """One stored problem: data, trained parameters and extra checkpoints."""

    kind: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    params: dict[str, Tensor]
    checkpoints: list[dict[str, Tensor]]  # [trained, trained + noise, trained + noise]
    init: dict[str, Tensor] = field(default_factory=dict)  # MLP only (DVEmb run)
    schedule: Tensor | None = None  # (epochs, N_TRAIN) permutations (DVEmb run)

    def model(self, state: dict[str, Tensor] | None = None) -> nn.Module:
        m = make_model(self.kind)
        m.load_state_dict(self.params if state is None else state)
        m.eval()
        return m

    def train_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=TRAIN_BS)

    def test_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=TEST_BS)

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.params.values())


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Tensor]:
    return {
        k[len(prefix) :]: torch.from_numpy(v.copy())
        for k, v in arrays.items()
        if k.startswith(prefix)
    }


def load_problems(path: Path = PROBLEMS_FILE) -> dict[str, GoldenProblem]:
    """Read the stored problems (see :func:`tests.golden.make_golden.build_problems`)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out = {}
    for kind in ("lr", "mlp"):
        p = f"{kind}/"
        t = _prefixed(arrays, p)
        ckpts = [_prefixed(arrays, f"{p}ckpt{i}/") for i in range(3)]
        out[kind] = GoldenProblem(
            kind=kind,
            x_train=t["x_train"],
            y_train=t["y_train"],
            x_test=t["x_test"],
            y_test=t["y_test"],
            params=_prefixed(arrays, f"{p}params/"),
            checkpoints=ckpts,
            init=_prefixed(arrays, f"{p}init/"),
            schedule=t.get("schedule"),
        )
    return out


# ---------------------------------------------------------------- loss functions
def loss_if(model: nn.Module) -> Callable:
    """IF convention: a sample arrives as ``(1, ...)``; a batch gives its mean loss."""

    def loss(params: dict, data: tuple) -> Tensor:
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def loss_sample(model: nn.Module) -> Callable:
    """TracIn / TRAK / DVEmb convention: one un-batched sample."""

    def loss(params: dict, data: tuple) -> Tensor:
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    return loss


def margin_sample(model: nn.Module) -> Callable:
    """TRAK's output function: ``log p - log(1 - p)`` of the correct class."""

    def margin(params: dict, data: tuple) -> Tensor:
        logp = -loss_sample(model)(params, data)
        return logp - torch.log((-torch.expm1(logp)).clamp_min(1e-12))

    return margin


def prob_sample(model: nn.Module) -> Callable:
    def prob(params: dict, data: tuple) -> Tensor:
        return torch.exp(-loss_sample(model)(params, data))

    return prob


def eager_loss(model: nn.Module, batch: tuple, device: Any) -> Tensor:
    """LoGra / FactGraSS / DVEmb-factorized convention: ``loss(model, batch, device)``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x.to(device)), y.to(device))


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, targets)


# ------------------------------------------------------------------------ cases
def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _outputs(scores: Tensor, self_scores: Tensor | None = None, topk: Any = None) -> dict:
    out = {"scores": _np(scores)}
    if self_scores is not None:
        out["self"] = _np(self_scores.reshape(-1))
    if topk is not None:
        out["topk_helpful_indices"] = _np(topk.helpful_indices)
        out["topk_helpful_scores"] = _np(topk.helpful_scores)
        out["topk_harmful_indices"] = _np(topk.harmful_indices)
        out["topk_harmful_scores"] = _np(topk.harmful_scores)
    return out


def _inner_product(attr: Any, pb: GoldenProblem, **kw: Any) -> dict:
    """cache(train) -> attribute / self_attribute / attribute_topk (base API)."""
    train, test = pb.train_loader(), pb.test_loader()
    attr.cache(train)
    scores = attr.attribute(train, test, **kw)
    self_scores = attr.self_attribute(train, **kw)
    topk = attr.attribute_topk(train, test, TOPK, **kw)
    return _outputs(scores, self_scores, topk)


def _if_task(pb: GoldenProblem) -> Any:
    from dattri.task import AttributionTask

    model = pb.model()
    return AttributionTask(loss_func=loss_if(model), model=model, checkpoints=pb.params)


def _run_if(cls_name: str, settings: dict) -> Callable[[GoldenProblem], dict]:
    def run(pb: GoldenProblem) -> dict:
        from dattri import algorithm as A

        kw = dict(settings)
        relatif = kw.pop("relatif_method", None)
        attr = getattr(A, cls_name)(_if_task(pb), verbose=False, **kw)
        extra = {} if relatif is None else {"relatif_method": relatif}
        return _inner_product(attr, pb, **extra)

    return run


def _run_tracin(n_ckpt: int, weights: tuple, normalized: bool, proj: dict | None) -> Callable:
    def run(pb: GoldenProblem) -> dict:
        from dattri.algorithm import TracInAttributor
        from dattri.params.projection import TracInProjectionParams
        from dattri.task import AttributionTask

        model = pb.model()
        task = AttributionTask(
            loss_func=loss_sample(model), model=model, checkpoints=pb.checkpoints[:n_ckpt]
        )
        attr = TracInAttributor(
            task,
            weight_list=torch.tensor(weights, dtype=torch.float64),
            normalized_grad=normalized,
            proj_params=TracInProjectionParams(**(proj or {})),
            verbose=False,
        )
        return _inner_product(attr, pb)

    return run


def _run_trak(n_ckpt: int, proj: dict | None) -> Callable:
    def run(pb: GoldenProblem) -> dict:
        from dattri.algorithm import TRAKAttributor
        from dattri.params.projection import TRAKProjectionParams
        from dattri.task import AttributionTask

        model = pb.model()
        task = AttributionTask(
            loss_func=margin_sample(model), model=model, checkpoints=pb.checkpoints[:n_ckpt]
        )
        attr = TRAKAttributor(
            task,
            correct_probability_func=prob_sample(model),
            proj_params=TRAKProjectionParams(**(proj or {})),
            regularization=None,
            verbose=False,
        )
        train, test = pb.train_loader(), pb.test_loader()
        attr.cache(train)
        scores = attr.attribute(test)
        return _outputs(scores, attr.self_attribute(), attr.attribute_topk(None, test, TOPK))

    return run


def _run_rps(layer: str) -> Callable:
    def run(pb: GoldenProblem) -> dict:
        from dattri.algorithm import RPSAttributor
        from dattri.task import AttributionTask

        model = pb.model()
        task = AttributionTask(
            loss_func=soft_ce, model=model, checkpoints=pb.params, target_func=soft_ce
        )
        attr = RPSAttributor(task, final_linear_layer_name=layer, verbose=False)
        return _inner_product(attr, pb)

    return run


def _run_knn(k_neighbors: int) -> Callable:
    def run(pb: GoldenProblem) -> dict:
        from dattri.algorithm import KNNShapleyAttributor

        attr = KNNShapleyAttributor(k_neighbors=k_neighbors, verbose=False)
        attr.cache()
        train, test = pb.train_loader(), pb.test_loader()
        scores = attr.attribute(train, test)  # (n_test, n_train), upstream layout
        out = _outputs(
            attr.attribute_train_test(train, test),
            attr.self_attribute(train),
            attr.attribute_topk(train, test, TOPK),
        )
        out["attribute_test_train"] = _np(scores)
        return out

    return run


def _run_block(cls_name: str, settings: dict) -> Callable:
    def run(pb: GoldenProblem) -> dict:
        from dattri import algorithm as A
        from dattri.task import AttributionTask

        model = pb.model()
        task = AttributionTask(loss_func=eager_loss, model=model, checkpoints=pb.params)
        attr = getattr(A, cls_name)(task, verbose=False, **settings)
        out = _inner_product(attr, pb)
        out["compute_self_attribution"] = _np(attr.compute_self_attribution())
        return out

    return run


def _run_dvemb(factorization: str, proj: dict | None) -> Callable:
    """SGD from the stored initial MLP, recording every step with ``cache_gradients``."""

    def run(pb: GoldenProblem) -> dict:
        from dattri.algorithm import DVEmbAttributor
        from dattri.params.projection import DVEmbProjectionParams
        from dattri.task import AttributionTask

        model = pb.model(pb.init)
        model.train()
        loss = loss_sample(model) if factorization == "none" else eager_loss
        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        params = None if proj is None else DVEmbProjectionParams(**proj)
        attr = DVEmbAttributor(task, params, factorization_type=factorization, verbose=False)
        for epoch in range(pb.schedule.shape[0]):
            perm = pb.schedule[epoch]
            for s in range(0, N_TRAIN, DVEMB_BS):
                idx = perm[s : s + DVEMB_BS]
                x, y = pb.x_train[idx], pb.y_train[idx]
                attr.cache_gradients(epoch, (x, y), idx, DVEMB_LR)
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                with torch.no_grad():
                    for p in model.parameters():
                        p -= DVEMB_LR * p.grad
        attr.cache()
        test = pb.test_loader()
        out = _outputs(
            attr.attribute(test),
            attr.self_attribute(pb.train_loader()),
            attr.attribute_topk(test, TOPK),
        )
        out["scores_epoch0"] = _np(attr.attribute(test, epoch=0))
        return out

    return run


def _run_magic(settings: dict) -> Callable:
    """A short minibatch-SGD run from the stored initial MLP, replayed by MAGIC."""

    def run(pb: GoldenProblem) -> dict:
        from dattri.algorithm import MAGICAttributor
        from dattri.model_util.subset_train import SubsetTrainConfig
        from dattri.task import AttributionTask

        def factory() -> nn.Module:
            return pb.model(pb.init)

        model = factory()
        cfg = SubsetTrainConfig(dtype=torch.float64, **settings)
        task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=pb.params)
        attr = MAGICAttributor(task, factory, cfg, check_checkpoint=False, verbose=False)
        train, test = pb.train_loader(), pb.test_loader()
        attr.cache(train)
        topk = attr.attribute_topk(train, test, TOPK)
        return _outputs(attr.attribute(train, test), attr.self_attribute(train), topk)

    return run


@dataclass(frozen=True)
class Case:
    """One golden entry: which exported class, on which problem, with which settings."""

    cls_name: str
    problem: str
    settings: dict
    run: Callable[[GoldenProblem], dict]

    def settings_json(self) -> str:
        return json.dumps(
            {"class": self.cls_name, "problem": self.problem, **self.settings}, sort_keys=True
        )


def _if_case(cls_name: str, problem: str, **settings: Any) -> Case:
    return Case(cls_name, problem, settings, _run_if(cls_name, settings))


def _cases() -> dict[str, Case]:
    c: dict[str, Case] = {}
    for pb in ("lr", "mlp"):
        c[f"if_explicit_{pb}"] = _if_case("IFAttributorExplicit", pb, regularization=WD)
        c[f"if_cg_{pb}"] = _if_case("IFAttributorCG", pb, regularization=WD, max_iter=100, tol=1e-6)
        # full-batch recursion (deterministic, converges to the exact inverse) and the
        # seeded mini-batch sampler (stochastic estimate)
        for suffix, bs in (("", N_TRAIN), ("_minibatch", 20)):
            c[f"if_lissa{suffix}_{pb}"] = _if_case(
                "IFAttributorLiSSA",
                pb,
                scaling="auto",
                regularization=LISSA_REG,
                batch_size=bs,
                recursion_depth=100,
                seed=0,
            )
        c[f"if_datainf_{pb}"] = _if_case("IFAttributorDataInf", pb)
        c[f"if_ekfac_{pb}"] = _if_case("IFAttributorEKFAC", pb, damping=None)
        for norm in ("l", "theta"):
            c[f"relatif_{norm}_{pb}"] = _if_case(
                "IFAttributorExplicit", pb, regularization=WD, relatif_method=norm
            )
    # Arnoldi: all p directions on LR (= explicit), the top 30 of 83 on the MLP
    c["if_arnoldi_lr"] = _if_case(
        "IFAttributorArnoldi", "lr", regularization=WD, proj_dim=21, max_iter=21, seed=0
    )
    c["if_arnoldi_mlp"] = _if_case(
        "IFAttributorArnoldi", "mlp", regularization=WD, proj_dim=30, max_iter=83, seed=0
    )

    def tracin(pb: str, n: int, w: tuple, norm: bool, proj: dict | None) -> Case:
        settings = {
            "weights": list(w),
            "normalized_grad": norm,
            "proj_params": proj or {},
            "checkpoints": n,
        }
        return Case("TracInAttributor", pb, settings, _run_tracin(n, w, norm, proj))

    ident = {"proj_type": "identity"}
    c["grad_dot_lr"] = tracin("lr", 1, (1.0,), False, ident)
    c["grad_dot_mlp"] = tracin("mlp", 1, (1.0,), False, ident)
    c["grad_cos_mlp"] = tracin("mlp", 1, (1.0,), True, ident)
    c["tracin_mlp"] = tracin("mlp", 3, TRACIN_LRS, False, None)  # default 512-d projection
    c["tracin_identity_lr"] = tracin("lr", 3, TRACIN_LRS, False, ident)

    def trak(pb: str, n: int, proj: dict | None) -> Case:
        settings = {"checkpoints": n, "proj_params": proj or {}, "regularization": None}
        return Case("TRAKAttributor", pb, settings, _run_trak(n, proj))

    c["trak1_lr"] = trak("lr", 1, ident)
    c["trak1_mlp"] = trak("mlp", 1, None)  # default 512-d projection
    c["trak2_mlp"] = trak("mlp", 2, {"proj_dim": 32})

    c["rps_lr"] = Case("RPSAttributor", "lr", {"final_linear_layer_name": "0"}, _run_rps("0"))
    c["rps_mlp"] = Case("RPSAttributor", "mlp", {"final_linear_layer_name": "2"}, _run_rps("2"))
    c["knn_shapley_lr"] = Case("KNNShapleyAttributor", "lr", {"k_neighbors": 5}, _run_knn(5))

    def block(cls_name: str, **settings: Any) -> Case:
        return Case(cls_name, "mlp", settings, _run_block(cls_name, settings))

    c["logra_mlp"] = block("LoGraAttributor", proj_params={"proj_dim_per_layer": 16})
    c["logra_identity_mlp"] = block(
        "LoGraAttributor", proj_params={"proj_type": "identity"}, offload="none"
    )
    c["factgrass_mlp"] = block("FactGraSSAttributor", proj_params={"proj_dim_per_layer": 16})
    c["block_projected_if_mlp"] = block(
        "BlockProjectedIFAttributor",
        sparsifier_params={"proj_dim": 4},
        projector_params={"proj_dim": 8, "proj_type": "sjlt"},
    )

    def dvemb(name: str, fact: str, proj: dict | None) -> None:
        settings = {
            "factorization_type": fact,
            "proj_params": proj,
            "epochs": DVEMB_EPOCHS,
            "batch_size": DVEMB_BS,
            "lr": DVEMB_LR,
        }
        c[name] = Case("DVEmbAttributor", "mlp", settings, _run_dvemb(fact, proj))

    magic = {"epochs": 2, "lr": 0.1, "momentum": 0.9, "weight_decay": WD, "batch_size": 10}
    c["magic_mlp"] = Case("MAGICAttributor", "mlp", magic, _run_magic(magic))

    dvemb("dvemb_mlp", "none", None)
    dvemb("dvemb_kronecker_mlp", "kronecker", {"proj_dim_per_layer": 4, "proj_type": "normal"})
    return c


CASES: dict[str, Case] = _cases()

#: names in ``dattri.algorithm.__all__`` that are not attributors (no golden entry)
NOT_ATTRIBUTORS = {
    "BaseAttributor": "abstract base class",
    "BaseInnerProductAttributor": "base class (covered through the IF solvers)",
    "TopKResult": "result container of attribute_topk",
    "PerTokenTopK": "result container of attribute_per_token",
    "attribute_per_token": "a driver over an attributor's attribute on masked queries "
    "(its token scores are checked to sum to the golden-covered sequence scores in "
    "tests/test_algorithm_per_token.py)",
}
