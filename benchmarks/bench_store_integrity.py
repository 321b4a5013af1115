"""Benchmark: cost of the feature store's integrity checks, and its fault outcomes.

``--overhead`` (default) prints four tables:

0. candidate hash functions (hashlib/zlib) over the rows of an ImageNet-sized batch
   (why SHA-256: with the CPU's SHA extensions it is the fastest 64-bit-or-more hash
   in the standard library);
1. per-sample data fingerprints (:func:`~dattri.algorithm.store.integrity.sample_hashes`)
   of realistic batches: time per batch and throughput;
2. row checksums (:func:`~dattri.algorithm.store.integrity.row_checksums`) of a
   ``(B, d)`` float32 feature block;
3. TRAK on CIFAR-shaped synthetic data (3x32x32, a small CNN, ``proj_dim`` 2048):
   ``cache`` in memory, into a new store, and reusing the complete store; the
   store's own time (``fill``: data pass, checksum verification, and for a new
   store the featurization) and the time spent fingerprinting (in a background
   thread, overlapping featurization) and checksumming (writes + verification).

``--faults`` runs the twelve store faults of issue #17 on the tiny problem of
``tests/store_worker.py`` (TRAK and TracIn) and prints each outcome (right scores,
silent wrong scores, warning, or the error's first words), so that the same script run
against an older checkout gives the "before" column. Run by hand, e.g.::

    OMP_NUM_THREADS=1 python benchmarks/bench_store_integrity.py
    OMP_NUM_THREADS=1 python benchmarks/bench_store_integrity.py --faults
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset, default_collate

ROOT = Path(__file__).resolve().parent.parent


def _median_time(fn: Callable[[], Any], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _nbytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(_nbytes(v) for v in batch.values())
    return sum(_nbytes(v) for v in batch)


def overhead(args: argparse.Namespace) -> None:
    """Print the four overhead tables."""
    import hashlib
    import zlib

    from dattri.algorithm import feature_store, store_integrity
    from dattri.algorithm.store.integrity import row_checksums, sample_hashes
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.params.projection import TRAKProjectionParams
    from dattri.task import AttributionTask

    gen = torch.Generator().manual_seed(0)
    rows = np.random.default_rng(0).standard_normal((32, 3 * 224 * 224), dtype=np.float32)
    flat = rows.view(np.uint8)
    print(
        f"\n0. Hash functions over 32 rows of {rows.shape[1] * 4 / 2**10:.0f} KB (one per sample)"
    )
    print(f"| {'function':24} | {'ms':>7} | {'MB/s':>6} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 8}|")
    candidates = {
        "sha256 (used)": lambda: [hashlib.sha256(r).digest() for r in flat],
        "blake2b (8-byte digest)": lambda: [
            hashlib.blake2b(r, digest_size=8).digest() for r in flat
        ],
        "sha1": lambda: [hashlib.sha1(r).digest() for r in flat],
        "md5": lambda: [hashlib.md5(r).digest() for r in flat],
        "zlib.crc32 (32 bits)": lambda: [zlib.crc32(r) for r in flat],
        "numpy sum (reference)": lambda: rows.sum(axis=1),
    }
    for name, fn in candidates.items():
        t = _median_time(fn)
        print(f"| {name:24} | {t * 1e3:7.2f} | {rows.nbytes / 2**20 / t:6.0f} |")

    batches = {
        "CIFAR 64x3x32x32 f32 + labels": (
            torch.randn(64, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (64,), generator=gen),
        ),
        "ImageNet 32x3x224x224 f32 + labels": (
            torch.randn(32, 3, 224, 224, generator=gen),
            torch.randint(0, 1000, (32,), generator=gen),
        ),
        "text 32x512 int64 ids/mask/labels": {
            "input_ids": torch.randint(0, 50000, (32, 512), generator=gen),
            "attention_mask": torch.ones(32, 512, dtype=torch.int64),
            "labels": torch.randint(0, 50000, (32, 512), generator=gen),
        },
        "tabular 256x32 f32 + labels": (
            torch.randn(256, 32, generator=gen),
            torch.randint(0, 10, (256,), generator=gen),
        ),
    }
    print("\n1. Data fingerprints (sample_hashes), per batch")
    print(f"| {'batch':36} | {'MB':>7} | {'ms':>7} | {'MB/s':>6} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for name, batch in batches.items():
        size = next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch[0].shape[0]
        t = _median_time(lambda b=batch, s=size: sample_hashes(b, s))
        mb = _nbytes(batch) / 2**20
        print(f"| {name:36} | {mb:7.2f} | {t * 1e3:7.2f} | {mb / t:6.0f} |")

    print("\n2. Row checksums (row_checksums) of a float32 feature block")
    print(f"| {'block':14} | {'MB':>7} | {'ms':>7} | {'MB/s':>6} |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for rows, d in ((64, 512), (64, 4096), (256, 4096), (4096, 32)):
        block = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
        t = _median_time(lambda b=block: row_checksums(b))
        mb = block.nbytes / 2**20
        print(f"| {rows:5} x {d:<6} | {mb:7.2f} | {t * 1e3:7.2f} | {mb / t:6.0f} |")

    # 3. TRAK end to end
    n, bs, proj = args.n_train, 64, args.proj_dim
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(512, 10),
    )

    def loss(params: dict, data: tuple) -> torch.Tensor:
        xi, yi = data
        logits = functional_call(model, params, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    def make(cache_dir: str | None) -> TRAKAttributor:
        return TRAKAttributor(
            AttributionTask(loss, model, model.state_dict()),
            loss,
            TRAKProjectionParams(proj_dim=proj, proj_seed=0),
            verbose=False,
            cache_dir=cache_dir,
        )

    train = DataLoader(TensorDataset(x, y), batch_size=bs)
    spent = {"sample_hashes": 0.0, "row_checksums": 0.0, "fill": 0.0}

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    feature_store.sample_hashes = timed("sample_hashes", store_integrity.sample_hashes)
    feature_store.row_checksums = timed("row_checksums", store_integrity.row_checksums)
    store_cls = feature_store.MemmapFeatureStore
    store_cls.fill = timed("fill", store_cls.fill)
    rows = []
    t0 = time.perf_counter()
    make(None).cache(train)
    rows.append(("in memory (no store)", time.perf_counter() - t0, 0.0, 0.0, 0.0))
    with tempfile.TemporaryDirectory() as folder:
        for label in ("new store (cache_dir)", "reuse complete store"):
            spent.update(sample_hashes=0.0, row_checksums=0.0, fill=0.0)
            t0 = time.perf_counter()
            make(folder).cache(train)
            total = time.perf_counter() - t0
            rows.append(
                (label, total, spent["fill"], spent["sample_hashes"], spent["row_checksums"])
            )
        store_mb = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20
    print(
        f"\n3. TRAK cache, {n} CIFAR-shaped samples, batch {bs}, small CNN "
        f"({sum(p.numel() for p in model.parameters())} params), proj_dim {proj}, "
        f"store {store_mb:.1f} MB, {torch.get_num_threads()} thread(s)"
    )
    head = f"| {'run':24} | {'cache s':>8} | {'fill s':>7} | {'fingerprints s':>14} |"
    print(f"{head} {'checksums s':>11} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 9}|{'-' * 16}|{'-' * 13}|")
    for label, total, fill, hashes, sums in rows:
        print(f"| {label:24} | {total:8.2f} | {fill:7.3f} | {hashes:14.3f} | {sums:11.3f} |")


# ------------------------------------------------------------------------ faults
def _outcome(fn: Callable[[], torch.Tensor], expected: torch.Tensor | None) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = fn()
        except Exception as err:
            return f"error {type(err).__name__}: {str(err)[:150]}"
    store_warnings = [str(w.message)[:150] for w in caught if "store" in str(w.message)]
    if expected is None:
        text = "scores, no error (features of random augmentations)"
    elif got.shape == expected.shape and torch.equal(got, expected):
        text = "right scores"
    else:
        text = "WRONG scores, no error"
    if store_warnings:
        text += f" + warning: {store_warnings[0]}"
    return text


def faults(args: argparse.Namespace) -> None:
    """Print the outcome of each store fault for TRAK and TracIn."""
    from tests import store_worker as sw

    x0, y0, x_te, y_te = sw.data()
    test = sw.loader(x_te, y_te, 3)

    def run(method: str, folder: Path, x: torch.Tensor = x0, collate: Any = None) -> torch.Tensor:
        train = sw.loader(x, y0, collate_fn=collate)
        attr = sw.make(method, folder)
        attr.cache(train)
        return sw.scores(attr, train, test)

    def damage_rows(array: str, value: float) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            arr = np.load(folder / f"{array}.npy", mmap_mode="r+")
            arr[13] = value
            arr.flush()

        return apply

    def truncate(name: str) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: len(data) - 40])

        return apply

    changed = x0.clone()
    changed[13, 2] += 1e-6
    first = x0.clone()
    first[1, 0] += 1e-6

    def noisy(samples: list) -> Any:
        xb, yb = default_collate(samples)
        return xb + 0.01 * torch.randn_like(xb), yb

    def memory(method: str, x: torch.Tensor) -> torch.Tensor:
        train = sw.loader(x, y0)
        ref = sw.make(method)
        ref.cache(train)
        return sw.scores(ref, train, test)

    for method in ("trak", "tracin"):
        expected = memory(method, x0)
        want = {"x0": expected, "changed": memory(method, changed), "first": memory(method, first)}
        with tempfile.TemporaryDirectory() as tmp:
            fresh = run(method, Path(tmp) / "fresh")
        print(f"\n{method}: fresh store equals in-memory: {torch.equal(fresh, expected)}")
        print(f"| {'fault':44} | outcome |\n|{'-' * 46}|---------|")
        # (label, damage of a complete store ("fresh": no store first), data, collate, expected)
        cases: list[tuple[str, Any, torch.Tensor, Any, str | None]] = [
            ("reuse of a complete store", None, x0, None, "x0"),
            ("data changed in batch 3 of 5 (1 sample)", None, changed, None, "changed"),
            ("data changed in batch 0", None, first, None, "first"),
            ("random augmentation in the loader", "fresh", x0, noisy, None),
            ("row 13 of features_1 zeroed", damage_rows("features_1", 0.0), x0, None, "x0"),
            ("row 13 of features_0 set to 1e30", damage_rows("features_0", 1e30), x0, None, "x0"),
            ("features_0.npy truncated", truncate("features_0.npy"), x0, None, "x0"),
            ("manifest.json truncated", truncate("manifest.json"), x0, None, "x0"),
            ("done-r0.json truncated", truncate("done-r0.json"), x0, None, "x0"),
            ("features_1.npy deleted", lambda f: (f / "features_1.npy").unlink(), x0, None, "x0"),
        ]
        for label, damage, x, collate, key in cases:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "store"
                if damage != "fresh":
                    run(method, folder)
                if callable(damage):
                    damage(folder)
                out = _outcome(
                    lambda m=method, f=folder, x=x, c=collate: run(m, f, x, c), want.get(key)
                )
                print(f"| {label:44} | {out} |")
        # kill -9 mid-cache, then resume; and data changed before a resume
        resumes = (
            ("kill -9 mid-cache, resume", "x0"),
            ("kill -9, batch 3 changed, resume", "changed"),
        )
        for label, key in resumes:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "store"
                env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.store_worker", method, str(folder)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                for line in proc.stdout:
                    if line.strip() == "loaded 8":
                        os.kill(proc.pid, signal.SIGKILL)
                        break
                proc.wait()
                progress = folder / "done-r0.json"
                state = json.loads(progress.read_text()) if progress.exists() else None
                x_resume = x0 if key == "x0" else changed
                out = _outcome(lambda m=method, f=folder, xr=x_resume: run(m, f, xr), want[key])
                print(f"| {label:44} | {out} (progress at kill: {state}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", action="store_true", help="fault outcomes instead of costs")
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--proj-dim", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.faults:
        faults(args)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
