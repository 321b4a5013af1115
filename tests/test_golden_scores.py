"""Golden score matrices of every attributor (issue #18: the safety net of the redesign).

Each entry of :data:`tests.golden.cases.CASES` runs one exported attributor, with the
options it is used with in the README / docs / benchmark, on a fixed tiny float64
problem whose data and parameters are stored in ``tests/data/golden/problems.npz``;
its outputs (``attribute`` scores, ``self_attribute``, ``attribute_topk`` and a few
method-specific extras) are compared with ``tests/data/golden/<entry>.npz``, written by
``tests/golden/make_golden.py`` (which also records the library commit and the settings).

Tolerance: ``max |new - golden| / max |golden| <= 1e-6`` per output. Everything is
float64, seeded (projections, LiSSA's sampler, Arnoldi's start vector) and runs a fixed
number of iterations, so a refactoring that only reorders floating-point operations
moves the scores by ~1e-15 relative (x the conditioning of the solves, <= ~1e3 here),
far below 1e-6; a real change (another damping, scaling, projection seed, iteration
count, sign, checkpoint weight, a dropped batch) moves them by >= ~1e-3. The measure
is relative to the matrix's largest entry, so near-zero entries do not make it flaky.
Top-k indices must be equal except between training samples whose golden scores tie
(within the same tolerance), where either order is accepted.

The golden values are also checked against brute-force references
(:mod:`tests.golden.reference`: explicit Hessian inverse, exact per-sample gradient
products, the exact top eigenspace) where the method has a closed form, so they are
right, not only frozen. Regenerate the files only for an intended change of the scores.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from dattri import algorithm
from tests.golden.cases import CASES, DATA_DIR, NOT_ATTRIBUTORS, PROBLEMS_FILE, load_problems
from tests.golden.reference import closed_forms, rel_err

RTOL = 1e-6
META = {"settings", "commit", "torch", "generated"}
_SIDES = ("helpful", "harmful")


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def _golden(name: str) -> dict[str, np.ndarray]:
    path = DATA_DIR / f"{name}.npz"
    assert path.exists(), f"{path} is missing: run tests/golden/make_golden.py --only {name}"
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(torch.from_numpy(actual), torch.from_numpy(expected))
    assert err <= RTOL, f"{what}: max |new - golden| / max |golden| = {err:.2e} > {RTOL:g}"


def _assert_topk(out: dict, golden: dict, name: str) -> None:
    """Top-k scores within RTOL; indices equal up to ties of the golden scores."""
    full = golden["scores"]  # (n_train, n_test)
    scale = np.abs(full).max()
    for side in _SIDES:
        idx, val = out[f"topk_{side}_indices"], out[f"topk_{side}_scores"]
        g_idx, g_val = golden[f"topk_{side}_indices"], golden[f"topk_{side}_scores"]
        assert idx.shape == g_idx.shape, f"{name}: {side} top-k shape {idx.shape}"
        _assert_close(val, g_val, f"{name} topk_{side}_scores")
        for j in range(idx.shape[0]):
            assert len(set(idx[j].tolist())) == idx.shape[1], f"{name}: repeated index"
            # a different index is only allowed where it ties with the golden one
            tie = np.abs(full[idx[j], j] - g_val[j]) <= RTOL * scale
            ok = (idx[j] == g_idx[j]) | tie
            assert ok.all(), (
                f"{name}: {side} top-k of test {j} is {idx[j].tolist()}, golden "
                f"{g_idx[j].tolist()} (not a tie)"
            )


@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_equal_golden(name, problems):
    case = CASES[name]
    golden = _golden(name)
    assert str(golden["settings"]) == case.settings_json(), (
        f"{name}: the case settings changed since the golden file was written; if the "
        "change is intended, regenerate it with tests/golden/make_golden.py --only " + name
    )
    out = case.run(problems[case.problem])
    assert set(out) == set(golden) - META, f"{name}: outputs {sorted(out)}"
    for key, val in out.items():
        if not key.startswith("topk_"):
            _assert_close(val, golden[key], f"{name} {key}")
    if "topk_helpful_indices" in out:
        _assert_topk(out, golden, name)


def test_every_exported_attributor_has_a_golden_entry():
    """A method cannot be exported from dattri.algorithm without golden scores."""
    covered = {c.cls_name for c in CASES.values()}
    missing = [n for n in algorithm.__all__ if n not in covered and n not in NOT_ATTRIBUTORS]
    assert not missing, (
        f"dattri.algorithm exports {missing} without a golden entry: add a case to "
        "tests/golden/cases.py and run tests/golden/make_golden.py --only <entry>"
    )
    assert set(NOT_ATTRIBUTORS) <= set(algorithm.__all__)
    for name in NOT_ATTRIBUTORS:  # the exempt names are bases / containers only
        obj = getattr(algorithm, name)
        assert (
            not inspect.isclass(obj)
            or inspect.isabstract(obj)
            or name
            in (
                "BaseInnerProductAttributor",
                "TopKResult",
                "PerTokenTopK",
            )
        )
    # every public entry point of each class is covered where it exists
    for name, case in CASES.items():
        cls = getattr(algorithm, case.cls_name)
        keys = set(_golden(name)) - META
        assert "scores" in keys
        if hasattr(cls, "self_attribute"):
            assert "self" in keys, f"{name}: self_attribute not covered"
        if hasattr(cls, "attribute_topk"):
            assert "topk_helpful_indices" in keys, f"{name}: attribute_topk not covered"
    # no stale golden file without a case
    files = {p.stem for p in DATA_DIR.glob("*.npz")} - {PROBLEMS_FILE.stem}
    assert files == set(CASES), f"golden files without a case: {sorted(files - set(CASES))}"


def test_golden_files_record_commit_and_settings():
    for name, case in CASES.items():
        golden = _golden(name)
        assert str(golden["commit"]), name
        assert str(golden["settings"]) == case.settings_json(), name


def test_golden_topk_is_topk_of_golden_scores():
    """The stored top-k agrees with ``torch.topk`` of the stored full matrix."""
    for name in CASES:
        golden = _golden(name)
        if "topk_helpful_indices" not in golden:
            continue
        full = torch.from_numpy(golden["scores"]).T
        k = golden["topk_helpful_indices"].shape[1]
        for side, largest in zip(_SIDES, (True, False)):
            top = torch.topk(full, k, dim=1, largest=largest).values.numpy()
            _assert_close(golden[f"topk_{side}_scores"], top, f"{name} {side}")
            picked = np.take_along_axis(full.numpy(), golden[f"topk_{side}_indices"], 1)
            _assert_close(picked, top, f"{name} {side} indices")


def test_golden_values_match_brute_force_references(problems):
    """Golden files of methods with a closed form equal the brute-force reference."""
    refs = closed_forms(problems)
    assert set(refs) <= set(CASES)
    for name, (ref, tol) in refs.items():
        golden = _golden(name)
        for key, val in ref.items():
            err = rel_err(torch.from_numpy(golden[key]), val)
            assert err <= tol, f"{name} {key}: {err:.2e} from the reference (tol {tol:g})"
