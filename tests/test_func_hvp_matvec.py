"""Unchecked batched HVP (`hvp_matvec`) and the IF mean-loss HVP over batches.

Reference: the dense Hessian from ``torch.func.hessian`` in float64.
"""

import pytest
import torch

from dattri.algorithm.if_base import _mean_batch_hvp
from dattri.func.hvp_core import IHVPUsageError, hvp_matvec


def loss(w, x, y):
    return ((torch.tanh(x @ w.reshape(3, 2)) - y) ** 2).mean() + 0.1 * (w**4).sum()


def data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )


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
    w = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    parts = [data(3, 5), data(4, 2), data(5, 9)]
    n = 16
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def func(params, batch):
        return loss(params, *batch)

    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    h = torch.func.hessian(loss)(w, x, y)  # Hessian of the mean loss over all 16 rows
    batches = [(p, len(p[0])) for p in parts]
    out = _mean_batch_hvp(func, w, batches, n, "rev-rev", v.float())
    assert out.dtype == torch.float32  # computed in the parameters' dtype, returned in v's
    torch.testing.assert_close(out.double(), v.float().double() @ h, rtol=1e-6, atol=1e-6)

    def bad(params, batch):  # finite loss, infinite curvature at w = 0
        return (params.abs() ** 1.5).sum() + batch[0].mean()

    with pytest.raises(ValueError, match="NaN or inf"):
        _mean_batch_hvp(bad, torch.zeros(6, dtype=torch.float64), batches, n, "rev-rev", v)
