"""A shortened `dattri-bench` run end to end (quick sizes)."""

import json

import pytest

from dattri.benchmark.cli import main
from dattri.benchmark.methods import METHODS
from dattri.benchmark.settings import SETTINGS, get_setting


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in SETTINGS:
        assert name in out
    assert "if-explicit" in out


def test_unknown_setting_and_method(tmp_path):
    with pytest.raises(ValueError, match="Unknown setting"):
        get_setting("nope")
    from dattri.benchmark.prepare import PreparedSetting  # noqa: F401
    from dattri.benchmark.run import run_benchmark

    with pytest.raises(ValueError, match="Unknown method"):
        run_benchmark(None, ["nope"])


def _quick_run(tmp_path, *args):
    """``dattri-bench run digits-lr --quick --quiet`` with a cache under ``tmp_path``."""
    cache = str(tmp_path / "cache")
    return main(["run", "digits-lr", "--quick", "--quiet", "--cache-dir", cache, *args])


def test_quick_run_end_to_end(tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    code = _quick_run(tmp_path, "--out", out_dir, "--methods", "if-explicit", "grad-dot", "trak-1")
    assert code == 0
    out = capsys.readouterr().out
    assert "| if-explicit |" in out
    result = json.loads((tmp_path / "out" / "digits-lr-quick.json").read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert set(rows) == {"if-explicit", "grad-dot", "trak-1"}
    for r in rows.values():
        assert r["error"] is None
        assert -1.0 <= r["lds"] <= 1.0
        assert r["lds_low"] <= r["lds"] <= r["lds_high"]
    # On a convex model the exact influence function predicts retraining well.
    assert rows["if-explicit"]["lds"] > 0.6
    assert rows["if-explicit"]["loo"] > 0.6
    assert (tmp_path / "out" / "digits-lr-quick-lds.png").exists()
    assert (tmp_path / "out" / "digits-lr-quick-lds-vs-time.png").exists()
    # A second run reuses the prepared cache (no retraining) and gives the same scores.
    assert _quick_run(tmp_path, "--methods", "if-explicit", "--no-save") == 0
    assert f"{rows['if-explicit']['lds']:.3f}" in capsys.readouterr().out


def test_all_methods_registered():
    assert {
        "if-explicit",
        "if-cg",
        "if-lissa",
        "if-arnoldi",
        "if-ekfac",
        "if-datainf",
        "tracin",
        "grad-dot",
        "grad-cos",
        "trak-1",
        "trak-10",
        "rps",
        "knn-shapley",
        "logra",
    } <= set(METHODS)
