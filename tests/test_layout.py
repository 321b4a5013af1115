"""The algorithm/ layout: phase sub-packages, few top-level files, old paths importable."""

from __future__ import annotations

import importlib
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
