"""Bad-input probe grid: probes x attributors, each outcome classified (issue #17).

Every probe perturbs ONE thing of a tiny, valid problem (a 4-8-3 MLP with dropout,
24 training and 6 test samples) and runs an attributor on it. The outcome is

* ``right``   - the scores match the clean run (``rtol`` below), or the probe is one
  where the library may legitimately answer (e.g. a sum-reduced loss for a
  per-sample convention);
* ``clear``   - an error or warning whose message names the cause (a probe-specific
  keyword list, e.g. ``"label"`` and ``"class"`` for an out-of-range label);
* ``raw``     - an exception from torch/Python internals (message without the keywords);
* ``obscure`` - finished with wrong/non-finite scores and only unrelated warnings
  (e.g. "singular kernel" for a huge input);
* ``silent``  - finished with wrong scores and no warning at all.

Run: ``PYTHONPATH=. python benchmarks/probe_bad_input.py [--only TRAK,IF-CG] [--md out.md]``.
It prints a table (rows = probes, columns = attributors) and the counts per class.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

N_TRAIN, N_TEST, D_IN, N_CLASSES = 24, 6, 4, 3
HUGE_ROW = 10  # the training sample made huge (second batch)
RTOL = 0.05  # scores within 5 % (relative to the clean run's max) count as right


# ----------------------------------------------------------------------- problem
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, N_CLASSES))


def make_data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g)
    y = torch.randint(0, N_CLASSES, (N_TRAIN + N_TEST,), generator=g)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def loss_ok(model: nn.Module) -> Callable:
    """Mean cross-entropy; works on a batch, a ``(1, ...)`` sample and an un-batched one."""

    def loss(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def prob_func(model: nn.Module) -> Callable:
    def p(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        logits = functional_call(model, params, (x,))
        return torch.softmax(logits, -1).gather(-1, y.reshape(1)).squeeze()

    return p


@dataclass
class Setup:
    """Everything one run needs; a probe returns a modified copy."""

    model: nn.Module
    loss: Callable
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_te: torch.Tensor
    y_te: torch.Tensor
    checkpoints: Any = None
    load_func: Callable | None = None
    train_loader: Any = None
    test_loader: Any = None
    device: str = "cpu"
    trak_swapped: bool = False
    topk_k: int | None = None
    logra_dim: int = 4
    extra: dict = field(default_factory=dict)

    def loaders(self) -> tuple[Any, Any]:
        tr = self.train_loader or DataLoader(TensorDataset(self.x_tr, self.y_tr), batch_size=8)
        te = self.test_loader or DataLoader(TensorDataset(self.x_te, self.y_te), batch_size=3)
        return tr, te


def base_setup() -> Setup:
    model = make_model()
    x_tr, y_tr, x_te, y_te = make_data()
    return Setup(model, loss_ok(model), x_tr, y_tr, x_te, y_te, model.state_dict())


# ----------------------------------------------------------------- attributors
def _task(s: Setup, loss: Callable | None = None) -> Any:
    from dattri.task import AttributionTask

    return AttributionTask(
        loss_func=loss or s.loss,
        model=s.model,
        checkpoints=s.checkpoints,
        checkpoints_load_func=s.load_func,
    )


def run_if(cls_name: str, **kw: Any) -> Callable:
    def run(s: Setup) -> torch.Tensor:
        import dattri.algorithm as A

        attr = getattr(A, cls_name)(_task(s), device=s.device, verbose=False, **kw)
        tr, te = s.loaders()
        attr.cache(tr)
        if s.topk_k is not None:
            return attr.attribute_topk(tr, te, s.topk_k)
        return attr.attribute(tr, te)

    return run


def run_trak(s: Setup) -> torch.Tensor:
    from dattri.algorithm import TRAKAttributor
    from dattri.params.projection import TRAKProjectionParams

    attr = TRAKAttributor(
        _task(s),
        prob_func(s.model),
        proj_params=TRAKProjectionParams(proj_dim=16, proj_seed=0),
        device=s.device,
        verbose=False,
    )
    tr, te = s.loaders()
    attr.cache(tr)
    if s.topk_k is not None:
        return attr.attribute_topk(tr, te, s.topk_k)
    if s.trak_swapped:
        return attr.attribute(tr, te)
    return attr.attribute(te, tr)


def run_tracin(normalized: bool, proj: bool) -> Callable:
    def run(s: Setup) -> torch.Tensor:
        from dattri.algorithm import TracInAttributor
        from dattri.params.projection import TracInProjectionParams

        pp = TracInProjectionParams(proj_dim=16, proj_type="normal" if proj else "identity")
        attr = TracInAttributor(
            _task(s),
            weight_list=[1.0],
            normalized_grad=normalized,
            proj_params=pp,
            device=s.device,
            verbose=False,
        )
        tr, te = s.loaders()
        attr.cache(tr)
        if s.topk_k is not None:
            return attr.attribute_topk(tr, te, s.topk_k)
        return attr.attribute(tr, te)

    return run


def run_logra(s: Setup) -> torch.Tensor:
    from dattri.algorithm import LoGraAttributor

    attr = LoGraAttributor(
        _task(s),
        proj_params={"proj_dim_per_layer": s.logra_dim, "proj_type": "normal"},
        damping=0.1,
        device=s.device,
        verbose=False,
    )
    tr, te = s.loaders()
    attr.cache(tr)
    if s.topk_k is not None:
        return attr.attribute_topk(tr, te, s.topk_k)
    return attr.attribute(tr, te)


def run_rps(s: Setup) -> torch.Tensor:
    from dattri.algorithm import RPSAttributor

    def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    from dattri.task import AttributionTask

    task = AttributionTask(ce, s.model, s.checkpoints, checkpoints_load_func=s.load_func)
    attr = RPSAttributor(task, "3", l2_strength=0.01, epoch=200, device=s.device, verbose=False)
    tr, te = s.loaders()
    attr.cache(tr)
    if s.topk_k is not None:
        return attr.attribute_topk(tr, te, s.topk_k)
    return attr.attribute(tr, te)


def run_dvemb(s: Setup) -> torch.Tensor:
    from dattri.algorithm import DVEmbAttributor

    s.model.eval()  # DVEmb records at the live model: deterministic steps (no dropout)
    attr = DVEmbAttributor(_task(s), verbose=False)
    tr, te = s.loaders()
    start = 0
    for batch in tr:
        n = len(batch[0])
        attr.cache_gradients(0, batch, torch.arange(start, start + n), 0.1)
        start += n
    attr.cache()
    return attr.attribute(te)


def run_knn(s: Setup) -> torch.Tensor:
    from dattri.algorithm import KNNShapleyAttributor

    attr = KNNShapleyAttributor(3, device=s.device, verbose=False)
    tr, te = s.loaders()
    if s.topk_k is not None:
        return attr.attribute_topk(tr, te, s.topk_k)
    return attr.attribute_train_test(tr, te)


ATTRIBUTORS: dict[str, Callable] = {
    "IF-CG": run_if("IFAttributorCG", max_iter=50, tol=1e-8, regularization=1.0),
    "TRAK": run_trak,
    "TracIn": run_tracin(False, True),
    "EK-FAC": run_if("IFAttributorEKFAC", damping=0.1),
    "IF-explicit": run_if("IFAttributorExplicit", regularization=1.0),
    "LiSSA": run_if(
        "IFAttributorLiSSA", batch_size=8, recursion_depth=20, scaling=10.0, regularization=1.0
    ),
    "Arnoldi": run_if("IFAttributorArnoldi", proj_dim=10, max_iter=40, regularization=1.0),
    "DataInf": run_if("IFAttributorDataInf", regularization=0.1),
    "Grad-Dot": run_tracin(False, False),
    "Grad-Cos": run_tracin(True, False),
    "RPS": run_rps,
    "LoGra": run_logra,
    "DVEmb": run_dvemb,
    "KNN-Shapley": run_knn,
}
#: attributors whose loss is ``loss(params, data)`` (the task's loss probes apply)
FUNCTIONAL = {k for k in ATTRIBUTORS if k not in ("RPS", "KNN-Shapley")}
#: attributors taking the training loader at cache() and iterating it again
REITERATE = {
    "IF-CG",
    "EK-FAC",
    "IF-explicit",
    "LiSSA",
    "Arnoldi",
    "DataInf",
    "LoGra",
    "TRAK",
    "TracIn",
    "Grad-Dot",
    "Grad-Cos",
    "RPS",
}
#: attributors with a device argument
HAS_DEVICE = set(ATTRIBUTORS) - {"DVEmb"}
#: attributors with attribute_topk
HAS_TOPK = set(ATTRIBUTORS) - {"DVEmb"}
#: IF family: the loss is the mean over a batch
MEAN_LOSS = {"IF-CG", "EK-FAC", "IF-explicit", "LiSSA", "Arnoldi", "DataInf", "LoGra"}


# ---------------------------------------------------------------------- probes
@dataclass
class Probe:
    name: str
    apply: Callable[[Setup], Setup]
    keywords: tuple[str, ...]  # all must appear (case-insensitive) in a clear message
    applies: Callable[[str], bool] = lambda a: True
    #: True: finishing with the clean scores is the right answer
    right_if_clean: bool = True
    #: "error" if a clear outcome must be an exception; "warn" if a warning suffices
    clear_kind: str = "any"


def _p_loss_ignores_params(s: Setup) -> Setup:
    model = s.model

    def loss(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        return F.cross_entropy(model(x), y)

    s.loss = loss
    return s


def _p_sum_loss(s: Setup) -> Setup:
    model = s.model

    def loss(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")

    s.loss = loss
    return s


def _p_train_mode(s: Setup) -> Setup:
    def load(model: nn.Module, ckpt: Any) -> nn.Module:
        model.load_state_dict(ckpt)
        return model.train()

    s.load_func = load
    return s


def _p_huge(value: float) -> Callable[[Setup], Setup]:
    def apply(s: Setup) -> Setup:
        s.x_tr = s.x_tr.clone()
        s.x_tr[HUGE_ROW, 0] = value
        return s

    return apply


def _p_label_oob(s: Setup) -> Setup:
    s.y_tr = s.y_tr.clone()
    s.y_tr[HUGE_ROW] = N_CLASSES + 2
    return s


def _p_test_feature_size(s: Setup) -> Setup:
    s.x_te = torch.randn(N_TEST, D_IN + 1)
    return s


def _p_float_labels(s: Setup) -> Setup:
    s.y_tr = s.y_tr.float()
    s.y_te = s.y_te.float()
    return s


def _p_float64_inputs(s: Setup) -> Setup:
    s.x_tr = s.x_tr.double()
    s.x_te = s.x_te.double()
    return s


def _p_ckpt_not_state_dict(s: Setup) -> Setup:
    path = os.path.join(tempfile.mkdtemp(prefix="probe_"), "model.pt")
    torch.save(s.model, path)  # the whole module, not a state_dict
    s.checkpoints = path
    return s


def _p_loss_wrong_signature(s: Setup) -> Setup:
    model = s.model

    def loss(params: dict) -> torch.Tensor:
        return sum((p**2).sum() for p in params.values()) + 0 * model[0].weight.sum()

    s.loss = loss
    return s


def _p_loss_swapped(s: Setup) -> Setup:
    model = s.model

    def loss(data: tuple, params: dict) -> torch.Tensor:
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    s.loss = loss
    return s


def _p_generator(s: Setup) -> Setup:
    s.train_loader = ((s.x_tr[i : i + 8], s.y_tr[i : i + 8]) for i in range(0, N_TRAIN, 8))
    return s


def _p_cuda(s: Setup) -> Setup:
    s.device = "cuda"
    return s


def _p_topk(s: Setup) -> Setup:
    s.topk_k = N_TRAIN + 5
    return s


def _p_trak_swapped(s: Setup) -> Setup:
    s.trak_swapped = True
    return s


def _p_logra_dim(s: Setup) -> Setup:
    s.logra_dim = 4096
    return s


PROBES: list[Probe] = [
    Probe(
        "loss ignores params",
        _p_loss_ignores_params,
        ("params", "functional_call"),
        lambda a: a in FUNCTIONAL,
        right_if_clean=False,
        clear_kind="error",
    ),
    Probe(
        "TRAK attribute(train, test)",
        _p_trak_swapped,
        ("test_dataloader", "train"),
        lambda a: a == "TRAK",
        right_if_clean=False,
        clear_kind="error",
    ),
    Probe("sum-reduced loss", _p_sum_loss, ("sum",), lambda a: a in FUNCTIONAL),
    Probe(
        "train mode after load",
        _p_train_mode,
        ("train mode",),
        lambda a: a in FUNCTIONAL or a == "RPS",
    ),
    Probe("huge input 1e10", _p_huge(1e10), ("sample", str(HUGE_ROW))),
    Probe("huge input 3e37", _p_huge(3e37), ("sample", str(HUGE_ROW))),
    Probe(
        "label out of range",
        _p_label_oob,
        ("label",),
        right_if_clean=False,
        applies=lambda a: a not in ("KNN-Shapley", "RPS"),
    ),  # they never index by label
    Probe("test feature size", _p_test_feature_size, ("test",), right_if_clean=False),
    Probe("float labels", _p_float_labels, ("label",)),
    Probe("float64 inputs", _p_float64_inputs, ("float64", "float32")),
    Probe(
        "checkpoint not state_dict",
        _p_ckpt_not_state_dict,
        ("checkpoints_load_func",),
        lambda a: a not in ("KNN-Shapley", "DVEmb"),
        right_if_clean=False,
    ),
    Probe(
        "loss wrong signature",
        _p_loss_wrong_signature,
        ("loss", "(params,"),
        lambda a: a in FUNCTIONAL,
        right_if_clean=False,
        clear_kind="error",
    ),
    Probe(
        "loss (data, params)",
        _p_loss_swapped,
        ("loss_func", "params"),
        lambda a: a in FUNCTIONAL,
        right_if_clean=False,
        clear_kind="error",
    ),
    Probe("generator train loader", _p_generator, ("iterable",), lambda a: a in REITERATE),
    Probe(
        "device=cuda without CUDA",
        _p_cuda,
        ("device", "cuda"),
        lambda a: a in HAS_DEVICE,
        right_if_clean=False,
        clear_kind="error",
    ),
    Probe("attribute_topk k > n_train", _p_topk, ("k",), lambda a: a in HAS_TOPK),
    Probe(
        "LoGra proj_dim > layer size", _p_logra_dim, ("proj_dim_per_layer",), lambda a: a == "LoGra"
    ),
]


# -------------------------------------------------------------------- classify
@dataclass
class Outcome:
    kind: str  # right / clear / raw / obscure / silent / n/a
    detail: str


def _scores(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result.detach().double().cpu()
    # TopKResult: compare its values
    return torch.cat([result.helpful_scores, result.harmful_scores], dim=1).double().cpu()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= RTOL * scale


def _mentions(text: str, keywords: tuple[str, ...]) -> bool:
    text = text.lower()
    return all(k.lower() in text for k in keywords)


def run_one(attr: str, probe: Probe | None, clean: dict[str, Any]) -> Outcome:
    s = base_setup()
    if probe is not None:
        s = probe.apply(s)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = ATTRIBUTORS[attr](s)
        except Exception as err:
            msg = f"{type(err).__name__}: {err}"
            if probe is None:
                return Outcome("raw", msg)
            # a clear message may sit on the exception or on its cause chain
            text = msg
            if probe.keywords and _mentions(text, probe.keywords):
                return Outcome("clear", msg)
            # a warning naming the cause came just before the error
            named = [str(w.message) for w in caught if _mentions(str(w.message), probe.keywords)]
            if named:
                return Outcome("clear", f"warning: {named[0]} then {msg}")
            return Outcome("raw", msg)
    warns = [f"{w.category.__name__}: {w.message}" for w in caught]
    warns = [w for w in warns if "TracerWarning" not in w]
    if probe is None:
        clean[attr] = _scores(result)
        return Outcome("right", "; ".join(warns))
    got = _scores(result)
    ref = clean.get(attr)
    named = [w for w in warns if _mentions(w, probe.keywords)]
    if named and probe.clear_kind != "error":
        return Outcome("clear", named[0])
    if probe.right_if_clean and ref is not None and _same(got, ref):
        return Outcome("right", "; ".join(warns))
    if named:  # a warning where an error was needed: still names the cause
        return Outcome("clear", named[0])
    if ref is not None and got.shape == ref.shape and _same(got, ref):
        # finished with the clean answer though the input was invalid
        return Outcome("obscure" if warns else "silent", "clean scores for invalid input")
    rel = float("nan")
    if ref is not None and got.shape == ref.shape:
        rel = float((got - ref).abs().max() / (ref.abs().max() or 1.0))
    detail = f"max rel. diff {rel:.2g}; " + ("; ".join(warns) if warns else "no warning")
    return Outcome("obscure" if warns else "silent", detail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated attributor names")
    ap.add_argument("--probes", default=None, help="comma-separated probe-name substrings")
    ap.add_argument("--md", default=None, help="also write the table as Markdown here")
    ap.add_argument("--details", action="store_true", help="print every message")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    attrs = list(ATTRIBUTORS) if args.only is None else args.only.split(",")
    probes = PROBES
    if args.probes:
        keys = args.probes.split(",")
        probes = [p for p in PROBES if any(k in p.name for k in keys)]
    clean: dict[str, Any] = {}
    t0 = time.time()
    table: dict[str, dict[str, Outcome]] = {}
    for a in attrs:
        out = run_one(a, None, clean)
        if out.kind != "right":
            print(f"CLEAN RUN FAILED for {a}: {out.detail}", file=sys.stderr)
        elif args.details and out.detail:
            print(f"[clean] {a}: {out.detail}")
    for p in probes:
        table[p.name] = {}
        for a in attrs:
            if not p.applies(a):
                table[p.name][a] = Outcome("n/a", "")
                continue
            try:
                o = run_one(a, p, clean)
            except Exception:
                o = Outcome("raw", traceback.format_exc(limit=1))
            table[p.name][a] = o
            if args.details:
                print(f"[{p.name}] {a}: {o.kind}: {o.detail[:300]}")
    short = {
        "right": "ok",
        "clear": "CLEAR",
        "raw": "RAW",
        "obscure": "OBSC",
        "silent": "SILENT",
        "n/a": "-",
    }
    header = "| probe | " + " | ".join(attrs) + " |"
    lines = [header, "|" + "---|" * (len(attrs) + 1)]
    counts: Counter = Counter()
    for p in probes:
        cells = []
        for a in attrs:
            o = table[p.name][a]
            cells.append(short[o.kind])
            if o.kind != "n/a":
                counts[o.kind] += 1
        lines.append(f"| {p.name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    summary = ", ".join(f"{k}: {counts[k]}" for k in ("right", "clear", "raw", "obscure", "silent"))
    summary += f" (total {sum(counts.values())} runs, {time.time() - t0:.0f} s)"
    print(text)
    print()
    print(summary)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n\n" + summary + "\n\nDetails:\n\n")
            for p in probes:
                for a in attrs:
                    o = table[p.name][a]
                    if o.kind != "n/a":
                        detail = o.detail.replace("\n", " ")[:400]
                        fh.write(f"- {p.name} / {a}: **{o.kind}** {detail}\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
