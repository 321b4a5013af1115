"""The README quick start runs, as written, in a fresh virtualenv set up the README's way.

The test follows the README rather than restating it:

* it creates a fresh virtualenv (``python -m venv``, no system site-packages);
* it takes the README's first install command (the ``pip install ...`` part of the
  first shell block of "Set-up", up to ``&&``) and runs it verbatim in a shell
  whose ``PATH`` starts with the virtualenv's ``bin``, from the repository root
  (the command uses the relative paths ``constraints-cpu.txt`` and ``.``); pip's
  cache is used as usual;
* it joins the README's executed ``python`` blocks (found by the extractor of
  ``tests/test_docs.py``) into one script and runs it with the virtualenv's
  interpreter in a temporary directory outside the repository.

Installing torch and the scientific stack into a new environment takes minutes, so
the test is ``slow``; ``tests/test_docs.py`` runs the same quick start in-process in
the default run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_docs import ROOT, extract_blocks

README = ROOT / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def readme_install_command(path: Path = README) -> str:
    """The first ``pip install ...`` command of the README's shell blocks.

    Args:
        path: the Markdown file to read.

    Returns:
        The command as written (the part of its line before any ``&&``).

    Raises:
        ValueError: if no shell block contains a ``pip install`` command.
    """
    for block in extract_blocks(path):
        if block.lang not in SHELL_LANGS:
            continue
        for line in block.code.splitlines():
            for part in line.split("&&"):
                command = part.strip()
                if command.startswith("pip install"):
                    return command
    raise ValueError(f"no 'pip install' command in the shell blocks of {path}")


def readme_quickstart(path: Path = README) -> str:
    """The README's executed ``python`` blocks joined into one script."""
    blocks = [b for b in extract_blocks(path) if b.lang == "python" and not b.not_run]
    if not blocks:
        raise ValueError(f"no executed python block in {path}")
    return "\n".join(b.code for b in blocks)


def test_readme_parsers(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "<!-- not-run -->\n```bash\necho hi\n```\n"
        '<!-- not-run -->\n```bash\npip install -c c.txt -e ".[a]" && run it\n```\n'
        "```python\na = 1\n```\n<!-- not-run -->\n```python\nb = 2\n```\n```python\nc = a\n```\n"
    )
    assert readme_install_command(md) == 'pip install -c c.txt -e ".[a]"'
    assert readme_quickstart(md) == "a = 1\n\nc = a\n"
    (tmp_path / "y.md").write_text("```python\nimport os\n```\n")
    with pytest.raises(ValueError, match="pip install"):
        readme_install_command(tmp_path / "y.md")


def _run(cmd: str | list[str], **kwargs: object) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
    assert proc.returncode == 0, (
        f"`{shown}` failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_quickstart_in_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    work = tmp_path / "work"  # outside the repository: the installed package must be used
    work.mkdir()
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env |= {"VIRTUAL_ENV": str(venv), "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}"}

    timings = {}
    start = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    timings["venv"] = time.perf_counter() - start

    command = readme_install_command()
    start = time.perf_counter()
    _run(command, shell=True, cwd=ROOT, env=env, timeout=1200)
    timings["install"] = time.perf_counter() - start

    # the command installed into the fresh venv: dattri is importable there, from this checkout
    where = _run([str(python), "-c", "import dattri; print(dattri.__file__)"], cwd=work, env=env)
    assert Path(where.stdout.strip()).resolve().is_relative_to(ROOT / "dattri"), where.stdout

    script = work / "quickstart.py"
    script.write_text(readme_quickstart())
    start = time.perf_counter()
    out = _run([str(python), str(script)], cwd=work, env=env, timeout=600)
    timings["quickstart"] = time.perf_counter() - start
    print("fresh-venv timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    # the quick start ends with print(scores.shape, top.helpful_indices[0]): 150 train, 50 test
    assert out.stdout.startswith("torch.Size([150, 50]) tensor(["), out.stdout
