"""Run every example script in ``--quick`` mode and execute every notebook.

Each example runs as a subprocess, as a user would run it, and must exit with code 0
and print its result; each notebook is executed top to bottom by nbclient (in a
subprocess, with a Jupyter kernel) and must raise no error and draw its plots. The
selected runs are started together, two at a time, each single-threaded
(``OMP_NUM_THREADS=1``: the workloads are tiny, and it changes no result).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))

#: example script -> (extra arguments, texts its output must contain)
EXPECTED = {
    "noisy_label_detection.py": ([], ["IF (explicit)", "TracInCP", "TRAK", "AUC"]),
    "lds_benchmark.py": (["--cache-dir", "{tmp}/cache", "--out", "{tmp}/out"], ["| if-explicit |"]),
    "data_cleaning.py": ([], ["random loss/acc", "flipped"]),
    "brittleness.py": ([], ["IF k", "random k"]),
    "custom_retraining.py": (["--retrain-dir", "{tmp}/lds"], ["IF (explicit)", "Grad-Dot"]),
    "hf_gpt2_dict_batches.py": ([], ["Grad-Cos", "DataInf", "LoGra"]),
    "proponents_opponents.py": (["--out", "{tmp}/picture.png"], ["wrote"]),
    "torchrun_attribute.py": (["--out-dir", "{tmp}/run"], ["process(es)"]),
}
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NO_TRANSFORMERS = "transformers is not installed (pip install transformers; the examples extra)"

#: executes notebook argv[1] with working directory argv[2], writes it to argv[3]
RUN_NOTEBOOK = """
import sys
import nbclient, nbformat
book = nbformat.read(sys.argv[1], as_version=4)
client = nbclient.NotebookClient(
    book, timeout=300, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}
)
try:
    client.execute()
finally:
    nbformat.write(book, sys.argv[3])
"""


def _env(tmp: Path, plots_inline: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DATTRI_BENCH_CACHE"] = str(tmp / "bench-cache")
    if plots_inline:
        env.pop("MPLBACKEND", None)  # the kernel's inline backend captures the plots
    else:
        env["MPLBACKEND"] = "Agg"
    return env


def _run(cmd: list[str], tmp: Path, plots_inline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=tmp,
        env=_env(tmp, plots_inline),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )


def _example_cmd(script: str, tmp: Path) -> list[str]:
    args = [a.format(tmp=tmp) for a in EXPECTED[script][0]]
    return [sys.executable, str(EXAMPLES / script), "--quick", *args]


def _notebook_cmd(name: str, tmp: Path) -> list[str]:
    return [sys.executable, "-c", RUN_NOTEBOOK, str(NOTEBOOKS / name), str(tmp), str(tmp / name)]


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Future, Path]]]:
    """Start the selected examples and notebooks, two at a time."""
    jobs = {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname == "test_example_quick":
            script = params["script"]
            if script != "hf_gpt2_dict_batches.py" or HAS_TRANSFORMERS:
                jobs[script] = (_example_cmd, False)
        elif item.originalname == "test_notebook_runs":
            jobs[params["notebook"]] = (_notebook_cmd, True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for name, (make_cmd, inline) in sorted(jobs.items()):
            tmp = tmp_path_factory.mktemp(name.replace(".", "_"))
            started[name] = (pool.submit(_run, make_cmd(name, tmp), tmp, inline), tmp)
        yield started


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED), "add new examples to EXPECTED (and remove deleted ones)"


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_quick(script: str, runs: dict[str, tuple[Future, Path]]) -> None:
    if script == "hf_gpt2_dict_batches.py" and not HAS_TRANSFORMERS:
        pytest.skip(NO_TRANSFORMERS)
    future, tmp = runs[script]
    proc = future.result()
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    for text in EXPECTED[script][1]:
        assert text in proc.stdout, f"{script}: {text!r} not in its output:\n{proc.stdout}"
    if script == "proponents_opponents.py":
        png = (tmp / "picture.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    if script == "lds_benchmark.py":
        assert any((tmp / "out").glob("*.json")) and any((tmp / "out").glob("*.png"))
    if script == "custom_retraining.py":
        assert (tmp / "lds" / "metadata.yml").exists()


@pytest.mark.parametrize("notebook", NOTEBOOK_NAMES)
def test_notebook_runs(notebook: str, runs: dict[str, tuple[Future, Path]]) -> None:
    missing = [m for m in ("nbclient", "nbformat", "ipykernel") if not importlib.util.find_spec(m)]
    if missing:  # CI installs them with the test extra: fail, do not skip
        pytest.fail(f"missing {missing}: install nbclient, nbformat and ipykernel")
    future, tmp = runs[notebook]
    proc = future.result()
    assert proc.returncode == 0, f"{notebook} failed:\n{proc.stderr[-5000:]}"
    book = json.loads((tmp / notebook).read_text())
    outputs = [o for cell in book["cells"] if cell["cell_type"] == "code" for o in cell["outputs"]]
    assert any(o["output_type"] == "stream" and o["name"] == "stdout" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs), "expected at least one plot"


def test_notebooks_are_committed_without_outputs() -> None:
    assert len(NOTEBOOK_NAMES) >= 2
    for name in NOTEBOOK_NAMES:
        book = json.loads((NOTEBOOKS / name).read_text())
        for cell in book["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, (
                    f"{name}: strip the outputs before committing"
                )


def test_gpt2_example_skips_cleanly_without_transformers(tmp_path: Path) -> None:
    """With ``transformers`` hidden, the example says so and exits with code 0."""
    (tmp_path / "transformers.py").write_text("raise ImportError('hidden for the test')\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "hf_gpt2_dict_batches.py"), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SKIPPED" in proc.stdout and "pip install transformers" in proc.stdout


def test_examples_reject_unavailable_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda`` without CUDA exits with a clear message (helper shared by all)."""
    import torch

    monkeypatch.syspath_prepend(str(EXAMPLES))
    common = importlib.import_module("_common")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        common.device_from("cuda")
    assert common.device_from("cpu") == torch.device("cpu")
    for script in EXPECTED:  # every example goes through it
        assert "device_from(" in (EXAMPLES / script).read_text(), script
