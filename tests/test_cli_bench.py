"""`dattri-bench` as a command: exit codes, one-line errors, saved results, messages.

A tiny variant of ``digits-lr`` (60 training samples, 6 LDS subsets) is registered
for these tests, so that every command runs in about a second.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest

import dattri
from dattri.benchmark import cli, settings
from dattri.benchmark.cli import main
from dattri.benchmark.methods import METHODS
from dattri.benchmark.run import (
    MethodReport,
    format_table,
    plot_bars,
    plot_lds_vs_time,
    read_json,
    save_results,
    write_json,
)

TINY = "tiny-digits"
RST = re.compile(r"``|::|:(func|class|meth|mod|attr|data):|`")


@pytest.fixture
def tiny(monkeypatch, tmp_path_factory):
    """Register the tiny setting; return its (shared, prepared) cache root."""
    base = settings.SETTINGS["digits-lr"]
    setting = dataclasses.replace(
        base,
        name=TINY,
        description="tiny digits LR for the CLI tests",
        load_data=settings._digits(60, 12),
        num_subsets=6,
        loo=False,
        num_ensemble=1,
        num_tracin_checkpoints=1,
        train_config=dataclasses.replace(base.train_config, epochs=60),
        quick={},
    )
    monkeypatch.setitem(settings.SETTINGS, TINY, setting)
    root = tmp_path_factory.getbasetemp() / "tiny-cache"
    return root


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _run(tiny: Path, *args: str) -> int:
    return main(["run", TINY, "--quiet", "--cache-dir", str(tiny), *args])


# ----------------------------------------------------------------- usage errors
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own action, as every CLI
        cli._parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert main(["--version"]) == 0
    assert dattri.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["run", "nope"], r"unknown setting 'nope'; choose from: digits-lr, "),
        (["prepare", "nope", "--quick"], r"unknown setting 'nope'"),
        (["run", "digits-lr", "--methods", "if-cg", "foo"], r"unknown method 'foo'; choose"),
        (["run", "digits-lr", "--methods", "foo", "bar"], r"unknown methods 'foo', 'bar'"),
        (["run", "digits-lr", "--device", "gpu0"], r"--device 'gpu0' is not a torch device"),
    ],
)
def test_unknown_names_one_line_exit_2(capsys, tmp_path, argv, pattern):
    assert main([*argv, "--cache-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(_lines(err)) == 1, err
    assert err.startswith("dattri-bench: error: ")
    assert re.search(pattern, err)
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was prepared


def test_cuda_without_cuda_is_a_usage_error(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on GPU machines
    assert main(["run", "digits-lr", "--device", "cuda", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert _lines(err) == [
        "dattri-bench: error: --device cuda: CUDA is not available on this machine; "
        "use --device cpu"
    ]


def test_unknown_option_exit_2(capsys):
    assert main(["run", "digits-lr", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main([]) == 2  # a command is required


@pytest.mark.parametrize("argv", [[], ["run"], ["prepare"], ["list"]])
def test_help_is_plain_text(capsys, argv):
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dattri-bench")
    assert not RST.search(text), RST.search(text)


# ----------------------------------------------------------------- running
def test_results_saved_by_default(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _run(tiny, "--methods", "grad-dot", "tracin") == 0
    out, err = capsys.readouterr()
    assert "| grad-dot |" in out and "| tracin |" in out
    # the last line names the folder
    last = _lines(err)[-1]
    match = re.fullmatch(r"results saved in (\S+)/ \((.*)\)", last)
    assert match, last
    folder = tmp_path / match.group(1)
    assert folder.parent == tmp_path / "dattri-bench-results"
    assert folder.name.startswith(f"{TINY}-")
    names = {f"{TINY}.json", f"{TINY}.md", f"{TINY}-lds.png", f"{TINY}-lds-vs-time.png"}
    assert {p.name for p in folder.iterdir()} == names
    assert match.group(2) == ", ".join(
        [f"{TINY}.json", f"{TINY}.md", f"{TINY}-lds.png", f"{TINY}-lds-vs-time.png"]
    )
    # strict JSON: no bare NaN/Infinity (Python's json would accept them by default)
    text = (folder / f"{TINY}.json").read_text()

    def refuse(const):
        raise AssertionError(f"non-standard JSON constant {const}")

    doc = json.loads(text, parse_constant=refuse)
    rows = {r["method"]: r for r in doc["results"]}
    assert rows["grad-dot"]["auc"] is None  # no noisy labels in this setting: null
    assert rows["grad-dot"]["loo"] is None  # no LOO ground truth
    assert -1 <= rows["tracin"]["lds"] <= 1
    meta = doc["meta"]
    assert meta["dattri_version"] == dattri.__version__
    assert meta["command"].startswith(f"dattri-bench run {TINY} ")
    assert meta["setting"] == TINY and meta["quick"] is False
    # the Markdown file is the printed table; read_json gives the reports back
    assert (folder / f"{TINY}.md").read_text().strip() == out.strip()
    setting, reports, _ = read_json(folder / f"{TINY}.json")
    assert format_table(setting, reports) == out.strip()
    _check_png(folder / f"{TINY}-lds.png")
    _check_png(folder / f"{TINY}-lds-vs-time.png")
    # a second run reuses the prepared setting (one line says so) and a new folder
    assert _run(tiny, "--methods", "grad-dot") == 0
    err = capsys.readouterr().err
    assert re.search(rf"reusing the prepared {TINY} in \S+ \(delete that folder", err)
    assert len(list((tmp_path / "dattri-bench-results").iterdir())) == 2


def test_out_and_no_save(tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _run(tiny, "--methods", "grad-dot", "--no-save") == 0
    assert "results saved" not in capsys.readouterr().err
    assert not (tmp_path / "dattri-bench-results").exists()
    assert _run(tiny, "--methods", "grad-dot", "--out", "mine") == 0
    assert f"results saved in mine/ ({TINY}.json" in capsys.readouterr().err
    assert (tmp_path / "mine" / f"{TINY}.json").is_file()


def test_failing_method_in_table_and_exit_1(tiny, capsys, monkeypatch, tmp_path):
    def boom(ctx):
        msg = "kaput | with a pipe\nand a second line"
        raise RuntimeError(msg)

    monkeypatch.setitem(METHODS, "boom", boom)
    code = _run(tiny, "--methods", "grad-dot", "boom", "--out", str(tmp_path / "o"))
    assert code == 1
    out, err = capsys.readouterr()
    table = _lines(out)
    assert table[-1] == (
        "| boom | error: RuntimeError: kaput \\| with a pipe and a second line | | | | | | |"
    )
    # every row keeps the table's 8 columns (9 unescaped separators)
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 9 for row in table[1:])
    assert _lines(err)[-1] == "dattri-bench: error: 1 of 2 method(s) failed: boom"
    assert "Traceback" not in err
    doc = json.loads((tmp_path / "o" / f"{TINY}.json").read_text())
    failed = doc["results"][1]
    assert failed["error"] == "RuntimeError: kaput | with a pipe\nand a second line"
    assert "Traceback" in failed["extra"]["traceback"]  # the full story is in the file
    assert doc["results"][0]["error"] is None


def test_resume_message_and_prepare(tiny, capsys):
    assert main(["prepare", TINY, "--cache-dir", str(tiny)]) == 0
    folder = tiny / TINY
    assert (folder / "lds_gt.pt").is_file()
    (folder / "models" / "half_0.pt").unlink()  # an interrupted preparation
    assert main(["prepare", TINY, "--cache-dir", str(tiny)]) == 0
    out, err = capsys.readouterr()
    assert re.search(rf"\[{TINY}\] resuming in \S+ \(\d+ finished file\(s\) kept\)", out)
    assert (folder / "models" / "half_0.pt").is_file()
    assert f"prepared {TINY} in {folder}" in err


def test_damaged_cache_one_line(tiny, capsys, tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", TINY, "--quiet", "--cache-dir", str(cache)]) == 0
    data = cache / TINY / "data.pt"
    data.write_bytes(data.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert _run(cache, "--methods", "grad-dot", "--no-save") == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1, err
    assert f"delete {cache / TINY} or pass another --cache-dir" in err


def test_damaged_ground_truth_and_unwritable_out(tiny, capsys, tmp_path):
    cache = tmp_path / "cache"
    assert main(["prepare", TINY, "--quiet", "--cache-dir", str(cache)]) == 0
    (cache / TINY / "lds_gt.pt").write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert _run(cache, "--methods", "grad-dot", "--no-save") == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 2, err  # the reuse note and the error
    assert f"delete {cache / TINY} or pass another --cache-dir" in _lines(err)[-1]
    shutil.rmtree(cache)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _run(cache, "--methods", "grad-dot", "--out", str(blocker / "sub")) == 1
    assert _lines(capsys.readouterr().err)[-1].startswith(
        f"dattri-bench: error: could not save the results in {blocker / 'sub'}: "
    )


def test_missing_dataset_hint_for_the_cli(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["prepare", "mnist-lr", "--cache-dir", str(tmp_path / "c"), "--data-dir", str(empty)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1, err
    assert "mnist-lr needs dataset files: MNIST files" in err
    assert str(empty) in err
    assert "--data-dir DIR" in err and "--download" in err
    assert "download=True" not in err


# ----------------------------------------------------------------- files and plots
def _check_png(path: Path) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 500
    assert img[..., :3].std() > 0.05  # not blank


def _reports() -> list[MethodReport]:
    return [
        MethodReport("a", 0.8, 0.7, 0.9, math.nan, math.nan, 0.5, 0.1, 12.0),
        MethodReport("b", 0.5, 0.4, 0.6, 0.3, math.inf, 0.0, 0.0, 1.0),
        MethodReport("broken", error="ValueError: no"),
    ]


def test_write_json_is_strict_and_round_trips(tmp_path):
    reports = _reports()
    reports[0].extra["curve"] = [1.0, math.nan]
    write_json(tmp_path / "r.json", "s", reports, {"k": math.nan})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert doc["meta"] == {"k": None}
    assert doc["results"][0]["extra"]["curve"] == [1.0, None]
    assert doc["results"][1]["auc"] is None
    setting, back, meta = read_json(tmp_path / "r.json")
    assert setting == "s" and meta == {"k": None}
    assert math.isnan(back[0].loo) and back[2].error == "ValueError: no"
    assert format_table("s", back) == format_table("s", [*reports[:1], back[1], *reports[2:]])


def test_plots_readable_with_failed_and_instant_methods(tmp_path):
    reports = _reports()  # "b" took 0.0 s (log axis floor), "broken" has no numbers
    assert plot_bars(tmp_path / "bars.png", "s", reports)
    assert plot_lds_vs_time(tmp_path / "cost.png", "s", reports)
    _check_png(tmp_path / "bars.png")
    _check_png(tmp_path / "cost.png")
    files = save_results(tmp_path / "o", "s", "s", reports)
    assert [f.name for f in files] == ["s.json", "s.md", "s-lds.png", "s-lds-vs-time.png"]


def test_without_matplotlib_the_table_is_still_saved(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    files = save_results(tmp_path, "s", "s", _reports())
    assert [f.name for f in files] == ["s.json", "s.md"]


def test_cache_default_untouched(tiny, monkeypatch, tmp_path):
    """`--cache-dir` is honoured: nothing is written to the default cache."""
    monkeypatch.setenv("DATTRI_BENCH_CACHE", str(tmp_path / "default"))
    monkeypatch.chdir(tmp_path)
    assert _run(tiny, "--methods", "knn-shapley", "--no-save") == 0
    assert not (tmp_path / "default").exists()
    shutil.rmtree(tmp_path / "dattri-bench-results", ignore_errors=True)


def test_real_process_exit_code_and_stderr(tmp_path):
    """`python -m dattri.benchmark`: the exit status and stderr a shell sees."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "dattri.benchmark", "run", "nope", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert _lines(proc.stderr) == [
        "dattri-bench: error: unknown setting 'nope'; choose from: " + ", ".join(settings.SETTINGS)
    ]


def test_prepare_api_missing_data_error(tmp_path):
    from dattri.benchmark.prepare import MissingDataError, prepare

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingDataError, match=r"^mnist-lr: MNIST files .* not found in ") as exc:
        prepare(settings.get_setting("mnist-lr"), tmp_path / "c", empty, verbose=False)
    assert str(exc.value).endswith("Pass data_dir (a folder holding the files) or download=True.")
    assert isinstance(exc.value, FileNotFoundError)


def test_trak_margin_is_the_log_odds_of_the_correct_class() -> None:
    """TRAK's model output in the benchmark: value and gradient of log(p / (1 - p))."""
    import torch
    from torch import nn

    from dattri.benchmark.methods import _margin_sample

    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x, y = torch.randn(3, dtype=torch.float64), torch.tensor(2)
    value = _margin_sample(model)(params, (x, y))
    p = torch.softmax(torch.func.functional_call(model, params, (x[None],)), dim=1)[0, 2]
    expected = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(value, expected)
    got = torch.autograd.grad(value, list(params.values()))
    want = torch.autograd.grad(expected, list(params.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
