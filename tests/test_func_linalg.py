"""DampedSymmetricInverse against torch.linalg on tiny SPD, singular and indefinite matrices."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

from dattri.func.linalg import DampedSymmetricInverse

DT = torch.float64


def _sym(evals: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=DT))
    return q @ torch.diag(torch.tensor(evals, dtype=DT)) @ q.T


def _rhs(k: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_spd_cholesky_matches_solve_and_inverse():
    a = _sym([4.0, 2.0, 1.0, 0.5, 0.25])
    inv = DampedSymmetricInverse(a, damping=0.3)
    assert inv.chol is not None and inv.rank == 5 and inv.shape == (5, 5)
    damped = a + 0.3 * torch.eye(5, dtype=DT)
    rows, col = _rhs(3, 5), _rhs(1, 5, seed=2)[0]
    ref = torch.linalg.solve(damped, rows.T)
    torch.testing.assert_close(inv.solve(rows), ref.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inv @ rows.T, ref, rtol=1e-12, atol=1e-12)  # columns
    torch.testing.assert_close(rows @ inv, ref.T, rtol=1e-12, atol=1e-12)  # rows
    torch.testing.assert_close(inv @ col, torch.linalg.solve(damped, col), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(col @ inv, inv @ col)
    torch.testing.assert_close(inv.matrix(), torch.linalg.inv(damped), rtol=1e-12, atol=1e-12)
    # the input is not modified, and an asymmetric rounding error is symmetrised away
    noisy = a.clone()
    noisy[0, 1] += 1e-9
    torch.testing.assert_close(
        DampedSymmetricInverse(noisy).matrix(),
        torch.linalg.inv(0.5 * (noisy + noisy.T)),
        rtol=1e-10,
        atol=1e-12,
    )
    assert noisy[0, 1] != noisy[1, 0]


def test_indefinite_nonsingular_is_inverted_exactly():
    a = _sym([3.0, 2.0, 1.0, -0.5, 1e-3, -2e-3], seed=3)
    inv = DampedSymmetricInverse(a)
    assert inv.chol is None and inv.rank == 6  # Cholesky fails: eigendecomposition
    rows = _rhs(4, 6)
    torch.testing.assert_close(inv.solve(rows), torch.linalg.solve(a, rows.T).T)
    torch.testing.assert_close(inv.matrix(), torch.linalg.inv(a), rtol=1e-10, atol=1e-10)
    assert inv.rcond == pytest.approx(1e-3 / 3.0, rel=1e-8)
    # damping shifts every eigenvalue: still exact
    inv2 = DampedSymmetricInverse(a, damping=0.25)
    torch.testing.assert_close(
        inv2.matrix(), torch.linalg.inv(a + 0.25 * torch.eye(6, dtype=DT)), rtol=1e-10, atol=1e-10
    )


def test_singular_raises_or_uses_pseudo_inverse():
    a = _sym([2.0, 1.0, 0.5, 0.0, 0.0])  # PSD of rank 3
    with pytest.raises(ValueError, match=r"H \+ lambda I is singular.*pass lambda > 0"):
        DampedSymmetricInverse(a, what="H + lambda I", fix="pass lambda > 0")

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="singular"):
        DampedSymmetricInverse(a, error=MyError)
    with pytest.warns(UserWarning, match=r"rank 3\); using its pseudo-inverse"):
        pinv = DampedSymmetricInverse(a, singular="pinv")
    assert pinv.rank == 3 and pinv.chol is None
    torch.testing.assert_close(pinv.matrix(), torch.linalg.pinv(a), rtol=1e-10, atol=1e-10)
    rows = _rhs(2, 5)
    torch.testing.assert_close(
        pinv.solve(rows), rows @ torch.linalg.pinv(a), rtol=1e-10, atol=1e-10
    )
    # damped: regular again, no warning, exact inverse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = DampedSymmetricInverse(a, damping=1e-2, singular="pinv")
    assert reg.chol is not None
    torch.testing.assert_close(
        reg.matrix(), torch.linalg.inv(a + 1e-2 * torch.eye(5, dtype=DT)), rtol=1e-10, atol=1e-8
    )
    # zero matrix: rank 0 pseudo-inverse (the caller decides), no warning
    zero = DampedSymmetricInverse(torch.zeros(3, 3, dtype=DT), singular="pinv")
    assert zero.rank == 0
    assert torch.equal(zero.matrix(), torch.zeros(3, 3, dtype=DT))


def test_pivot_check_and_forced_eigendecomposition():
    a = _sym([1.0, 1e-14, 0.5])  # Cholesky may succeed with a tiny pivot
    with pytest.raises(ValueError, match="singular"):
        DampedSymmetricInverse(a, pivot_rtol=1e-12, rtol=1e-12)
    spd = _sym([3.0, 1.0, 0.2])
    eig = DampedSymmetricInverse(spd, damping=0.1, cholesky=False)
    assert eig.chol is None
    torch.testing.assert_close(
        eig.matrix(), DampedSymmetricInverse(spd, damping=0.1).matrix(), rtol=1e-12, atol=1e-12
    )


def test_dtype_handling_and_ill_conditioning_warning():
    a = _sym([2.0, 1.0, 0.5, 1e-7])  # fine in float64, rounding-dominated in float32
    a32 = a.float()
    with pytest.warns(UserWarning, match="ill-conditioned for its dtype"):
        inv = DampedSymmetricInverse(a32, dtype=DT, warn_ill_conditioned=True)
    assert inv.dtype == DT and inv.matrix().dtype == DT
    rows = _rhs(3, 4).float()
    out = inv.solve(rows)
    assert out.dtype == torch.float32  # computed in float64, returned in the rhs dtype
    ref = torch.linalg.solve(0.5 * (a32 + a32.T).double(), rows.double().T).T
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    # float32 SPD in its own dtype: float32 accuracy
    spd = _sym([3.0, 2.0, 1.0])
    inv32 = DampedSymmetricInverse(spd.float(), damping=0.5)
    assert inv32.dtype == torch.float32 and inv32.chol.dtype == torch.float32
    torch.testing.assert_close(
        inv32.matrix(),
        torch.linalg.inv(spd + 0.5 * torch.eye(3, dtype=DT)).float(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"square \(n, n\).*\(2, 3\)"):
        DampedSymmetricInverse(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        DampedSymmetricInverse(torch.eye(2), damping=-1.0)
    with pytest.raises(ValueError, match="singular='nope' is unknown"):
        DampedSymmetricInverse(torch.eye(2), singular="nope")
    bad = torch.eye(2)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="H contains NaN or inf; check the loss"):
        DampedSymmetricInverse(bad, what="H + lambda I", check_finite="check the loss.")


def test_linalg_imports_nothing_from_dattri():
    import dattri.func.linalg as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] == "dattri"]
