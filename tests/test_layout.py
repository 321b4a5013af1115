"""The algorithm/ layout: phase sub-packages, few top-level files, old paths importable."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from dattri.algorithm.runtime.moved import MOVED

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("runtime", "features", "store", "solve", "score")


def test_algorithm_top_level_is_methods_and_base() -> None:
    top = sorted(p.name for p in (ROOT / "dattri" / "algorithm").glob("*.py"))
    assert len(top) <= 18, top
    for old in MOVED:
        assert f"{old}.py" not in top, f"{old}.py should live in a phase sub-package"
    for phase in PHASES:
        assert (ROOT / "dattri" / "algorithm" / phase / "__init__.py").exists()


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_internal_path_reexports_the_new_module(old: str) -> None:
    sys.modules.pop(f"dattri.algorithm.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"dattri.algorithm.{old} moved to"):
        shim = importlib.import_module(f"dattri.algorithm.{old}")
    for target in MOVED[old]:
        new = importlib.import_module(f"dattri.algorithm.{target}")
        for name in new.__all__:
            assert getattr(shim, name) is getattr(new, name), (old, name)


def test_from_import_of_an_old_path_in_a_fresh_interpreter() -> None:
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n"
        "    from dattri.algorithm.feature_store import MemmapFeatureStore\n"
        "except DeprecationWarning as w:\n"
        "    print('warned', w)\n"
        "from dattri.algorithm.store.memmap_store import MemmapFeatureStore as M\n"
        "warnings.simplefilter('ignore')\n"
        "from dattri.algorithm.feature_store import MemmapFeatureStore\n"
        "assert MemmapFeatureStore is M\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "warned dattri.algorithm.feature_store moved to" in out.stdout


def _concrete_attributors() -> list[type]:
    import dattri.algorithm as algorithm

    out = []
    for name in algorithm.__all__:
        obj = getattr(algorithm, name)
        base = inspect.isclass(obj) and issubclass(obj, algorithm.BaseAttributor)
        if base and not inspect.isabstract(obj) and obj is not algorithm.BaseInnerProductAttributor:
            out.append(obj)
    return out


#: where the shared scale options do not apply, and why (the argument is refused loudly).
NOT_APPLICABLE = {
    ("MAGICAttributor", "store_dtype"): "an exact replay: its saved states are not rounded",
}


@pytest.mark.parametrize("cls", _concrete_attributors(), ids=lambda c: c.__name__)
def test_every_attributor_offers_the_pipeline_arguments(cls: type) -> None:
    """The contract of issue #18: scale options, ``out=``, top-k and self-influence."""
    init = inspect.signature(cls.__init__).parameters
    var_kw = [p for p in init.values() if p.kind is p.VAR_KEYWORD]
    for option in ("cache_dir", "store_dtype", "max_memory"):
        if (cls.__name__, option) in NOT_APPLICABLE:
            assert option not in init and not var_kw
            continue
        assert option in init or var_kw, f"{cls.__name__} lacks {option}"
        if var_kw:  # typed as ScaleKwargs: the names are the shared ones
            assert "ScaleKwargs" in str(var_kw[0].annotation), cls.__name__
    for method in ("attribute", "attribute_topk", "self_attribute"):
        assert callable(getattr(cls, method)), (cls.__name__, method)
    assert "out" in inspect.signature(cls.attribute).parameters, cls.__name__
