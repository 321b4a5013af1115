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
    for other in gen.SPEED_TABLES:  # update() renders every registered table
        shutil.copy(ROOT / other.doc, tmp_path / other.doc)
    data = tmp_path / "data"
    shutil.copytree(gen.DATA, data)
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


# --------------------------------------------------------------------------- speed tables
BENCH_SPEC = importlib.util.spec_from_file_location(
    "bench_attributors", ROOT / "benchmarks/bench_attributors.py"
)
bench = importlib.util.module_from_spec(BENCH_SPEC)
BENCH_SPEC.loader.exec_module(bench)


def test_committed_speed_tables_are_the_renderers_output():
    """The speed-and-memory tables equal the renderer's output from the committed JSON.

    Unlike the LDS table, whose numbers are recomputed above, timings cannot be re-run
    in a test: ``bench_attributors.py`` takes minutes of CPU per setting and its figures
    belong to the machine that ran it. What is checked instead is that nothing between
    the markers is typed by hand (the block is exactly the rendering of
    ``docs/data/speed-*.json``) and that each JSON (with its reruns) is a complete,
    unedited run: every
    method of the script, both libraries, ``repeats`` runs per cell, and each saved
    median is the median of its saved runs.
    """
    assert gen.SPEED_TABLES, "no generated speed tables registered"
    for table in gen.SPEED_TABLES:
        assert gen.committed_block(table) == gen.render_speed(table), (
            f"stale {table.key}: run `python benchmarks/gen_docs_tables.py`"
        )
        doc = gen.speed_doc(table)  # the run, with the cells of its reruns in place
        meta = doc["meta"]
        assert meta["finished"] is not None
        assert [lib["upstream"] for lib in meta["libraries"]] == [False, True]
        labels = [lib["label"] for lib in meta["libraries"]]
        cells = {(r["method"], r["label"]): r for r in doc["results"]}
        assert set(cells) == {(m, lab) for m in bench.METHODS for lab in labels}
        for (method, label), r in cells.items():
            assert r["setting"] == table.setting
            assert len(r["runs"]) == meta["repeats"], (method, label)
            summary = bench._summary(r["runs"])
            for key in bench.MEASURES:
                assert summary.get(key) == r.get(key), (method, label, key)
        ours = [cells[m, labels[0]] for m in bench.METHODS]
        assert all("cache_cpu_s" in r for r in ours), "a method of ours failed in the run"


def test_speed_table_rewritten_between_markers(tmp_path):
    table = gen.SPEED_TABLES[0]
    (tmp_path / Path(table.doc).parent).mkdir(parents=True)
    shutil.copy(ROOT / table.doc, tmp_path / table.doc)
    for other in [*gen.TABLES, *gen.SPEED_TABLES]:
        if other.doc != table.doc:
            (tmp_path / Path(other.doc).parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / other.doc, tmp_path / other.doc)
    data = tmp_path / "data"
    shutil.copytree(gen.DATA, data)
    doc = json.loads((data / table.source).read_text())
    first = doc["results"][0]
    first.update(cache_cpu_s=1.5, attribute_cpu_s=2.25)
    (data / table.source).write_text(json.dumps(doc))
    changed = gen.update(check=True, root=tmp_path, data_dir=data)
    assert changed == [f"{table.doc}: {table.key}"]
    gen.update(root=tmp_path, data_dir=data)
    block = gen.committed_block(table, root=tmp_path)
    assert f"| {first['method']} | 1.50 + 2.25 = 3.75 |" in block
    assert gen.update(check=True, root=tmp_path, data_dir=data) == []


def test_render_speed_refuses_other_setting_and_unfinished_run(tmp_path):
    table = gen.SPEED_TABLES[0]
    doc = json.loads((gen.DATA / table.source).read_text())
    other = dict(doc, meta={**doc["meta"], "command": "python b.py --settings digits-xx"})
    (tmp_path / table.source).write_text(json.dumps(other))
    with pytest.raises(
        ValueError, match=f"not made by `bench_attributors.py --settings {table.setting}`"
    ):
        gen.render_speed(table, data_dir=tmp_path)
    unfinished = dict(doc, meta={**doc["meta"], "finished": None})
    (tmp_path / table.source).write_text(json.dumps(unfinished))
    with pytest.raises(ValueError, match="did not finish"):
        gen.render_speed(table, data_dir=tmp_path)


def test_render_speed_table_cells():
    lib = {"torch_version": "2.13.0", "python_version": "3.11"}
    meta = {
        "command": "python benchmarks/bench_attributors.py --settings s",
        "started": "t0",
        "finished": "t1",
        "machine": {"cpu": "CPU X", "cpu_count": 2},
        "threads": 1,
        "repeats": 1,
        "libraries": [
            {**lib, "label": "up", "upstream": True},
            {**lib, "label": "ours", "upstream": False},
        ],
    }
    ok = {"n_batches": 2, "n_test": 200, "p": 650, "import_s": 1.0, "peak_rss_mb": 300.4}
    results = [
        {
            **ok,
            "label": "ours",
            "method": "a",
            "setting": "s",
            "cache_cpu_s": 0.5,
            "attribute_cpu_s": 1.5,
        },
        {
            **ok,
            "label": "up",
            "method": "a",
            "setting": "s",
            "cache_cpu_s": 2.0,
            "attribute_cpu_s": 6.0,
            "peak_rss_mb": 900.0,
        },
        {
            **ok,
            "label": "ours",
            "method": "b",
            "setting": "s",
            "cache_cpu_s": 0.5,
            "attribute_cpu_s": 0.5,
        },
        {"label": "up", "method": "b", "setting": "s", "error": "ValueError: x | y"},
    ]
    out = gen.render_speed_table({"meta": meta, "results": results}, "f.json")
    assert "| a | 0.500 + 1.50 = 2.00 | 2.00 + 6.00 = 8.00 | 4.0x | 300 / 900 |  |" in out
    assert "| b | 0.500 + 0.500 = 1.00 | failed: ValueError: x / y | – | 300 / – |  |" in out
    assert "1,000 training / 200 test samples, 650 parameters" in out
    assert out.index("ours: CPU s") < out.index("up: CPU s")  # ours first
    # mixed settings in one file are refused
    results[-1]["setting"] = "t"
    with pytest.raises(ValueError, match="one setting"):
        gen.render_speed_table({"meta": meta, "results": results}, "f.json")


def test_hand_typed_speed_table_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("x\n")
    (tmp_path / "docs" / "a.md").write_text(
        "| method | ours s | upstream s | speed-up |\n|---|---|---|---|\n| cg | 1 | 9 | 9x |\n"
    )
    assert gen.results_tables_outside_markers(tmp_path) == ["docs/a.md:1"]


def test_bench_summary_is_the_median_and_keeps_errors():
    runs = [
        {
            "cache_s": 1.0,
            "attribute_s": 1.0,
            "cache_cpu_s": c,
            "attribute_cpu_s": 2.0,
            "peak_rss_mb": 10.0,
            "import_s": 1.0,
            "finite": True,
            "n_test": 200,
        }
        for c in (3.0, 1.0, 2.0)
    ]
    s = bench._summary(runs)
    assert s["cache_cpu_s"] == 2.0 and s["runs"] == runs and s["finite"]
    bad = bench._summary([runs[0], {"error": "boom"}])
    assert bad["error"] == "boom" and "cache_cpu_s" not in bad


def test_speed_rerun_replaces_cells(tmp_path):
    table = gen.SpeedTable(key="k", doc="d.md", source="a.json", setting="s", reruns=("b.json",))
    meta = {"command": "python b.py --settings s --out x", "finished": "t", "started": "t"}
    cell = {"method": "rps", "label": "up", "setting": "s"}
    (tmp_path / "a.json").write_text(
        json.dumps({"meta": meta, "results": [{**cell, "error": "old"}]})
    )
    fixed = {**cell, "cache_cpu_s": 1.0, "attribute_cpu_s": 1.0}
    (tmp_path / "b.json").write_text(json.dumps({"meta": meta, "results": [fixed]}))
    doc = gen.speed_doc(table, data_dir=tmp_path)
    assert doc["results"] == [fixed]
    assert doc["meta"]["reruns"][0]["methods"] == ["rps"]
    stray = {**fixed, "method": "trak"}
    (tmp_path / "b.json").write_text(json.dumps({"meta": meta, "results": [stray]}))
    with pytest.raises(ValueError, match="b.json: trak / up is not a cell of a.json"):
        gen.speed_doc(table, data_dir=tmp_path)
