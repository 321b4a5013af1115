"""Run every example script in ``--quick`` mode and execute every notebook.

Each example runs as a subprocess (as a user would run it) and must exit with code 0
and print its result table; each notebook is executed top to bottom with nbclient and
must raise no error. ``OMP_NUM_THREADS=1`` keeps the tiny workloads from fighting over
cores with other processes (it does not change any result).
"""

from __future__ import annotations

import importlib.util
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

#: example script -> (extra arguments, text its output must contain)
EXPECTED = {
    "noisy_label_detection.py": ([], ["IF (explicit)", "TracInCP", "TRAK", "AUC"]),
    "lds_benchmark.py": (["--cache-dir", "{tmp}/cache", "--out", "{tmp}/out"], ["| if-explicit |"]),
    "data_cleaning.py": ([], ["random loss/acc", "flipped"]),
    "brittleness.py": ([], ["IF k", "random k"]),
    "custom_retraining.py": (["--retrain-dir", "{tmp}/lds"], ["IF (explicit)", "Grad-Dot"]),
    "hf_gpt2_dict_batches.py": ([], ["Grad-Cos", "DataInf", "LoGra"]),
    "proponents_opponents.py": (["--out", "{tmp}/picture.png"], ["wrote"]),
}
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    env["DATTRI_BENCH_CACHE"] = str(tmp_path / "bench-cache")
    return env


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED), "add new examples to EXPECTED (and remove deleted ones)"


def _run_example(script: str, tmp: Path) -> subprocess.CompletedProcess:
    args = [a.format(tmp=tmp) for a in EXPECTED[script][0]]
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", *args],
        cwd=tmp,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def example_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """Start the selected examples, two at a time (each is single-threaded)."""
    selected = {
        item.callspec.params["script"]
        for item in request.session.items
        if item.originalname == "test_example_quick"
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for script in sorted(selected):
            if script == "hf_gpt2_dict_batches.py" and not HAS_TRANSFORMERS:
                continue
            tmp = tmp_path_factory.mktemp(script.removesuffix(".py"))
            runs[script] = pool.submit(_run_example, script, tmp)
            runs[script].tmp = tmp  # type: ignore[attr-defined]
        yield runs


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_quick(script: str, example_runs: dict[str, Future]) -> None:
    if script == "hf_gpt2_dict_batches.py" and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install transformers; examples extra)")
    future = example_runs[script]
    proc, tmp = future.result(), future.tmp  # type: ignore[attr-defined]
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


def test_example_rejects_unavailable_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; the error path cannot be exercised")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "brittleness.py"), "--quick", "--device", "cuda"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "CUDA is not available" in proc.stderr


@pytest.mark.parametrize("notebook", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(notebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import nbclient
        import nbformat
    except ImportError as exc:  # CI installs them with the test extra: fail, do not skip
        pytest.fail(f"{exc}: install nbclient, nbformat and ipykernel (pip install -e '.[test]')")
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND")  # the kernel's inline backend captures the plots
    book = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on failure
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any(o.get("output_type") == "stream" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs), "expected at least one plot"


def test_notebooks_are_committed_without_outputs() -> None:
    import json

    books = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert len(books) >= 2
    for path in books:
        book = json.loads(path.read_text())
        for cell in book["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, (
                    f"{path.name}: strip outputs before committing"
                )
