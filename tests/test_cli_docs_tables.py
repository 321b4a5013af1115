"""The docs' results tables cannot go stale.

* Every results table (a Markdown table with an LDS/LOO/AUC column) in README.md and
  docs/ lies between ``BEGIN/END GENERATED TABLE`` markers, and the text between the
  markers is exactly what ``benchmarks/gen_docs_tables.py`` renders from the committed
  JSON under ``docs/data/``.
* The committed JSON is what the current code computes: the quick setting is rerun
  here (all methods, about 30 s on one core) and every number the docs print must be
  reproduced to within one unit of its last printed digit (the tables show three
  decimals, so ``|difference| < 1e-3``), with the same methods succeeding.

So a change that moves a documented number fails this test until
``python benchmarks/gen_docs_tables.py --run`` has regenerated the JSON and the tables.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from dattri.benchmark.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location(
    "gen_docs_tables", ROOT / "benchmarks/gen_docs_tables.py"
)
gen = importlib.util.module_from_spec(SPEC)
sys.modules.setdefault("gen_docs_tables", gen)  # dataclasses look their module up
SPEC.loader.exec_module(gen)

#: the tables print three decimals: a rerun must agree to one unit of the last digit
PRINTED_UNIT = 1e-3


def test_committed_tables_are_the_generators_output():
    assert gen.TABLES, "no generated tables registered"
    assert gen.update(check=True) == [], (
        "stale docs tables: run `python benchmarks/gen_docs_tables.py`"
    )
    for table in gen.TABLES:
        assert gen.committed_block(table) == gen.render(table)


def test_no_hand_typed_results_table():
    assert gen.results_tables_outside_markers() == []


def test_generator_rewrites_only_between_markers(tmp_path):
    table = gen.TABLES[0]
    (tmp_path / Path(table.doc).parent).mkdir(parents=True)
    shutil.copy(ROOT / table.doc, tmp_path / table.doc)
    data = tmp_path / "data"
    data.mkdir()
    doc = json.loads((gen.DATA / table.source).read_text())
    doc["results"][0]["lds"] = 0.123456
    (data / table.source).write_text(json.dumps(doc))
    before = (tmp_path / table.doc).read_text()
    assert gen.update(check=True, root=tmp_path, data_dir=data) == [f"{table.doc}: {table.key}"]
    assert (tmp_path / table.doc).read_text() == before  # --check writes nothing
    gen.update(root=tmp_path, data_dir=data)
    after = (tmp_path / table.doc).read_text()
    assert f"| {doc['results'][0]['method']} | 0.123 |" in after
    start = before.index(gen.BEGIN.format(key=table.key))
    assert after[:start] == before[:start]  # the hand-written text is untouched
    end = gen.END.format(key=table.key)
    assert after[after.index(end) :] == before[before.index(end) :]
    assert gen.update(check=True, root=tmp_path, data_dir=data) == []
    # a hand-typed results table outside markers is found
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n| method | LDS |\n|---|---|\n| a | 0.5 |\n")
    (tmp_path / "docs").mkdir(exist_ok=True)
    assert gen.results_tables_outside_markers(tmp_path) == ["README.md:3"]
    # broken markers are an error naming the file
    (tmp_path / table.doc).write_text(before.replace(end, ""))
    with pytest.raises(ValueError, match="choosing-a-method.md: expected one"):
        gen.update(check=True, root=tmp_path, data_dir=data)


def test_json_made_by_the_tables_command():
    for table in gen.TABLES:
        doc = json.loads((gen.DATA / table.source).read_text())
        assert doc["meta"]["command"].startswith("dattri-bench " + " ".join(table.argv) + " ")


def test_render_refuses_other_command(tmp_path):
    table = gen.TABLES[0]
    doc = json.loads((gen.DATA / table.source).read_text())
    doc["meta"]["command"] = "dattri-bench run digits-mlp --quick --out x"
    (tmp_path / table.source).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="was not made by `dattri-bench run digits-lr --quick`"):
        gen.render(table, data_dir=tmp_path)


def test_committed_json_is_what_the_code_computes(tmp_path):
    for source in sorted({t.source for t in gen.TABLES}):
        table = next(t for t in gen.TABLES if t.source == source)
        committed = json.loads((gen.DATA / source).read_text())
        out = tmp_path / source
        argv = [*table.argv, "--quiet", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
        main(argv)  # exit code 1 if a method failed: compared below, row by row
        (fresh_file,) = out.glob("*.json")
        fresh = json.loads(fresh_file.read_text())
        for key in ("n_train", "n_test", "num_params", "num_subsets", "num_loo"):
            assert fresh["meta"][key] == committed["meta"][key], key
        old = {r["method"]: r for r in committed["results"]}
        new = {r["method"]: r for r in fresh["results"]}
        assert list(new) == list(old)
        for method, row in new.items():
            assert (row["error"] is None) == (old[method]["error"] is None), method
            for key in ("lds", "lds_low", "lds_high", "loo"):
                a, b = row[key], old[method][key]
                if a is None or b is None:
                    assert a is b, (method, key)
                    continue
                assert math.isclose(a, b, rel_tol=0, abs_tol=PRINTED_UNIT), (
                    f"{source}: {method} {key} is {a:.4f} now, {b:.4f} in the committed JSON; "
                    "run `python benchmarks/gen_docs_tables.py --run`"
                )
