"""Bad input never gives a silently wrong score (issue #17): the probe grid as tests.

Each case runs one probe of ``benchmarks/probe_bad_input.py`` (a 4-8-3 MLP with dropout,
24 training and 6 test samples, one thing made wrong) on one attributor and asserts
the exact outcome:

* ``error``: an exception whose message matches the regex (names the cause and fix);
* ``warn``: a ``UserWarning`` matching the regex is the FIRST warning raised (warnings
  are turned into errors, so the run stops there and nothing else warned before);
* ``right``: the scores equal those of the clean problem (the probe is harmless for
  that attributor, e.g. a sum-reduced loss seen one sample at a time).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_bad_input.py"
_spec = importlib.util.spec_from_file_location("probe_bad_input", _PATH)
probe = importlib.util.module_from_spec(_spec)
sys.modules["probe_bad_input"] = probe
_spec.loader.exec_module(probe)

PROBES = {p.name: p for p in probe.PROBES}
#: attributors whose cache/HVPs use the loss of whole batches as their mean
MEAN_HVP = {"IF-CG", "IF-explicit", "LiSSA", "Arnoldi"}
#: attributors that read the training loader in cache() only (a generator is fine)
ONE_PASS = {"TRAK", "TracIn", "Grad-Dot", "Grad-Cos", "LoGra"}


def err(regex: str) -> tuple[str, str]:
    return ("error", regex)


def warn(regex: str) -> tuple[str, str]:
    return ("warn", regex)


RIGHT = ("right", "")


def expected(name: str, attr: str) -> tuple[str, str]:
    """The required outcome of probe ``name`` on attributor ``attr``."""
    if name == "loss ignores params":
        return err(r"does not depend on the params.*functional_call\(model, params")
    if name == "TRAK attribute(train, test)":
        return err(r"arguments look swapped.*\(test, train\)")
    if name == "sum-reduced loss":
        return warn(r"SUM-reduced.*reduction='mean'") if attr in MEAN_HVP else RIGHT
    if name == "train mode after load":
        if attr in ("DVEmb", "RPS"):
            return RIGHT  # DVEmb: the live model, no checkpoint; RPS sets eval mode itself
        return warn(r"train mode after loading.*model\.eval\(\)")
    if name == "huge input 1e10":
        return warn(r"Sample 10 \(row 2 of its batch\).*magnitude 1e\+10.*Normalise")
    if name == "huge input 3e37":
        return warn(r"Sample 10 \(row 2 of its batch\).*magnitude 3e\+37.*Normalise")
    if name == "label out of range":
        return err(r"row 2.*has label 5 but the model has 3 classes \(0\.\.2\)")
    if name == "test feature size":
        if attr == "KNN-Shapley":
            return err(r"test .*\(5,\).*\(4,\).*feature size")
        return err(r"test_dataloader.*\(3, 5\).*expects 4 input features")
    if name == "float labels":
        if attr == "KNN-Shapley":
            return RIGHT  # labels are only compared for equality
        if attr == "RPS":
            return err(r"labels must be integer class indices")
        return err(r"labels are floating point.*torch\.long")
    if name == "float64 inputs":
        if attr == "KNN-Shapley":
            return RIGHT  # distances only
        return err(r"data \(torch\.float64\) and the model \(torch\.float32\)")
    if name == "checkpoint not state_dict":
        return err(r"model\.pt' is not a state_dict.*checkpoints_load_func")
    if name == "loss wrong signature":
        return err(r"loss.*\(params, (data|sample)\)")
    if name == "loss (data, params)":
        return err(r"order \(data, params\).*loss_func\(params, data\)")
    if name == "generator train loader":
        return RIGHT if attr in ONE_PASS else err(r"single-pass iterator.*re-iterable")
    if name == "device=cuda without CUDA":
        return err(r"device='cuda' but CUDA is not available")
    if name == "attribute_topk k > n_train":
        return warn(r"k=29 is larger than the number of training samples \(24\)")
    if name == "LoGra proj_dim > layer size":
        return warn(r"proj_dim_per_layer=4096 exceeds .*'0': 40")
    raise AssertionError(name)


CASES = [
    pytest.param(p.name, a, id=f"{p.name}-{a}")
    for p in probe.PROBES
    for a in probe.ATTRIBUTORS
    if p.applies(a)
]
_CLEAN: dict[str, torch.Tensor] = {}


def _clean(attr: str) -> torch.Tensor:
    if attr not in _CLEAN:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CLEAN[attr] = probe._scores(probe.ATTRIBUTORS[attr](probe.base_setup()))
    return _CLEAN[attr]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_grid_covers_every_attributor_and_probe():
    assert len(CASES) >= 190
    assert {a for _, a in (c.values for c in CASES)} == set(probe.ATTRIBUTORS)


@pytest.mark.parametrize(("name", "attr"), CASES)
def test_bad_input(name, attr, monkeypatch):
    if name == "device=cuda without CUDA":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kind, regex = expected(name, attr)
    setup = PROBES[name].apply(probe.base_setup())
    run = probe.ATTRIBUTORS[attr]
    if kind == "right":
        ref = _clean(attr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = probe._scores(run(setup))
        assert got.shape == ref.shape
        tol = 100 * torch.finfo(torch.float32).eps * float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        if kind == "error":
            with pytest.raises((ValueError, TypeError)) as info:
                run(setup)
        else:
            with pytest.raises(UserWarning) as info:
                run(setup)
    assert info.match(f"(?s){regex}")


# ------------------------------------------------------------- valid uses stay quiet
def _tiny_task(loss):
    from dattri.task import AttributionTask

    model = probe.make_model().eval()
    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict()), model


def test_saturated_loss_is_not_taken_for_a_param_free_loss():
    """A loss that is exactly 0 (float32 saturation) still depends on params."""
    from torch.func import functional_call

    def loss(params, data):
        x, y = data
        logits = functional_call(model, params, (x,)) * 1e4  # margins ~1e3: CE == 0.0
        return torch.nn.functional.cross_entropy(logits, y)

    task, model = _tiny_task(loss)
    x, y = torch.randn(4, probe.D_IN), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    with torch.no_grad():
        assert float(loss(dict(model.named_parameters()), (x, y))) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.check_functions((x, y), keep_batch_dim=True, mean_batch=True)


def test_mean_loss_with_penalty_is_not_reported_as_sum():
    from torch.func import functional_call

    def loss(params, data):
        x, y = data
        ce = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        return ce + 1e-2 * sum((p**2).sum() for p in params.values())

    task, model = _tiny_task(loss)
    x, y = torch.randn(8, probe.D_IN), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.check_functions((x, y), keep_batch_dim=True, mean_batch=True)


def test_sum_loss_is_reported_for_the_mean_convention_only():
    from torch.func import functional_call

    def loss(params, data):
        x, y = data
        logits = functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    task, model = _tiny_task(loss)
    x, y = torch.randn(8, probe.D_IN), torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning, match="SUM-reduced"):
        task.check_functions((x, y), keep_batch_dim=True, mean_batch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.check_functions((x, y), keep_batch_dim=False, mean_batch=False)


def test_huge_value_scan_ignores_masks_and_names_dataset_index():
    from dattri.algorithm.runtime.validation import scan_huge_values

    mask = torch.zeros(3, 5)
    mask[1, 2] = torch.finfo(torch.float32).min  # additive attention mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not scan_huge_values({"mask": mask, "ids": torch.arange(3)}, "x", 0)
    x = torch.ones(3, 5)
    x[2, 0] = -2e9
    with pytest.warns(UserWarning, match=r"Sample 42 \(row 2 of its batch\).*2e\+09"):
        assert scan_huge_values((x,), "x", 0, torch.tensor([40, 41, 42]))


def test_trak_swapped_detected_for_another_loader_on_the_cached_dataset():
    from torch.utils.data import DataLoader, TensorDataset

    s = probe.base_setup()
    train_ds = TensorDataset(s.x_tr, s.y_tr)
    s.train_loader = DataLoader(train_ds, batch_size=8)
    from dattri.algorithm import TRAKAttributor
    from dattri.params.projection import TRAKProjectionParams

    attr = TRAKAttributor(
        probe._task(s),
        probe.prob_func(s.model),
        proj_params=TRAKProjectionParams(proj_dim=8),
        verbose=False,
    )
    attr.cache(s.train_loader)
    test = DataLoader(TensorDataset(s.x_te, s.y_te), batch_size=3)
    with pytest.raises(ValueError, match="look swapped"):
        attr.attribute(DataLoader(train_ds, batch_size=4), test)
    # the documented orders work: (test), (test, cached train), (test, other train)
    assert attr.attribute(test).shape == (probe.N_TRAIN, probe.N_TEST)
    assert attr.attribute(test, s.train_loader).shape == (probe.N_TRAIN, probe.N_TEST)
    other = DataLoader(TensorDataset(s.x_te, s.y_te), batch_size=2)
    assert attr.attribute(test, other).shape == (probe.N_TEST, probe.N_TEST)


def test_checks_work_under_no_grad():
    """Attributors are often called under torch.no_grad(); the checks still run."""
    s = probe.base_setup()
    with torch.no_grad():
        clean = probe.ATTRIBUTORS["IF-CG"](s)
    assert torch.isfinite(clean).all()
    bad = probe._p_loss_ignores_params(probe.base_setup())
    with torch.no_grad(), pytest.raises(ValueError, match="does not depend on the params"):
        probe.ATTRIBUTORS["TracIn"](bad)
