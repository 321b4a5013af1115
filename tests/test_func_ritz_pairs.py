"""top_ritz_pairs (shared by ihvp_at_x_arnoldi and IFAttributorArnoldi) vs numpy eigh."""

import numpy as np
import pytest
import torch

from dattri.func.hessian import IHVPUsageError
from dattri.func.hessian_arnoldi import top_ritz_pairs

KW = dict(norm_constant=3.0, tol=1e-10, seed=0, verbose=False, who="Me", fix="do X")


def _low_rank(p: int = 6, rank: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(p, rank, generator=g, dtype=torch.float64)
    signs = torch.tensor([1.0, -2.0, 0.5][:rank], dtype=torch.float64)
    return (a * signs) @ a.T  # symmetric, indefinite, rank `rank`


def test_top_pairs_match_eigh_and_zero_values_are_dropped_with_a_warning():
    h = _low_rank()
    ref = torch.zeros(6, dtype=torch.float64)
    with pytest.warns(
        UserWarning, match=r"^Me dropped 3 numerically zero Ritz value\(s\); do X\.$"
    ):
        evals, evecs = top_ritz_pairs(
            lambda m: m @ h, ref, n_steps=6, top_k=6, zero_msg="zero", **KW
        )
    w, v = np.linalg.eigh(h.numpy())
    order = np.argsort(-np.abs(w))[:3]
    np.testing.assert_allclose(evals.numpy(), w[order], rtol=1e-9)
    # eigenvectors up to sign
    np.testing.assert_allclose(np.abs(np.sum(evecs.numpy() * v[:, order].T, 1)), 1.0, atol=1e-8)
    # the kept pairs reproduce the matrix
    torch.testing.assert_close(evecs.T @ torch.diag(evals) @ evecs, h, atol=1e-9, rtol=0)


def test_top_k_keeps_the_largest_magnitudes():
    h = torch.diag(torch.tensor([1.0, -5.0, 3.0, 0.5], dtype=torch.float64))
    evals, _ = top_ritz_pairs(
        lambda m: m @ h,
        torch.zeros(4, dtype=torch.float64),
        n_steps=4,
        top_k=2,
        zero_msg="zero",
        **KW,
    )
    torch.testing.assert_close(evals, torch.tensor([-5.0, 3.0], dtype=torch.float64))


def test_zero_operator_raises():
    with (
        pytest.raises(IHVPUsageError, match="all zero here"),
        pytest.warns(UserWarning, match="dropped"),
    ):
        top_ritz_pairs(
            lambda m: 0 * m,
            torch.zeros(4, dtype=torch.float64),
            n_steps=4,
            top_k=4,
            zero_msg="all zero here",
            **KW,
        )
