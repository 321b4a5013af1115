"""Feature-store faults (issue #17): kill -9, truncated, corrupted and changed-data stores.

Each fault is applied to a TRAK and a TracIn store (``cache_dir``) of the tiny
problem of :mod:`tests.store_worker` (20 training samples in 5 batches of 4, two
checkpoints); the outcome is either the uninterrupted run's exact scores or an error
/ warning whose message names the file, rows or batch and the fix. LoGra's
``offload="disk"`` folder is never reused (rewritten by every ``cache()``), so a
stale or damaged one cannot leak into scores: checked last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from dattri.algorithm.store.memmap_store import MemmapFeatureStore
from tests import store_worker as sw

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["trak", "tracin"]


def _loaders(x=None, batch_size=sw.BATCH, collate_fn=None):
    x_tr, y_tr, x_te, y_te = sw.data()
    x_tr = x_tr if x is None else x
    return sw.loader(x_tr, y_tr, batch_size, collate_fn), sw.loader(x_te, y_te, 3)


def _count_batches(attr) -> list[int]:
    """Count the training batches the attributor featurizes (returns the counter)."""
    calls = [0]
    original = attr.featurizer.__class__.__call__

    def wrapped(self, ckpt_idx, batch, target=False, where=""):
        calls[0] += 0 if target else 1
        return original(self, ckpt_idx, batch, target, where)

    attr.featurizer.__class__ = type("Counted", (attr.featurizer.__class__,), {"__call__": wrapped})
    return calls


def _cached(method: str, folder: Path, **kw):
    train, test = _loaders()
    attr = sw.make(method, folder, **kw)
    calls = _count_batches(attr)
    attr.cache(train)
    return attr, calls, train, test


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """Scores of a fresh, uninterrupted store run and of the in-memory run, per method."""
    import tempfile

    out = {}
    for method in METHODS:
        train, test = _loaders()
        memory = sw.make(method)
        memory.cache(train)
        with tempfile.TemporaryDirectory() as folder:
            stored = sw.make(method, folder)
            stored.cache(train)
            out[method] = sw.scores(stored, train, test)
        torch.testing.assert_close(out[method], sw.scores(memory, train, test), rtol=1e-12, atol=0)
    return out


# ------------------------------------------------------------------ kill -9, resume
@pytest.mark.parametrize("method", METHODS)
def test_kill_9_mid_cache_then_resume_gives_identical_scores(method, tmp_path, reference, capsys):
    folder = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.store_worker", method, str(folder)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:  # "loaded 8": batches 1-7 (ckpt0 all, ckpt1 two) on disk
            assert line.strip() != "finished", "the worker finished before it was killed"
            if line.strip() == "loaded 8":
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    done = json.loads((folder / "done-r0.json").read_text())["done"]
    assert done["ckpt0"] == [[0, 20]]
    # killed part-way through the second checkpoint (the exact batch depends on how many
    # extra first-batch loads input validation makes): a committed prefix, not the whole set
    ((start, stop),) = done["ckpt1"]
    assert start == 0 and 0 < stop < sw.N_TRAIN and stop % sw.BATCH == 0, done
    remaining = 5 - done["ckpt1"][0][1] // sw.BATCH

    attr, calls, train, test = _cached(method, folder, verbose=True)
    assert calls[0] == remaining
    assert "Resuming the feature store in" in capsys.readouterr().err
    assert torch.equal(sw.scores(attr, train, test), reference[method])


# ---------------------------------------------------------------- reuse, changed data
@pytest.mark.parametrize("method", METHODS)
def test_complete_store_is_reused_with_a_message(method, tmp_path, reference, capsys):
    _cached(method, tmp_path, verbose=True)
    assert "feature store" not in capsys.readouterr().err  # a new store: no message
    attr, calls, train, test = _cached(method, tmp_path, verbose=True)
    assert calls[0] == 0
    assert "Reusing the feature store in" in capsys.readouterr().err
    assert torch.equal(sw.scores(attr, train, test), reference[method])
    capsys.readouterr()
    _cached(method, tmp_path, verbose=False)
    assert capsys.readouterr().err == ""  # verbose=False: silent
    # another batch size over the same samples: fingerprints are per sample
    attr = sw.make(method, tmp_path)
    calls = _count_batches(attr)
    train5, test = _loaders(batch_size=5)
    attr.cache(train5)
    assert calls[0] == 0
    assert torch.equal(sw.scores(attr, train5, test), reference[method])


@pytest.mark.parametrize("method", METHODS)
def test_data_changed_after_the_first_batch_is_refused(method, tmp_path):
    _cached(method, tmp_path)
    x = sw.data()[0].clone()
    x[13, 2] += 1e-6  # batch 3 of 5 (samples 12-15)
    train, _ = _loaders(x)
    with pytest.raises(
        ValueError, match=r"batch 3 of the loader \(samples 12-15; changed: 13\)"
    ) as e:
        sw.make(method, tmp_path).cache(train)
    assert "training data differ" in str(e.value) and f"delete {str(tmp_path)!r}" in str(e.value)


@pytest.mark.parametrize("method", METHODS)
def test_data_changed_before_a_resume_is_refused(method, tmp_path):
    train, _ = _loaders()
    attr = sw.make(method, tmp_path)
    store_fill = MemmapFeatureStore.fill

    def stop_after_ckpt0(self, unit, *args, **kwargs):
        if unit == "ckpt1":
            raise KeyboardInterrupt
        return store_fill(self, unit, *args, **kwargs)

    MemmapFeatureStore.fill = stop_after_ckpt0
    try:
        with pytest.raises(KeyboardInterrupt):
            attr.cache(train)
    finally:
        MemmapFeatureStore.fill = store_fill
    x = sw.data()[0].clone()
    x[14:16] = 0.0
    with pytest.raises(
        ValueError, match=r"batch 3 of the loader \(samples 12-15; changed: 14-15\)"
    ):
        sw.make(method, tmp_path).cache(_loaders(x)[0])


@pytest.mark.parametrize("method", METHODS)
def test_loader_with_random_augmentation_is_refused(method, tmp_path):
    def noisy(samples):
        x, y = default_collate(samples)
        return x + 0.01 * torch.randn_like(x), y

    train, _ = _loaders(collate_fn=noisy)
    with pytest.raises(ValueError, match=r"different data on two passes.*batch 0 of the loader"):
        sw.make(method, tmp_path).cache(train)


# ---------------------------------------------------------------------- corrupted rows
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("array", "value"), [("features_1", 0.0), ("features_0", 1e30)])
def test_corrupted_row_is_named_and_recomputed(method, array, value, tmp_path, reference):
    _cached(method, tmp_path)
    stored = np.load(tmp_path / f"{array}.npy", mmap_mode="r+")
    stored[13] = value
    stored.flush()
    del stored
    match = rf"{array}\.npy' rows 13 \(batches 3 of the loader\).*Recomputing them"
    with pytest.warns(UserWarning, match=match):
        attr, calls, train, test = _cached(method, tmp_path)
    assert calls[0] == 1  # only batch 3 of that checkpoint
    assert torch.equal(sw.scores(attr, train, test), reference[method])
    with warnings.catch_warnings(record=True) as caught:  # repaired: no warning, no work
        warnings.simplefilter("always")
        _, calls, _, _ = _cached(method, tmp_path)
    assert calls[0] == 0
    assert not [w for w in caught if "Feature store rows" in str(w.message)]


def test_corrupted_trak_extra_rows_and_distributed_refusal(tmp_path, reference):
    _cached("trak", tmp_path)
    stored = np.load(tmp_path / "extra_1.npy", mmap_mode="r+")
    stored[0:3] = 0.0
    stored.flush()
    del stored
    store = MemmapFeatureStore(tmp_path, json.loads((tmp_path / "manifest.json").read_text()))
    store.world_size = 2  # as under torch.distributed: rows cannot be repaired per rank
    with pytest.raises(ValueError, match=r"extra_1\.npy' rows 0-2.*Delete"):
        store.verify_unit("ckpt1")
    with pytest.warns(UserWarning, match=r"extra_1\.npy' rows 0-2 \(batches 0 of the loader\)"):
        attr, calls, train, test = _cached("trak", tmp_path)
    assert calls[0] == 1
    assert torch.equal(sw.scores(attr, train, test), reference["trak"])


# ---------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("features_0.npy", "is truncated"),
        ("_checksum_features_1.npy", "is truncated"),
        ("_data_hash.npy", "is truncated"),
        ("manifest.json", "not valid JSON"),
        ("done-r0.json", "not valid JSON"),
    ],
)
def test_truncated_file_is_named(method, name, what, tmp_path):
    _cached(method, tmp_path)
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match="damaged") as e:
        _cached(method, tmp_path)
    msg = str(e.value)
    assert repr(str(path)) in msg and what in msg
    assert f"Delete the folder {str(tmp_path)!r}" in msg and "new cache_dir" in msg


def test_npy_header_damage_and_missing_file_are_named(tmp_path):
    _cached("tracin", tmp_path)
    path = tmp_path / "features_1.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(ValueError, match=r"features_1\.npy' is damaged: its \.npy header"):
        _cached("tracin", tmp_path)
    path.unlink()  # a missing array: the store is recreated and recomputed, with a warning
    with pytest.warns(UserWarning, match=r"lacks \['features_1.npy'\]: recomputing"):
        _, calls, _, _ = _cached("tracin", tmp_path)
    assert calls[0] == 10
    (tmp_path / "done-r0.json").write_text(json.dumps({"ckpt0": [[0, 20]]}))  # format 1
    with pytest.raises(ValueError, match=r"done-r0\.json' is damaged: it is not a progress file"):
        _cached("tracin", tmp_path)


# ------------------------------------------------------------------------ LoGra
def test_logra_disk_store_is_checked_like_every_store(tmp_path):
    """LoGra's ``offload="disk"`` is the shared memmap store: damaged rows are
    recomputed (with a warning), a store written from other data is refused."""
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask

    model, _ = sw.model_and_checkpoints()

    def loss(params, data):
        from torch.func import functional_call

        x, y = data
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def make(**kw):
        task = AttributionTask(loss, model, model.state_dict())
        return LoGraAttributor(task, proj_params={"proj_dim_per_layer": 4}, verbose=False, **kw)

    train, test = _loaders()
    x = sw.data()[0].clone()
    x[13] += 1.0
    changed, _ = _loaders(x)
    make(offload="disk", cache_dir=tmp_path).cache(train)
    rows = np.load(tmp_path / "features_0.npy", mmap_mode="r+")
    rows[2] = 0.0  # damage one stored row
    rows.flush()
    del rows
    ref = make(offload="none")
    ref.cache(train)
    again = make(offload="disk", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="fail their checksums"):
        again.cache(train)
    assert torch.equal(again.attribute(train, test), ref.attribute(train, test))
    with pytest.raises(ValueError, match="training data differ"):
        make(offload="disk", cache_dir=tmp_path).cache(changed)


# ------------------------------------------------------------------ the hash helpers
def test_sample_hashes_are_per_sample_and_see_every_byte():
    from dattri.algorithm.store.integrity import format_rows, row_checksums, sample_hashes

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    names = [f"s{i}" for i in range(8)]
    whole = sample_hashes({"x": x, "y": y, "name": names}, 8)
    halves = [
        sample_hashes({"x": x[a:b], "y": y[a:b], "name": names[a:b]}, 4)
        for a, b in ((0, 4), (4, 8))
    ]
    assert np.array_equal(whole, np.concatenate(halves))  # independent of the batch size
    assert len(set(whole.tolist())) == 8
    for i, j in ((5, 0), (2, 11)):  # one byte of one value of one sample
        raw = x.clone().view(torch.uint8).reshape(8, -1)
        raw[i, j] ^= 1
        changed = sample_hashes(
            {"x": raw.view(torch.float32).reshape(8, 3, 4), "y": y, "name": names}, 8
        )
        assert np.flatnonzero(changed != whole).tolist() == [i]
    assert not np.array_equal(sample_hashes((x, y), 8), sample_hashes((x, y.float()), 8))  # dtype
    assert not np.array_equal(sample_hashes((x, y), 8), sample_hashes((y, x), 8))  # place
    bf = x.to(torch.bfloat16)
    assert sample_hashes(bf, 8).shape == (8,) and sample_hashes(x.to_sparse(), 8).shape == (8,)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    sums = row_checksums(rows)
    rows[2, 1] = 0.0
    assert np.flatnonzero(row_checksums(rows) != sums).tolist() == [2]
    assert format_rows([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_store_of_an_older_format_is_refused_by_name(tmp_path):
    MemmapFeatureStore.open(tmp_path, {"a": 1}, 4, {"f": ((2,), "float32")})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another version of dattri \\(store format 1, now 2\\)"):
        MemmapFeatureStore.open(tmp_path, {"a": 1}, 4, {"f": ((2,), "float32")})


def _cache_in_child(folder: str) -> None:
    _cached("tracin", Path(folder))


def test_fingerprint_thread_works_in_a_forked_child(tmp_path):
    """A child forked after a store was filled (torch.multiprocessing fork) must not hang."""
    import multiprocessing

    _cached("tracin", tmp_path / "parent")  # starts this process's fingerprint thread
    child = multiprocessing.get_context("fork").Process(
        target=_cache_in_child, args=(str(tmp_path / "child"),)
    )
    child.start()
    child.join(120)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert json.loads((tmp_path / "child" / "done-r0.json").read_text())["done"]["ckpt1"] == [
        [0, 20]
    ]
