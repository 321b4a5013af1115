"""Unchecked batched HVP (`hvp_matvec`) and the IF mean-loss HVP over batches.

Reference: the dense Hessian from ``torch.func.hessian`` in float64.
"""

import pytest
import torch

from dattri.algorithm.solve.mean_hvp import _mean_batch_hvp, merge_batches
from dattri.func.hvp_core import IHVPUsageError, hvp_matvec, linearization_bytes


def loss(w, x, y):
    return ((torch.tanh(x @ w.reshape(3, 2)) - y) ** 2).mean() + 0.1 * (w**4).sum()


def data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )


def three_batches():
    """Weights, three uneven batches and the dense Hessian of the mean loss over all rows."""
    w = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    parts = [data(3, 5), data(4, 2), data(5, 9)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    return w, parts, torch.func.hessian(loss)(w, x, y)


def batch_loss(params, batch):
    return loss(params, *batch)


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("k", [1, 4])
def test_hvp_matvec_equals_dense_hessian(mode, k):
    w = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, y = data(1, 7)
    v = torch.randn(k, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = torch.func.hessian(loss)(w, x, y)
    torch.testing.assert_close(
        hvp_matvec(loss, (w, x, y), 0, mode)(v), v @ h, rtol=1e-10, atol=1e-12
    )
    with pytest.raises(IHVPUsageError, match="mode"):
        hvp_matvec(loss, (w, x, y), 0, "fwd")


def test_mean_batch_hvp_is_size_weighted_mean_and_checks_finiteness():
    w, parts, h = three_batches()  # h: Hessian of the mean loss over all 16 rows
    n = 16
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    batches = [(p, len(p[0])) for p in parts]
    out = _mean_batch_hvp(batch_loss, w, batches, n, "rev-rev", v.float())
    assert out.dtype == torch.float32  # computed in the parameters' dtype, returned in v's
    torch.testing.assert_close(out.double(), v.float().double() @ h, rtol=1e-6, atol=1e-6)

    def bad(params, batch):  # finite loss, infinite curvature at w = 0
        return (params.abs() ** 1.5).sum() + batch[0].mean()

    with pytest.raises(ValueError, match="NaN or inf"):
        _mean_batch_hvp(bad, torch.zeros(6, dtype=torch.float64), batches, n, "rev-rev", v)


def test_mean_batch_hvp_with_kept_linearizations_equals_dense():
    w, parts, dense = three_batches()
    n = sum(len(x) for x, _ in parts)
    batches = [(b, len(b[0])) for b in parts]
    kept: dict = {}
    for seed in (6, 7):  # second call reuses the two kept linearisations
        v = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        got = _mean_batch_hvp(batch_loss, w, batches, n, "rev-rev", v, kept, 2)
        torch.testing.assert_close(got, v @ dense, rtol=1e-10, atol=1e-12)
        assert sorted(kept) == [0, 1]  # at most ``limit`` batches kept


def test_linearization_bytes_grows_with_batch():
    w = torch.randn(6, dtype=torch.float64)
    small = linearization_bytes(loss, (w, *data(0, 10)))
    large = linearization_bytes(loss, (w, *data(0, 1000)))
    assert small > 2 * w.numel() * 8
    assert large > 50 * (small - 2 * w.numel() * 8)  # ~linear in the samples


def test_merge_batches_concatenates_consecutive_batches_up_to_max_rows():
    def tb(start, n, width=3):
        x = torch.arange(start, start + n * width, dtype=torch.float64).reshape(n, width)
        return (x, torch.arange(start, start + n))

    parts = [(tb(0, 4), 4), (tb(100, 3), 3), (tb(200, 5), 5), (tb(300, 9), 9), (tb(400, 1), 1)]
    merged = merge_batches(parts, max_rows=8)
    assert [s for _, s in merged] == [7, 5, 9, 1]  # 4+3 | 5 | 9 (too large alone) | 1
    torch.testing.assert_close(merged[0][0][0], torch.cat([parts[0][0][0], parts[1][0][0]]))
    assert isinstance(merged[0][0], tuple)
    # dict batches keep their keys; batches that do not concatenate stay separate
    d = [({"x": torch.ones(2, 3), "y": torch.zeros(2)}, 2)] * 2
    ((one, size),) = merge_batches(d, 10)
    assert size == 4 and set(one) == {"x", "y"} and one["x"].shape == (4, 3)
    ragged = [((torch.ones(2, 3),), 2), ((torch.ones(2, 5),), 2)]  # padded differently
    assert [s for _, s in merge_batches(ragged, 10)] == [2, 2]
    mixed = [({"x": torch.ones(2, 3)}, 2), ({"z": torch.ones(2, 3)}, 2)]
    assert len(merge_batches(mixed, 10)) == 2


def test_mean_hvp_of_merged_batches_equals_dense():
    w, parts, dense = three_batches()
    n = sum(len(x) for x, _ in parts)
    merged = merge_batches([(b, len(b[0])) for b in parts], max_rows=7)
    assert [s for _, s in merged] == [7, 9]
    v = torch.randn(2, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = _mean_batch_hvp(batch_loss, w, merged, n, "rev-rev", v)
    torch.testing.assert_close(got, v @ dense, rtol=1e-10, atol=1e-12)
