"""Tests for dattri.func.projection (random projections and Arnoldi projector)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dattri.func import projection_rng as rng
from dattri.func.projection import (
    AbstractProjector,
    ArnoldiProjector,
    BasicProjector,
    ChunkedCudaProjector,
    CudaProjector,
    ProjectionType,
    arnoldi_project,
    make_random_projector,
    random_project,
)
from dattri.func.projection_engine import ProjectionEngine, parse_proj_type
from dattri.params.projection import RandomProjectionParams

CPU = torch.device("cpu")
RANDOM_TYPES = ["normal", "rademacher", "sjlt", "random_mask", "grass"]
ALL_TYPES = [*RANDOM_TYPES, "identity"]


def _data(n: int, p: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=gen, dtype=dtype)


def _pairwise_rel_error(y: torch.Tensor, x: torch.Tensor) -> float:
    dx = torch.cdist(x.double(), x.double())
    dy = torch.cdist(y.double(), y.double())
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    return ((dy[off] - dx[off]).abs() / dx[off]).mean().item()


def _explicit_matrix(engine: ProjectionEngine, ensemble_id: int = 0) -> torch.Tensor:
    """Dense (p, k) float64 matrix of a projection, built entry by entry."""
    p, k = engine.feature_dim, engine.proj_dim
    ptype = engine.proj_type
    key = rng.derive_key(engine.seed, ensemble_id, _salt(ptype))
    mat = torch.zeros(p, k, dtype=torch.float64)
    if ptype == ProjectionType.normal:
        mat = rng.normal_block(key, 0, p, k, CPU).double() / math.sqrt(k)
    elif ptype == ProjectionType.rademacher:
        mat = rng.rademacher_block(key, 0, p, k, CPU).double() / math.sqrt(k)
    elif ptype == ProjectionType.sjlt:
        c = engine.sjlt_nnz
        buckets, signs = rng.sjlt_block(key, 0, p, k, c, CPU)
        for i in range(p):
            for j in range(c):
                mat[i, buckets[j, i]] += signs[j, i].item() / math.sqrt(c)
    elif ptype == ProjectionType.random_mask:
        sel = rng.select_coordinates(key, p, k, CPU)
        for out_col, i in enumerate(sel.tolist()):
            mat[i, out_col] = 1.0
    elif ptype == ProjectionType.grass:
        m = min(p, k * engine.grass_multiplier)
        sel = rng.select_coordinates(key, p, m, CPU)
        skey = rng.derive_key(engine.seed, ensemble_id, 0x67736A6C)
        buckets, signs = rng.sjlt_block(skey, 0, m, k, 1, CPU)
        for t, i in enumerate(sel.tolist()):
            mat[i, buckets[0, t]] += signs[0, t].item()
    return mat


def _salt(ptype: ProjectionType) -> int:
    from dattri.func.projection_engine import _SALT

    return _SALT[ptype]


# --------------------------------------------------------------------- rng


def test_hash_grid_matches_python_reference():
    for seed, row0 in [(0, 0), (123456789, 10**9), (-5, 2**40)]:
        key = rng.derive_key(seed, 3, 7)
        ncols = 5
        grid = rng.hash_grid(key, row0, 4, ncols, CPU)
        for i in range(4):
            for j in range(ncols):
                ref = rng.reference_hash(key, (row0 + i) * ncols + j)
                assert grid[i, j].item() == rng._to_int64(ref)
    # scratch-buffer path gives the same bits
    work: dict = {}
    key = rng.derive_key(1)
    a = rng.hash_grid(key, 7, 300, 9, CPU, work).clone()
    assert torch.equal(a, rng.hash_grid(key, 7, 300, 9, CPU))


def test_splitmix_reference_value():
    # first output of the SplitMix64 generator seeded with 0 (Vigna's reference)
    assert rng.splitmix64(0 + 0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


def test_derive_key_deterministic_and_distinct():
    assert rng.derive_key(1, 2, 3) == rng.derive_key(1, 2, 3)
    keys = {rng.derive_key(s, e) for s in range(20) for e in range(20)}
    assert len(keys) == 400


def test_normal_table_and_reference_entries():
    table = rng.normal_table(CPU).double()
    assert table.shape == (65536,)
    assert torch.all(table[1:] >= table[:-1])
    torch.testing.assert_close(table, -table.flip(0), rtol=0, atol=0)
    assert abs(table.square().mean().item() - 1.0) < 1e-4
    assert 4.2 < table.max().item() < 4.4
    key = rng.derive_key(9)
    for k in (8, 10):
        block = rng.normal_block(key, 3, 5, k, CPU)
        words = (k + 3) // 4
        for i in range(5):
            for c in range(k):
                bits = rng.reference_hash(key, (3 + i) * words + c // 4) >> (16 * (c % 4))
                assert block[i, c].item() == table[bits & 0xFFFF].item()


def test_normal_block_statistics_and_blocks():
    key = rng.derive_key(42)
    block = rng.normal_block(key, 0, 4000, 64, CPU)
    assert block.dtype == torch.float16
    vals = block.double().flatten()
    assert abs(vals.mean().item()) < 0.01
    assert abs(vals.var().item() - 1.0) < 0.01
    assert abs((vals**4).mean().item() - 3.0) < 0.06  # Gaussian kurtosis
    # Kolmogorov-Smirnov distance to N(0, 1)
    from scipy import stats

    assert stats.kstest(vals.numpy()[:50000], "norm").statistic < 0.01
    # columns and rows are uncorrelated
    corr = torch.corrcoef(block[:, :8].double().T)
    assert (corr - torch.eye(8, dtype=torch.float64)).abs().max() < 0.06
    # any row range equals the same rows of a larger block; odd k works
    for k in (64, 65):
        full = rng.normal_block(key, 0, 300, k, CPU)
        part = rng.normal_block(key, 123, 50, k, CPU)
        assert torch.equal(part, full[123:173])
        out = torch.empty(50, k, dtype=torch.float16)
        rng.normal_block(key, 123, 50, k, CPU, out=out, work={})
        assert torch.equal(out, part)
        # wider destinations get exactly the float16 values (gathered in their dtype)
        for dt in (torch.float32, torch.float64):
            wide = torch.empty(50, k, dtype=dt)
            rng.normal_block(key, 123, 50, k, CPU, out=wide, work={})
            assert torch.equal(wide, part.to(dt))


def test_rademacher_block_statistics_and_blocks():
    key = rng.derive_key(7)
    block = rng.rademacher_block(key, 0, 2000, 100, CPU)
    assert set(block.unique().tolist()) == {-1.0, 1.0}
    assert abs(block.double().mean().item()) < 0.01
    corr = torch.corrcoef(block[:, 60:70].double().T)
    assert (corr - torch.eye(10, dtype=torch.float64)).abs().max() < 0.08
    assert torch.equal(rng.rademacher_block(key, 1000, 10, 100, CPU), block[1000:1010])


def test_sjlt_block_buckets_and_signs():
    key = rng.derive_key(3)
    buckets, signs = rng.sjlt_block(key, 0, 20000, 50, 1, CPU)
    counts = torch.bincount(buckets[0], minlength=50).double()
    assert buckets.min() >= 0
    assert buckets.max() < 50
    # chi-square test of uniform buckets (49 dof: 99.9% quantile ~ 86)
    chi2 = ((counts - 400.0) ** 2 / 400.0).sum().item()
    assert chi2 < 86
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 0.03
    # c > 1: one bucket in each contiguous group, hence distinct
    b3, _ = rng.sjlt_block(key, 5, 1000, 10, 3, CPU)
    starts = [0, 3, 6, 10]
    for j in range(3):
        assert b3[j].min() >= starts[j]
        assert b3[j].max() < starts[j + 1]
    b_full, _ = rng.sjlt_block(key, 0, 1005, 10, 3, CPU)
    assert torch.equal(b_full[:, 5:], b3)


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 22])
def test_select_coordinates_matches_bruteforce(chunk):
    key = rng.derive_key(11)
    total, count = 3000, 40
    sel = rng.select_coordinates(key, total, count, CPU, chunk=chunk)
    hashes = [rng.reference_hash(key, i) >> 1 for i in range(total)]
    expected = sorted(sorted(range(total), key=lambda i: (hashes[i], i))[:count])
    assert sel.tolist() == expected
    assert rng.select_coordinates(key, 10, 10, CPU).tolist() == list(range(10))


def test_select_coordinates_uniform():
    # each coordinate is selected with probability count / total
    hits = torch.zeros(50)
    for s in range(400):
        hits[rng.select_coordinates(rng.derive_key(s), 50, 10, CPU)] += 1
    expected = 400 * 10 / 50
    chi2 = ((hits - expected) ** 2 / expected).sum().item()
    assert chi2 < 100  # 49 dof, far above the 99.9% quantile (~86) only on a bug


# ------------------------------------------------------- projection values


@pytest.mark.parametrize("ptype", RANDOM_TYPES)
def test_projection_equals_explicit_matrix(ptype):
    p, k = 230, 24
    proj = BasicProjector(p, k, seed=5, proj_type=ptype, device="cpu")
    x = _data(6, p)
    mat = _explicit_matrix(proj.engine, ensemble_id=2)
    expected = x @ mat
    got = proj.project(x, ensemble_id=2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sjlt_multiple_nonzeros_equals_explicit_matrix():
    p, k = 150, 12
    proj = BasicProjector(p, k, seed=1, proj_type="sjlt", device="cpu", sjlt_nnz=3)
    x = _data(4, p)
    torch.testing.assert_close(
        proj.project(x, 0), x @ _explicit_matrix(proj.engine), rtol=1e-12, atol=1e-12
    )


def test_grass_with_small_mask_uses_only_selected_coordinates():
    p, k, mult = 5000, 16, 4
    proj = BasicProjector(p, k, 0, "grass", "cpu", grass_multiplier=mult)
    x = _data(3, p)
    mat = _explicit_matrix(proj.engine)
    assert int((mat.abs().sum(1) > 0).sum()) == k * mult
    torch.testing.assert_close(proj.project(x, 0), x @ mat, rtol=1e-12, atol=1e-12)
    # "grass_N" sets the multiplier
    proj8 = BasicProjector(p, k, 0, "grass_8", "cpu")
    assert proj8.engine.grass_multiplier == 8
    assert int((_explicit_matrix(proj8.engine).abs().sum(1) > 0).sum()) == 8 * k


@pytest.mark.parametrize(
    ("ptype", "bound"),
    [("normal", 0.05), ("rademacher", 0.05), ("sjlt", 0.2), ("grass", 0.2)],
)
def test_jl_distance_preservation(ptype, bound):
    x = _data(40, 1000, seed=3)
    for seed in (0, 1):
        proj = BasicProjector(1000, 512, seed, ptype, "cpu")
        y = proj.project(x, 0)
        assert _pairwise_rel_error(y, x) < bound


@pytest.mark.parametrize("ptype", ["normal", "rademacher", "sjlt"])
def test_norm_unbiased_over_ensemble(ptype):
    # E ||P x||^2 = ||x||^2: catches a wrong 1/sqrt(k) or 1/sqrt(c) scaling
    x = _data(8, 300, seed=1)
    ratios = []
    proj = BasicProjector(300, 64, 0, ptype, "cpu", sjlt_nnz=2 if ptype == "sjlt" else 1)
    for eid in range(60):
        y = proj.project(x, eid)
        ratios.append((y.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).mean().item())
    # sd of the mean ~ sqrt(2 / 64 / 8 / 60) ~ 0.008
    assert abs(np.mean(ratios) - 1.0) < 0.04


def test_random_mask_no_rescale_and_sorted():
    x = _data(5, 1000)
    proj = BasicProjector(1000, 512, 0, "random_mask", "cpu")
    y = proj.project(x, 0)
    sel = proj.engine._state(0).selected
    assert torch.equal(y, x[:, sel])
    assert torch.all(sel[1:] > sel[:-1])
    # upstream bound on distances for an unrescaled mask
    assert _pairwise_rel_error(y, x) < 0.5


def test_identity_exact():
    x = _data(4, 50)
    proj = BasicProjector(50, 50, 0, "identity", "cpu")
    assert torch.equal(proj.project(x, 0), x)
    parts = {"a": x[:, :20].reshape(4, 4, 5), "b": x[:, 20:]}
    assert torch.equal(proj.project(parts, 3), x)
    half = x.half()
    assert proj.project(half, 0).dtype == torch.float16


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("ptype", RANDOM_TYPES)
def test_determinism_calls_batches_dicts(ptype):
    p, k = 700, 40
    x = _data(9, p, seed=2)
    proj = BasicProjector(p, k, 17, ptype, "cpu")
    y = proj.project(x, 1)
    assert torch.equal(proj.project(x, 1), y)
    assert torch.equal(BasicProjector(p, k, 17, ptype, "cpu").project(x, 1), y)
    for lo, hi in [(0, 1), (2, 7), (8, 9)]:
        torch.testing.assert_close(proj.project(x[lo:hi], 1), y[lo:hi], rtol=1e-12, atol=1e-12)
    parts = {
        "w": x[:, :300].reshape(9, 30, 10),
        "b": x[:, 300:310],
        "v": x[:, 310:].t().contiguous().t(),  # non-contiguous block
    }
    torch.testing.assert_close(proj.project(parts, 1), y, rtol=1e-12, atol=1e-12)
    # other seeds / ensemble ids give other projections
    assert not torch.allclose(proj.project(x, 2), y)
    assert not torch.allclose(BasicProjector(p, k, 18, ptype, "cpu").project(x, 1), y)


@pytest.mark.parametrize("ptype", RANDOM_TYPES)
def test_cache_budget_and_chunking_do_not_change_result(ptype):
    p, k = 900, 32
    x = _data(5, p, seed=4)
    ref = ProjectionEngine(p, k, ptype, 3, "cpu").project(x, 0)
    for budget, chunk in [(0, 4096), (p * k, 2048), (10**9, 1000)]:
        eng = ProjectionEngine(p, k, ptype, 3, "cpu", max_memory_bytes=budget, chunk_bytes=chunk)
        torch.testing.assert_close(eng.project(x, 0), ref, rtol=1e-12, atol=1e-12)
        if ptype in ("normal", "rademacher"):
            assert eng.cached_bytes() <= budget
    eng = ProjectionEngine(p, k, ptype, 3, "cpu", max_batch_size=2)
    torch.testing.assert_close(eng.project(x, 0), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ptype", ["normal", "rademacher"])
def test_dense_cache_widened_to_working_dtype_when_it_fits(ptype):
    p, k = 700, 24
    x = _data(6, p, seed=2).float()
    ref = ProjectionEngine(p, k, ptype, 1, "cpu", max_memory_bytes=0).project(x, 0)
    half = ProjectionEngine(p, k, ptype, 1, "cpu", max_memory_bytes=p * k * 2)
    wide = ProjectionEngine(p, k, ptype, 1, "cpu", max_memory_bytes=p * k * 4)
    y_half, y_wide = half.project(x, 0), wide.project(x, 0)
    # float16 table kept (float32 does not fit); widened to float32 once (fits)
    assert half._states[0].cache.dtype == torch.float16
    assert wide._states[0].cache.dtype == torch.float32
    assert wide.cached_bytes() == p * k * 4 <= wide.max_memory_bytes
    # the float16 values are exact in float32: all three give the same features
    torch.testing.assert_close(y_half, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_wide, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(wide.project(x, 0), y_wide)  # deterministic on reuse


def test_dense_cache_lru_and_free_memory():
    p, k = 100, 16
    budget = 2 * p * k * 2  # room for two dense matrices
    eng = ProjectionEngine(p, k, "normal", 0, "cpu", max_memory_bytes=budget)
    x = _data(2, p)
    first = eng.project(x, 0)
    eng.project(x, 1)
    assert eng.cached_bytes() == budget
    eng.project(x, 2)  # evicts ensemble 0
    assert sorted(eng._states) == [1, 2]
    assert eng.cached_bytes() <= budget
    assert torch.equal(eng.project(x, 0), first)  # regenerated identically
    eng.free_memory()
    assert eng.cached_bytes() == 0
    assert torch.equal(eng.project(x, 0), first)


def test_partial_dense_cache():
    p, k = 500, 16
    eng = ProjectionEngine(p, k, "rademacher", 0, "cpu", max_memory_bytes=200 * k * 2)
    x = _data(3, p)
    y = eng.project(x, 0)
    state = eng._states[0]
    assert state.cache_rows == 200
    assert state.cache.shape == (200, k)
    full = ProjectionEngine(p, k, "rademacher", 0, "cpu").project(x, 0)
    torch.testing.assert_close(y, full, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("ptype", ALL_TYPES)
@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)],
)
def test_dtype_preserved(ptype, dtype, tol):
    p, k = 400, 32
    x64 = _data(6, p, seed=9)
    x = x64.to(dtype)
    proj = BasicProjector(p, k, 0, ptype, "cpu", dtype=dtype)
    y = proj.project(x, 0)
    assert y.dtype == dtype
    ref = proj.project(x.double(), 0)  # same matrix, float64 arithmetic
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol * scale


def test_float64_accumulation_option():
    x = _data(3, 300, dtype=torch.float32)
    proj = BasicProjector(300, 16, 0, "normal", "cpu", dtype=torch.float64)
    assert proj.engine.work_dtype(torch.float32) == torch.float64
    assert proj.project(x, 0).dtype == torch.float32


def test_empty_batch():
    proj = BasicProjector(30, 8, 0, "sjlt", "cpu")
    assert proj.project(torch.zeros(0, 30), 0).shape == (0, 8)


def test_input_requiring_grad_and_verbose(capsys):
    x = _data(3, 40).requires_grad_()
    for ptype in RANDOM_TYPES:
        proj = BasicProjector(40, 8, 0, ptype, "cpu", verbose=True)
        y = proj.project(x, 0)
        assert not y.requires_grad
        torch.testing.assert_close(y, proj.project(x.detach(), 0), rtol=0, atol=0)
    assert "Generating projection matrix" in capsys.readouterr().err


# ------------------------------------------------------------------ errors


def test_bad_arguments_raise():
    proj = BasicProjector(20, 5, 0, "normal", "cpu")
    with pytest.raises(ValueError, match="feature_dim=20"):
        proj.project(torch.randn(3, 21), 0)
    with pytest.raises(ValueError, match="batch_size"):
        proj.project(torch.randn(20), 0)
    with pytest.raises(ValueError, match="expected feature_dim=20"):
        proj.project({"a": torch.randn(3, 4)}, 0)
    with pytest.raises(ValueError, match="batch size"):
        proj.project({"a": torch.randn(3, 10), "b": torch.randn(2, 10)}, 0)
    with pytest.raises(TypeError, match="floating"):
        proj.project(torch.ones(3, 20, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="Tensor"):
        proj.project([1, 2], 0)
    with pytest.raises(ValueError, match="ensemble_id"):
        proj.project(torch.randn(3, 20), -1)
    with pytest.raises(TypeError, match="ensemble_id"):
        proj.project(torch.randn(3, 20), 1.5)
    with pytest.raises(ValueError, match="Unknown proj_type"):
        BasicProjector(20, 5, 0, "gaussian", "cpu")
    with pytest.raises(ValueError, match="Unknown proj_type"):
        BasicProjector(20, 5, 0, "grass_0", "cpu")
    with pytest.raises(TypeError, match="proj_type"):
        BasicProjector(20, 5, 0, 3, "cpu")
    with pytest.raises(ValueError, match="proj_dim"):
        BasicProjector(20, 0, 0, "normal", "cpu")
    with pytest.raises(TypeError, match="feature_dim"):
        BasicProjector(20.0, 5, 0, "normal", "cpu")
    with pytest.raises(ValueError, match="random_mask"):
        BasicProjector(20, 21, 0, "random_mask", "cpu")
    with pytest.raises(ValueError, match="sjlt_nnz"):
        BasicProjector(20, 2, 0, "sjlt", "cpu", sjlt_nnz=3)
    with pytest.raises(ValueError, match="max_memory_bytes"):
        BasicProjector(20, 2, 0, "sjlt", "cpu", max_memory_bytes=-1)
    with pytest.raises(TypeError, match="seed"):
        BasicProjector(20, 2, "0", "sjlt", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        CudaProjector(20, 5, 0, "normal", "cpu")
    sized = BasicProjector(20, 5, 0, "normal", "cpu", param_sizes=[12, 8])
    with pytest.raises(ValueError, match=r"features\['b'\].*expected 8"):
        sized.project({"a": torch.randn(2, 12), "b": torch.randn(2, 7), "c": torch.randn(2, 1)}, 0)


def test_parse_proj_type():
    assert parse_proj_type("sjlt") == (ProjectionType.sjlt, None)
    assert parse_proj_type(ProjectionType.grass) == (ProjectionType.grass, None)
    assert parse_proj_type("grass_12") == (ProjectionType.grass, 12)
    with pytest.raises(ValueError, match="grass_N"):
        parse_proj_type("grass_x")


# --------------------------------------------------- factories and wrappers


def test_make_random_projector_cpu():
    shapes = [torch.Size([4, 5]), (3,), 7]
    proj = make_random_projector(shapes, 8, 16, 4, "cpu", proj_seed=2, proj_type="sjlt")
    assert isinstance(proj, BasicProjector)
    assert isinstance(proj, AbstractProjector)
    assert proj.feature_dim == 30
    feats = {"a": torch.randn(8, 4, 5), "b": torch.randn(8, 3), "c": torch.randn(8, 7)}
    flat = torch.cat([v.reshape(8, -1) for v in feats.values()], 1)
    torch.testing.assert_close(proj.project(feats, 0), proj.project(flat, 0))
    with pytest.raises(ValueError, match="expected 20"):
        proj.project({"a": torch.randn(8, 21), "b": torch.randn(8, 2), "c": torch.randn(8, 7)}, 0)
    with pytest.raises(ValueError, match="at least one"):
        make_random_projector([], 8, 16, 4, "cpu")
    with pytest.raises(TypeError, match="shapes"):
        make_random_projector(["x"], 8, 16, 4, "cpu")


@pytest.mark.parametrize("ptype", [*ALL_TYPES, "grass_2"])
def test_random_project_all_types_on_cpu(ptype):
    feats = {"w": torch.randn(6, 10, 12), "b": torch.randn(6, 10)}
    params = RandomProjectionParams(
        proj_dim=16,
        proj_max_batch_size=4,
        proj_seed=1,
        proj_type=ptype,
        feature_batch_size=6,
        device="cpu",
    )
    project = random_project(feats, params)
    out = project(feats)
    assert out.shape == (6, 130 if ptype == "identity" else 16)
    flat = torch.cat([feats["w"].reshape(6, -1), feats["b"]], 1)
    torch.testing.assert_close(project(flat, ensemble_id=0), out)
    if ptype != "identity":
        assert not torch.allclose(project(feats, ensemble_id=1), out)
    if ptype == "grass_2":
        assert project.projector.engine.grass_multiplier == 2


def test_random_project_errors():
    x = torch.randn(6, 10)

    class Params:
        proj_dim = 4
        proj_max_batch_size = 2
        proj_seed = 0
        proj_type = "bogus"
        feature_batch_size = 6
        device = "cpu"

    with pytest.raises(ValueError, match="Unknown proj_type"):
        random_project(x, Params())
    with pytest.raises(TypeError, match="lacks"):
        random_project(x, object())
    Params.proj_type = "normal"
    Params.feature_batch_size = 7
    with pytest.raises(ValueError, match="multiple"):
        random_project(x, Params())


def test_chunked_projector_sums_chunks():
    dims = [12, 8]
    projs = [BasicProjector(d, 10, i, "rademacher", "cpu") for i, d in enumerate(dims)]
    chunked = ChunkedCudaProjector(projs, 12, dims, 5, "cpu", torch.float32)
    x = _data(5, 20)
    expected = projs[0].project(x[:, :12], 0) + projs[1].project(x[:, 12:], 0)
    torch.testing.assert_close(chunked.project(x, 0), expected, rtol=1e-12, atol=1e-12)
    grads = {"a": x[:, :4], "b": x[:, 4:12].reshape(5, 2, 4), "c": x[:, 12:]}
    torch.testing.assert_close(chunked.dict_project(grads, 0), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="only accepts Tensor"):
        chunked.project(grads, 0)
    with pytest.raises(ValueError, match="tile"):
        chunked.dict_project({"a": x[:, :5], "b": x[:, 5:]}, 0)
    with pytest.raises(ValueError, match="max_chunk_size"):
        ChunkedCudaProjector(projs, 10, dims, 5, "cpu")
    with pytest.raises(ValueError, match="projectors"):
        ChunkedCudaProjector(projs[:1], 12, dims, 5, "cpu")
    chunked.free_memory()
    assert all(p.engine.cached_bytes() == 0 for p in projs)


# ------------------------------------------------------------------ Arnoldi


def _spd(p: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    eig = torch.logspace(1, -1, p, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_arnoldi_full_rank_matches_inverse(mode):
    p = 12
    a = _spd(p)

    def f(theta):
        return 0.5 * theta @ a @ theta

    x = torch.randn(p, dtype=torch.float64)
    proj = ArnoldiProjector(p, p, f, x, mode=mode, max_iter=50, verbose=False)
    g1, g2 = _data(4, p, 1), _data(3, p, 2)
    z1, z2 = proj.project(g1), proj.project(g2)
    torch.testing.assert_close(z1 @ z2.T, g1 @ torch.linalg.solve(a, g2.T), rtol=1e-8, atol=1e-8)
    ref = torch.linalg.eigvalsh(a).flip(0)
    torch.testing.assert_close(proj.eigenvalues, ref, rtol=1e-8, atol=1e-10)


def test_arnoldi_top_eigenspace_and_options():
    p, k = 30, 5
    a = _spd(p, seed=3)

    def f(theta):
        return 0.5 * theta @ a @ theta

    x = torch.zeros(p, dtype=torch.float64)
    state = torch.random.get_rng_state()
    proj = ArnoldiProjector(p, k, f, x, max_iter=p, seed=4, verbose=False)
    vals, vecs = proj.get_eigenspace()
    assert torch.equal(torch.random.get_rng_state(), state)  # global seed untouched
    evals, evecs = torch.linalg.eigh(a)
    torch.testing.assert_close(vals, evals.flip(0)[:k], rtol=1e-8, atol=1e-10)
    # same subspace as the exact top-k eigenvectors
    top = evecs[:, -k:]
    torch.testing.assert_close(
        (vecs @ top).abs().sum(1), torch.ones(k, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    # norm_constant only rescales internally; regularization shifts eigenvalues
    scaled = ArnoldiProjector(p, k, f, x, max_iter=p, seed=4, norm_constant=100.0, verbose=False)
    torch.testing.assert_close(scaled.get_eigenspace()[0], vals, rtol=1e-8, atol=1e-10)
    reg = ArnoldiProjector(p, k, f, x, max_iter=p, seed=4, regularization=0.5, verbose=False)
    torch.testing.assert_close(reg.get_eigenspace()[0], vals + 0.5, rtol=1e-8, atol=1e-10)
    # deterministic for a seed
    again = ArnoldiProjector(p, k, f, x, max_iter=p, seed=4, verbose=False)
    g = _data(3, p)
    torch.testing.assert_close(again.project(g), proj.project(g), rtol=0, atol=0)
    proj.free_memory()
    assert proj.eigenvectors is None
    torch.testing.assert_close(proj.project(g), again.project(g), rtol=0, atol=0)


def test_arnoldi_drops_nonpositive_eigenvalues_with_warning():
    p = 6

    def f(theta):
        return theta.sin().sum()  # Hessian diag(-sin x)

    x = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=torch.float64)
    proj = ArnoldiProjector(p, p, f, x, verbose=False)
    with pytest.warns(UserWarning, match="reduced to 3"):
        z = proj.project(torch.eye(p, dtype=torch.float64))
    assert z.shape == (p, 3)
    pos = (-x.sin()) > 0
    expected = torch.diag(torch.where(pos, -1 / x.sin(), torch.zeros_like(x)))
    torch.testing.assert_close(z @ z.T, expected, rtol=1e-8, atol=1e-8)


def test_arnoldi_project_function_and_errors():
    p = 8
    a = _spd(p, seed=5)

    def f(w, data):
        return 0.5 * w @ a @ w + (data * w).sum()

    w0 = torch.zeros(p, dtype=torch.float64)
    data = torch.ones(p, dtype=torch.float64)
    project = arnoldi_project(p, f, (w0, data), argnums=0, proj_dim=p, mode="rev-rev")
    g = _data(2, p)
    z = project(g)
    torch.testing.assert_close(z @ z.T, g @ torch.linalg.solve(a, g.T), rtol=1e-8, atol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="mode"):
            ArnoldiProjector(p, 2, f, (w0, data), mode="fwd")
        with pytest.raises(ValueError, match="feature_dim"):
            ArnoldiProjector(p + 1, 2, f, (w0, data))
        with pytest.raises(TypeError, match="callable"):
            ArnoldiProjector(p, 2, None, w0)
        proj = ArnoldiProjector(p, 2, f, (w0, data), verbose=False)
        with pytest.raises(ValueError, match="feature_dim"):
            proj.project(torch.randn(3, p + 1))


# -------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with -m gpu on a GPU)")
@pytest.mark.parametrize("ptype", ALL_TYPES)
def test_cpu_gpu_same_projection(ptype):
    p, k = 3000, 64
    x = _data(7, p, seed=8, dtype=torch.float32)
    cpu = BasicProjector(p, k, 5, ptype, "cpu")
    gpu = CudaProjector(p, k, 5, ptype, "cuda")
    for eid in (0, 3):
        y_cpu = cpu.project(x, eid)
        y_gpu = gpu.project(x.cuda(), eid)
        assert y_gpu.device.type == "cuda"
        assert y_gpu.dtype == torch.float32
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    # generated randomness is bit-identical on both devices
    key = rng.derive_key(1, 2, 3)
    grid = rng.hash_grid(key, 10**6, 50, 33, torch.device("cuda"))
    assert torch.equal(grid.cpu(), rng.hash_grid(key, 10**6, 50, 33, CPU))
    for block_fn in (rng.normal_block, rng.rademacher_block):
        on_cpu = block_fn(key, 0, 500, 66, CPU)
        assert torch.equal(block_fn(key, 0, 500, 66, torch.device("cuda")).cpu(), on_cpu)
    buckets, signs = rng.sjlt_block(key, 7, 900, 64, 2, torch.device("cuda"))
    ref_buckets, ref_signs = rng.sjlt_block(key, 7, 900, 64, 2, CPU)
    assert torch.equal(buckets.cpu(), ref_buckets)
    assert torch.equal(signs.cpu(), ref_signs)
    sel = rng.select_coordinates(key, 10**5, 300, torch.device("cuda"))
    assert torch.equal(sel.cpu(), rng.select_coordinates(key, 10**5, 300, CPU))
    # no-cache path and dicts on the GPU
    nocache = ProjectionEngine(p, k, ptype, 5, "cuda", max_memory_bytes=0, chunk_bytes=1 << 16)
    torch.testing.assert_close(
        nocache.project(x.cuda(), 0).cpu(), cpu.project(x, 0), rtol=1e-4, atol=1e-4
    )
    parts = {"a": x[:, :1000].cuda(), "b": x[:, 1000:].cuda()}
    torch.testing.assert_close(gpu.project(parts, 0).cpu(), cpu.project(x, 0), rtol=1e-4, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert gpu.project(x.cuda().to(dtype), 0).dtype == dtype
