"""The README and the docs: code blocks run, and the MkDocs site builds strictly.

* Every fenced ``python`` block of README.md and docs/**/*.md is executed, the blocks
  of one file in order and in one namespace (a page is one narrative), in a temporary
  working directory.
* A block preceded by the line ``<!-- not-run -->`` is not executed; such blocks are
  counted, and every non-Python code block (shell commands, configs) must carry the
  marker, so that nothing silently looks tested. Plain listings (a fence without a
  language, or ``text``) are not code.
* ``mkdocs build --strict`` must succeed (mkdocs, mkdocs-material and
  mkdocstrings[python] come with the ``docs`` extra; if they are missing the test
  fails, it does not skip), and every public name of the documented modules must have
  an entry (an HTML anchor) in the generated API reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = "<!-- not-run -->"
LISTING_LANGS = {"", "text"}
MAX_NOT_RUN_PYTHON = 2  # keep Python examples honest: almost all of them must run
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

#: API page -> modules whose ``__all__`` it must document.
API_PAGES = {
    "task": ["dattri.task"],
    "algorithm": ["dattri.algorithm"],
    "pipeline": [
        "dattri.algorithm.runtime.moved",
        "dattri.algorithm.features.representations",
        "dattri.algorithm.store.in_memory",
        "dattri.algorithm.solve.inverses",
        "dattri.algorithm.solve.block_inverse",
    ],
    "func": [
        "dattri.func.hessian",
        "dattri.func.ihvp",
        "dattri.func.fisher",
        "dattri.func.per_sample_grad",
        "dattri.func.projection",
        "dattri.func.utils",
        "dattri.func.linalg",
        "dattri.func.grad_capture",
        "dattri.func.layer_grads",
        "dattri.func.layer_projection",
        "dattri.func.batch_utils",
    ],
    "metric": ["dattri.metric"],
    "model_util": ["dattri.model_util"],
    "params": ["dattri.params.projection"],
    "benchmark": [
        "dattri.benchmark",
        "dattri.benchmark.settings",
        "dattri.benchmark.corpus_lm",
        "dattri.benchmark.generative",
        "dattri.benchmark.prepare",
        "dattri.benchmark.run",
        "dattri.benchmark.methods",
        "dattri.benchmark.cli",
        "dattri.benchmark.load",
        "dattri.benchmark.export",
        "dattri.benchmark.datasets.imagenet",
        "dattri.script.dattri_retrain",
        "dattri.benchmark.datasets",
        "dattri.benchmark.models",
    ],
}


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    not_run: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        marked = bool(before) and before[-1].strip() == NOT_RUN
        line = text.count("\n", 0, m.start()) + 1
        blocks.append(Block(path, line, m.group(1).lower(), m.group(2), marked))
    return blocks


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_extract_blocks(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "intro\n```python\na = 1\n```\n\n<!-- not-run -->\n```bash\nls\n```\n```\nlisting\n```\n"
    )
    blocks = [(b.lang, b.code, b.not_run, b.line) for b in extract_blocks(md)]
    assert blocks == [
        ("python", "a = 1\n", False, 2),
        ("bash", "ls\n", True, 7),
        ("", "listing\n", False, 10),
    ]


def test_every_code_block_runs_or_is_marked() -> None:
    """Inventory: unmarked code blocks must be Python (run below); count the rest."""
    unmarked, python_run, python_skipped, other_marked = [], 0, [], 0
    for path in DOC_FILES:
        for b in extract_blocks(path):
            if b.lang == "python":
                if b.not_run:
                    python_skipped.append(b.where)
                else:
                    python_run += 1
            elif b.lang not in LISTING_LANGS:
                if b.not_run:
                    other_marked += 1
                else:
                    unmarked.append(f"{b.where} ({b.lang})")
    print(
        f"doc code blocks: {python_run} Python blocks run, {len(python_skipped)} Python and "
        f"{other_marked} other blocks marked not-run"
    )
    assert not unmarked, (
        f"code blocks that are neither Python (executed) nor marked {NOT_RUN!r}: {unmarked}"
    )
    assert len(python_skipped) <= MAX_NOT_RUN_PYTHON, (
        f"too many Python blocks marked not-run: {python_skipped}"
    )
    assert python_run >= 10


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in extract_blocks(path) if b.lang == "python" and not b.not_run]
    if not blocks:
        return  # nothing to execute on this page (the inventory test covers it)
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATTRI_BENCH_CACHE", str(tmp_path / "bench-cache"))
    namespace: dict = {"__name__": "__docs__"}
    for b in blocks:
        try:
            exec(compile(b.code, b.where, "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"code block at {b.where} failed: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------ mkdocs
@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
        if importlib.util.find_spec(name.split(".")[0]) is None
        or (name.endswith("python") and importlib.util.find_spec(name) is None)
    ]
    if missing:
        pytest.fail(
            f"cannot build the docs, missing {missing}: install the docs extra "
            "(pip install -e '.[docs]': mkdocs, mkdocs-material, mkdocstrings[python])"
        )
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return site


def test_mkdocs_build_strict(built_site: Path) -> None:
    assert (built_site / "index.html").exists()
    for page in ("quickstart", "guide/conventions", "guide/choosing-a-method", "guide/scaling"):
        assert (built_site / page / "index.html").exists(), page


#: modules with ``__all__`` that are implementation details of a documented package
#: (their public names are not re-exported on purpose).
INTERNAL_MODULES = {
    "dattri.algorithm.runtime.loader_args": "train=/test= keywords (issue #18)",
    "dattri.algorithm.runtime.batching": "loader/batch helpers shared by the attributors",
    "dattri.algorithm.features.block_compress": "LoGra compressor internals",
    "dattri.algorithm.store.host_rows": "LoGra's offload='cpu' rows",
    "dattri.algorithm.store.layout": "the memmap store's on-disk format helpers",
    "dattri.algorithm.solve.preconditioners": "builds IFAttributorCG's preconditioner= argument",
    "dattri.algorithm.solve.mean_hvp": "influence-function base class internals",
    "dattri.algorithm.features.gradients": "TracIn/TRAK feature store",
    "dattri.algorithm.features.dvemb_grads": "DVEmb featurizer (DVEmbAttributor is documented)",
    "dattri.algorithm.features.dvemb_embeddings": "DVEmb recursion and embedding store",
    "dattri.algorithm.features.last_layer": "RPS featurizer (RPSAttributor is documented)",
    "dattri.algorithm.score.topk": "TopKAccumulator behind attribute_topk",
    "dattri.algorithm.trak": "TRAK kernel helpers (TRAKAttributor is documented)",
    "dattri.algorithm.utils": "RPS/DVEmb numerical helpers",
    "dattri.algorithm.if_lissa": "top_eigenvalue helper (IFAttributorLiSSA is documented)",
    "dattri.algorithm.block_projected_if": "DEFAULT_DAMPING / stable_inverse helpers",
    "dattri.algorithm.store.scaled": "store-backed feature collection behind TRAK/TracIn",
    "dattri.algorithm.runtime.validation": "input checks shared by the attributors (issue #17)",
    "dattri.loss_checks": "loss/data checks behind AttributionTask.check_functions",
}


def _public_modules() -> list[str]:
    import pkgutil

    import dattri

    names = []
    for info in pkgutil.walk_packages(dattri.__path__, "dattri."):
        if info.name.endswith("__main__") or info.name in INTERNAL_MODULES:
            continue
        if getattr(importlib.import_module(info.name), "__all__", None):
            names.append(info.name)
    return names


def _documented(site: Path) -> tuple[set[str], dict[str, set[int]]]:
    """Anchors of the API pages, and ``{name: ids of the objects documented as name}``."""
    anchors: set[str] = set()
    for page in API_PAGES:
        anchors |= set(
            re.findall(r'id="([\w.]+)"', (site / "api" / page / "index.html").read_text())
        )
    objects: dict[str, set[int]] = {}
    for anchor in anchors:
        prefix, _, last = anchor.rpartition(".")
        if not prefix.startswith("dattri"):
            continue
        try:
            module = importlib.import_module(prefix)
        except ImportError:  # a member of a class, not of a module
            continue
        if hasattr(module, last):
            objects.setdefault(last, set()).add(id(getattr(module, last)))
    return anchors, objects


def test_api_pages_list_their_modules() -> None:
    for page, modules in API_PAGES.items():
        text = (ROOT / "docs" / "api" / f"{page}.md").read_text()
        for module in modules:
            if module != "dattri.func.ihvp":  # an alias module, described in words
                assert f"::: {module}" in text, f"docs/api/{page}.md lacks '::: {module}'"


def test_api_reference_covers_public_names(built_site: Path) -> None:
    """Every name in the ``__all__`` of every public module has an API entry.

    A name counts as documented under its own path or when the same object is
    documented under the same name elsewhere (e.g. re-exported by its package).
    """
    anchors, objects = _documented(built_site)
    missing = []
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        for name in module.__all__:
            same = id(getattr(module, name)) in objects.get(name, set())
            if f"{module_name}.{name}" in anchors or same:
                continue
            missing.append(f"{module_name}.{name}")
    assert not missing, (
        "public names without an API entry (add them to a docs/api page, or list an "
        f"internal module in INTERNAL_MODULES): {missing}"
    )
