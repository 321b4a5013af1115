"""The keyword form ``attribute(train=..., test=...)`` of every attributor (issue #18).

Every exported attributor is built on the stored golden problems (40 train / 10 test
samples, so a swapped pair of loaders changes the shape) and its keyword calls are
compared with its positional calls: ``attribute``, ``attribute_topk`` and
``self_attribute`` (plus KNN-Shapley's ``attribute_train_test``). The methods are
deterministic (seeded projections and samplers), so the two calls must agree to
floating-point reproducibility (``rtol=1e-12``). ``TRAKAttributor`` keeps upstream's
positional ``(test, train)`` order, so ``attribute(train=tr, test=te)`` must equal
``attribute(te, tr)``. Passing one loader both positionally (or by its upstream name)
and by role raises a ``TypeError`` naming the argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from dattri import algorithm as A
from dattri.algorithm.runtime.loader_args import loader_keywords
from dattri.task import AttributionTask
from tests.golden.cases import (
    DVEMB_BS,
    DVEMB_LR,
    NOT_ATTRIBUTORS,
    WD,
    eager_loss,
    load_problems,
    loss_if,
    loss_sample,
    margin_sample,
    prob_sample,
    soft_ce,
)

K = 3


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def _if(cls_name: str, **kw: Any) -> Callable:
    def build(pbs: dict) -> tuple:
        pb = pbs["lr"]
        model = pb.model()
        task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=pb.params)
        return getattr(A, cls_name)(task, verbose=False, **kw), pb

    return build


def _tracin(pbs: dict) -> tuple:
    from dattri.params.projection import TracInProjectionParams

    pb = pbs["lr"]
    model = pb.model()
    task = AttributionTask(loss_func=loss_sample(model), model=model, checkpoints=pb.checkpoints)
    attr = A.TracInAttributor(
        task,
        weight_list=torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64),
        normalized_grad=False,
        proj_params=TracInProjectionParams(proj_dim=8),
        verbose=False,
    )
    return attr, pb


def _trak(pbs: dict) -> tuple:
    from dattri.params.projection import TRAKProjectionParams

    pb = pbs["lr"]
    model = pb.model()
    task = AttributionTask(
        loss_func=margin_sample(model), model=model, checkpoints=pb.checkpoints[:2]
    )
    attr = A.TRAKAttributor(
        task,
        correct_probability_func=prob_sample(model),
        proj_params=TRAKProjectionParams(proj_dim=8),
        verbose=False,
    )
    return attr, pb


def _rps(pbs: dict) -> tuple:
    pb = pbs["lr"]
    model = pb.model()
    task = AttributionTask(loss_func=soft_ce, model=model, checkpoints=pb.params)
    return A.RPSAttributor(task, final_linear_layer_name="0", epoch=50, verbose=False), pb


def _knn(pbs: dict) -> tuple:
    return A.KNNShapleyAttributor(k_neighbors=3, verbose=False), pbs["lr"]


def _block(cls_name: str, **kw: Any) -> Callable:
    def build(pbs: dict) -> tuple:
        pb = pbs["mlp"]
        model = pb.model()
        task = AttributionTask(loss_func=eager_loss, model=model, checkpoints=pb.params)
        return getattr(A, cls_name)(task, verbose=False, **kw), pb

    return build


def _magic(pbs: dict) -> tuple:
    from dattri.model_util.subset_train import SubsetTrainConfig

    pb = pbs["mlp"]
    model = pb.model(pb.init)
    cfg = SubsetTrainConfig(
        dtype=torch.float64, epochs=1, lr=0.1, momentum=0.9, weight_decay=WD, batch_size=20
    )
    task = AttributionTask(loss_func=loss_if(model), model=model, checkpoints=pb.params)
    attr = A.MAGICAttributor(
        task, lambda: pb.model(pb.init), cfg, check_checkpoint=False, verbose=False
    )
    return attr, pb


BUILDERS: dict[str, Callable[[dict], tuple]] = {
    "IFAttributorExplicit": _if("IFAttributorExplicit", regularization=WD),
    "IFAttributorCG": _if("IFAttributorCG", regularization=WD, max_iter=20),
    "IFAttributorLiSSA": _if(
        "IFAttributorLiSSA", regularization=0.1, batch_size=20, recursion_depth=20, seed=0
    ),
    "IFAttributorArnoldi": _if(
        "IFAttributorArnoldi", regularization=WD, proj_dim=10, max_iter=21, seed=0
    ),
    "IFAttributorDataInf": _if("IFAttributorDataInf"),
    "IFAttributorEKFAC": _if("IFAttributorEKFAC"),
    "TracInAttributor": _tracin,
    "TRAKAttributor": _trak,
    "RPSAttributor": _rps,
    "KNNShapleyAttributor": _knn,
    "BlockProjectedIFAttributor": _block(
        "BlockProjectedIFAttributor",
        sparsifier_params={"proj_dim": 4},
        projector_params={"proj_dim": 8, "proj_type": "sjlt"},
    ),
    "LoGraAttributor": _block("LoGraAttributor", proj_params={"proj_dim_per_layer": 16}),
    "FactGraSSAttributor": _block("FactGraSSAttributor", proj_params={"proj_dim_per_layer": 16}),
    "MAGICAttributor": _magic,
}


def test_every_exported_attributor_is_covered():
    exported = set(A.__all__) - set(NOT_ATTRIBUTORS)
    assert exported == set(BUILDERS) | {"DVEmbAttributor"}  # DVEmb: its own test below


def _same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        return
    for side in ("helpful", "harmful"):  # TopKResult
        torch.testing.assert_close(getattr(a, f"{side}_scores"), getattr(b, f"{side}_scores"))
        assert torch.equal(getattr(a, f"{side}_indices"), getattr(b, f"{side}_indices"))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keyword_form_equals_positional_form(problems, name):
    attr, pb = BUILDERS[name](problems)
    tr, te = pb.train_loader(), pb.test_loader()
    attr.cache(tr)
    trak = name == "TRAKAttributor"
    positional = attr.attribute(te, tr) if trak else attr.attribute(tr, te)
    shape = (len(te.dataset), len(tr.dataset))
    if name != "KNNShapleyAttributor":  # upstream's (n_test, n_train) layout
        shape = shape[::-1]
    assert positional.shape == shape
    _same(attr.attribute(train=tr, test=te), positional)
    _same(attr.attribute(test=te, train=tr), positional)
    # one positional (in the method's own order) plus the other by role
    _same(attr.attribute(te, train=tr) if trak else attr.attribute(tr, test=te), positional)
    if trak:  # upstream's parameter names still work by keyword, in any order
        _same(attr.attribute(train_dataloader=tr, test_dataloader=te), positional)
    _same(attr.attribute_topk(train=tr, test=te, k=K), attr.attribute_topk(tr, te, K))
    _same(attr.self_attribute(train=tr), attr.self_attribute(tr))
    if name == "KNNShapleyAttributor":
        _same(attr.attribute_train_test(train=tr, test=te), positional.T)


@pytest.mark.parametrize("name", ["IFAttributorExplicit", "TRAKAttributor", "RPSAttributor"])
def test_loader_given_twice_is_a_type_error_naming_it(problems, name):
    attr, pb = BUILDERS[name](problems)
    tr, te = pb.train_loader(), pb.test_loader()
    attr.cache(tr)
    first = "test_dataloader" if name == "TRAKAttributor" else "train_dataloader"
    role = "test" if name == "TRAKAttributor" else "train"
    word = "test" if role == "test" else "training"
    with pytest.raises(TypeError, match=rf"{word} loader twice: positionally .* '{first}'"):
        attr.attribute(tr, **{role: te})
    with pytest.raises(TypeError, match=r"training loader twice: by keyword as 'train_dataloader'"):
        attr.attribute(test=te, train_dataloader=tr, train=tr)
    with pytest.raises(TypeError, match=r"training loader twice.*'train_dataloader'"):
        attr.self_attribute(tr, train=tr)
    with pytest.raises(TypeError, match=r"test loader twice.*'test_dataloader'"):
        attr.attribute_topk(tr, te, K, test=te)
    with pytest.raises(TypeError, match=r"takes no test loader, so it has no 'test='"):
        attr.self_attribute(train=tr, test=te)


def test_dvemb_keyword_forms(problems):
    pb = problems["mlp"]
    model = pb.model(pb.init)
    model.train()
    task = AttributionTask(
        loss_func=loss_sample(model), model=model, checkpoints=model.state_dict()
    )
    attr = A.DVEmbAttributor(task, verbose=False)
    perm = pb.schedule[0]
    for s in range(0, 20, DVEMB_BS):
        idx = perm[s : s + DVEMB_BS]
        x, y = pb.x_train[idx], pb.y_train[idx]
        attr.cache_gradients(0, (x, y), idx, DVEMB_LR)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= DVEMB_LR * p.grad
    attr.cache()
    tr, te = pb.train_loader(), pb.test_loader()
    positional = attr.attribute(te, 0, [1, 3])
    assert positional.shape == (2, len(te.dataset))
    _same(attr.attribute(test=te, epoch=0, train_data_indices=[1, 3]), positional)
    _same(attr.attribute(test=te), attr.attribute(te))
    _same(attr.self_attribute(train=tr), attr.self_attribute(tr))
    with pytest.raises(TypeError, match="no 'train=' keyword.*train_data_indices="):
        attr.attribute(train=tr, test=te)
    with pytest.raises(TypeError, match="test loader twice.*'test_dataloader'"):
        attr.attribute(te, test=te)


def test_signatures_show_the_role_keywords_after_upstream_parameters():
    sig = inspect.signature(A.TRAKAttributor.attribute)
    names = list(sig.parameters)
    assert names[:3] == ["self", "test_dataloader", "train_dataloader"]
    assert {"train", "test"} <= set(names)
    assert sig.parameters["train"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "train" not in inspect.signature(A.DVEmbAttributor.attribute).parameters
    assert "test" not in inspect.signature(A.TracInAttributor.self_attribute).parameters


def test_loader_keywords_on_a_plain_method_and_idempotence():
    class Toy:
        @loader_keywords
        def attribute(self, test_dataloader, train_dataloader=None, *, scale=1):
            return (test_dataloader, train_dataloader, scale)

        # a method with its own ``train`` parameter keeps it
        @loader_keywords
        def fit(self, train, train_dataloader=None):
            return (train, train_dataloader)

    toy = Toy()
    assert toy.attribute(train="tr", test="te", scale=2) == ("te", "tr", 2)
    assert toy.attribute("te") == ("te", None, 1)
    assert toy.fit(train="x") == ("x", None)
    assert loader_keywords(Toy.attribute) is Toy.attribute
    with pytest.raises(TypeError, match=r"Toy.attribute\(\) got the test loader twice"):
        toy.attribute("te", test="te")
