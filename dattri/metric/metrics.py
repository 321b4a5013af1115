"""Evaluation metrics for attribution scores: LDS, LOO correlation, mislabel AUC.

All correlations are computed for every test sample at once (no per-test-sample
Python loop) and agree with ``scipy.stats.spearmanr`` / ``scipy.stats.pearsonr``
(two-sided p-values) up to floating-point rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import special, stats
from scipy.integrate import trapezoid

__all__ = [
    "BootstrapCI",
    "bootstrap_ci",
    "lds",
    "loo_corr",
    "mislabel_detection_auc",
]


class BootstrapCI(NamedTuple):
    """Bootstrap confidence interval of a mean over test samples.

    Attributes:
        mean: Mean of the finite per-test values (the point estimate).
        low: Lower percentile bound of the bootstrap distribution of the mean.
        high: Upper percentile bound of the bootstrap distribution of the mean.
        ci: Confidence level used, e.g. ``0.95``.
        n_boot: Number of bootstrap resamples.
        n: Number of finite per-test values the interval is based on.
    """

    mean: float
    low: float
    high: float
    ci: float
    n_boot: int
    n: int


# --------------------------------------------------------------------------- helpers


def _to_numpy64(x: torch.Tensor | np.ndarray | Sequence, name: str) -> np.ndarray:
    """Convert ``x`` to a float64 numpy array, naming ``name`` on failure."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        msg = f"`{name}` must be a tensor or array of numbers, got {type(x).__name__}."
        raise TypeError(msg) from exc


def _out_device(x: object) -> torch.device:
    """Device on which results are returned (that of ``x`` when it is a tensor)."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _out_dtype(score: object) -> torch.dtype:
    """Dtype of :func:`lds` / :func:`loo_corr` results: that of ``score``, as upstream.

    Upstream dattri returns the correlations and p-values in ``score.dtype``, so that
    ``torch.allclose(corr, expected)`` works against tensors of the score's dtype.
    Everything is computed in float64; float16/bfloat16 scores give float32 results
    (half precision cannot hold p-values), non-float or non-tensor scores float64.
    """
    if isinstance(score, torch.Tensor) and score.dtype in (torch.float32, torch.float64):
        return score.dtype
    if isinstance(score, torch.Tensor) and score.dtype.is_floating_point:
        return torch.float32
    return torch.float64


def _column_pearson(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of matching columns, with column-wise constant checks.

    Args:
        x: Array of shape ``(n_obs, n_cols)``.
        y: Array of shape ``(n_obs, n_cols)``.

    Returns:
        ``(r, bad)``: ``r`` of shape ``(n_cols,)`` clipped to ``[-1, 1]`` and a
        boolean mask of shape ``(n_cols,)`` marking columns where either input
        is constant or contains NaN (``r`` is NaN there).
    """
    nan_cols = np.isnan(x).any(0) | np.isnan(y).any(0)
    const_cols = (x == x[:1]).all(0) | (y == y[:1]).all(0)
    xm = x - x.mean(0, keepdims=True)
    ym = y - y.mean(0, keepdims=True)
    # Scale by the max |value| first (as scipy does) to avoid overflow/underflow.
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = xm / np.abs(xm).max(0, keepdims=True)
        ym = ym / np.abs(ym).max(0, keepdims=True)
        xm = xm / np.linalg.norm(xm, axis=0, keepdims=True)
        ym = ym / np.linalg.norm(ym, axis=0, keepdims=True)
        r = np.einsum("ij,ij->j", xm, ym)
    r = np.clip(r, -1.0, 1.0)
    bad = nan_cols | const_cols
    r[bad] = np.nan
    if (const_cols & ~nan_cols).any():
        warnings.warn(
            stats.ConstantInputWarning(
                f"{int((const_cols & ~nan_cols).sum())} column(s) have a constant "
                "input; their correlation is not defined and is returned as NaN."
            ),
            stacklevel=3,
        )
    return r, bad


def _pearson_columns(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise Pearson r and two-sided p-value, as ``scipy.stats.pearsonr``.

    Args:
        x: Array of shape ``(n_obs, n_cols)``.
        y: Array of shape ``(n_obs, n_cols)``.

    Returns:
        ``(r, p)``, each of shape ``(n_cols,)``.
    """
    n = x.shape[0]
    r, _ = _column_pearson(x, y)
    if n == 2:
        return np.round(r), np.where(np.isnan(r), np.nan, 1.0)
    # Under H0, (r + 1) / 2 ~ Beta(n/2 - 1, n/2 - 1); the distribution is
    # symmetric, so P(|R| >= |r|) = 2 * I_{(1 - |r|)/2}(a, a).
    a = n / 2.0 - 1.0
    p = 2.0 * special.betainc(a, a, (1.0 - np.abs(r)) / 2.0)
    return r, p


def _spearman_columns(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise Spearman rho and two-sided p-value, as ``scipy.stats.spearmanr``.

    Ranks use average ranks for ties (``scipy.stats.rankdata``); the p-value
    uses the t-distribution with ``n_obs - 2`` degrees of freedom.

    Args:
        x: Array of shape ``(n_obs, n_cols)``.
        y: Array of shape ``(n_obs, n_cols)``.

    Returns:
        ``(rho, p)``, each of shape ``(n_cols,)``.
    """
    n = x.shape[0]
    # NaNs would be ranked arbitrarily; _column_pearson marks those columns NaN.
    rx = stats.rankdata(np.nan_to_num(x, nan=0.0), axis=0)
    ry = stats.rankdata(np.nan_to_num(y, nan=0.0), axis=0)
    rx[:, np.isnan(x).any(0)] = np.nan
    ry[:, np.isnan(y).any(0)] = np.nan
    rho, bad = _column_pearson(rx, ry)
    # Ranks are multiples of 1/2, so the centred sums below are exact in float64 (for
    # any realistic n): identical rankings give rho == 1.0 exactly and p == 0.0, as
    # scipy (the scaled formula of _column_pearson can land one ulp below 1).
    xm = rx - rx.mean(0, keepdims=True)
    ym = ry - ry.mean(0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        exact = (xm * ym).sum(0) / np.sqrt((xm * xm).sum(0) * (ym * ym).sum(0))
    rho = np.where(bad, np.nan, np.clip(exact, -1.0, 1.0))
    dof = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rho * np.sqrt((dof / ((rho + 1.0) * (1.0 - rho))).clip(0))
    p = 2.0 * special.stdtr(dof, -np.abs(t))
    return rho, p


def _check_score_2d(score: torch.Tensor, name: str = "score") -> np.ndarray:
    arr = _to_numpy64(score, name)
    if arr.ndim != 2:
        msg = f"`{name}` must have shape (n_train, n_test), got {tuple(arr.shape)}."
        raise ValueError(msg)
    return arr


def _subset_matrix(indices: object, n_train: int) -> np.ndarray:
    """Count matrix ``(n_subsets, n_train)``: how often each train point is in a subset.

    Args:
        indices: A tensor/array of shape ``(n_subsets, subset_size)`` or a list of
            1-D index sequences (subsets may then differ in size).
        n_train: Number of training samples (rows of the score matrix).

    Returns:
        Float64 array of shape ``(n_subsets, n_train)``.
    """
    if isinstance(indices, torch.Tensor | np.ndarray):
        arr = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else indices
        if arr.ndim != 2:
            msg = (
                "ground_truth[1] (subset indices) must have shape "
                f"(n_subsets, subset_size), got {tuple(arr.shape)}."
            )
            raise ValueError(msg)
        rows = [arr[i] for i in range(arr.shape[0])]
    else:
        rows = [np.asarray(r) for r in indices]
    counts = np.zeros((len(rows), n_train), dtype=np.float64)
    for s, row in enumerate(rows):
        row = np.asarray(row)
        if row.size and not np.issubdtype(row.dtype, np.integer):
            if not np.all(np.mod(row, 1) == 0):
                msg = "ground_truth[1] (subset indices) must contain integers."
                raise TypeError(msg)
            row = row.astype(np.int64)
        if row.size and (row.min() < 0 or row.max() >= n_train):
            msg = (
                f"ground_truth[1] (subset indices) of subset {s} must lie in "
                f"[0, {n_train}) (rows of `score`); got range "
                f"[{row.min()}, {row.max()}]."
            )
            raise ValueError(msg)
        np.add.at(counts[s], row.astype(np.int64), 1.0)
    return counts


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    per_test_values: torch.Tensor | np.ndarray | Sequence[float],
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval of the mean over test samples.

    NaN entries (e.g. test samples with a constant ground truth) are dropped
    first, matching the ``nanmean`` callers report.

    Args:
        per_test_values: Values of shape ``(n_test,)``, e.g. the per-test
            correlations returned by :func:`lds` or :func:`loo_corr`.
        ci: Confidence level in ``(0, 1)``.
        n_boot: Number of bootstrap resamples (>= 1).
        seed: Seed of the resampling RNG (same seed, same interval).

    Returns:
        A :class:`BootstrapCI` ``(mean, low, high, ci, n_boot, n)``.

    Raises:
        ValueError: If ``ci`` or ``n_boot`` is out of range, or no finite value
            is given.
    """
    if not 0.0 < float(ci) < 1.0:
        msg = f"`ci` must be in (0, 1), e.g. 0.95; got {ci}."
        raise ValueError(msg)
    if int(n_boot) != n_boot or n_boot < 1:
        msg = f"`n_boot` must be a positive integer; got {n_boot}."
        raise ValueError(msg)
    values = _to_numpy64(per_test_values, "per_test_values").reshape(-1)
    values = values[np.isfinite(values)]
    m = values.size
    if m == 0:
        msg = "`per_test_values` contains no finite value; cannot bootstrap."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot), dtype=np.float64)
    chunk = max(1, 2_000_000 // m)  # bound memory to ~16 MB of indices
    for start in range(0, int(n_boot), chunk):
        stop = min(int(n_boot), start + chunk)
        idx = rng.integers(0, m, size=(stop - start, m))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - float(ci)) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapCI(
        mean=float(values.mean()),
        low=float(low),
        high=float(high),
        ci=float(ci),
        n_boot=int(n_boot),
        n=int(m),
    )


# --------------------------------------------------------------------------- metrics


def _score_and_values(
    score: torch.Tensor, ground_truth: Any, second: str, rows: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check ``score`` and ``ground_truth[0]`` of :func:`lds` / :func:`loo_corr`.

    Args:
        score: ``(n_train, n_test)`` scores.
        ground_truth: The ``(gt_values, second)`` pair.
        second: Name of the pair's second element (for the error message).
        rows: Name of the rows of ``gt_values`` (for the error message).

    Returns:
        ``(score (n_train, n_test), gt_values (n_rows, n_test))`` as float64 arrays
        (a 1-D ``gt_values`` is one test column).

    Raises:
        ValueError: If ``ground_truth`` is not a pair or the shapes do not match.
    """
    if not isinstance(ground_truth, tuple | list) or len(ground_truth) != 2:
        msg = f"`ground_truth` must be a pair (gt_values, {second})."
        raise ValueError(msg)
    sc = _check_score_2d(score)
    gt = _to_numpy64(ground_truth[0], "ground_truth[0]")
    if gt.ndim == 1:
        gt = gt[:, None]
    if gt.ndim != 2 or gt.shape[1] != sc.shape[1]:
        msg = (
            f"ground_truth[0] must have shape ({rows}, n_test) with n_test = "
            f"score.shape[1] = {sc.shape[1]}; got {tuple(gt.shape)}."
        )
        raise ValueError(msg)
    return sc, gt


def _correlation_result(
    score: torch.Tensor,
    corr: np.ndarray,
    pval: np.ndarray,
    ci: float | None,
    n_boot: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, BootstrapCI]:
    """``(corr, pval)`` on ``score``'s device in its dtype, plus the bootstrap CI if asked."""
    dev, dtype = _out_device(score), _out_dtype(score)
    out = (torch.from_numpy(corr).to(dev, dtype), torch.from_numpy(pval).to(dev, dtype))
    if ci is None:
        return out
    return (*out, bootstrap_ci(corr, ci=ci, n_boot=n_boot, seed=seed))


def lds(
    score: torch.Tensor,
    ground_truth: tuple[torch.Tensor, torch.Tensor],
    *,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, BootstrapCI]:
    """Linear datamodeling score (LDS) per test sample.

    For each subset ``s`` and test sample ``j`` the predicted target is
    ``pred[s, j] = sum_{i in subset_s} score[i, j]``; the LDS of test sample
    ``j`` is the Spearman rank correlation between ``pred[:, j]`` and
    ``ground_truth[0][:, j]`` across subsets. Callers usually report
    ``corr.nanmean()``.

    Args:
        score: Attribution scores of shape ``(n_train, n_test)``; larger means
            the training sample helps the test target more.
        ground_truth: ``(gt_values, indices)`` with ``gt_values`` of shape
            ``(n_subsets, n_test)`` (target of the model retrained on each
            subset, e.g. negated loss, see
            :func:`dattri.metric.calculate_lds_ground_truth`) and ``indices`` of
            shape ``(n_subsets, subset_size)`` holding row indices of ``score``
            (a list of 1-D index sequences of varying size is also accepted;
            repeated indices are counted with multiplicity).
        ci: If given (e.g. ``0.95``), also return a bootstrap confidence
            interval of the mean LDS over test samples.
        n_boot: Number of bootstrap resamples (only used with ``ci``).
        seed: Bootstrap RNG seed (only used with ``ci``).

    Returns:
        ``(corr, pval)``, both tensors of shape ``(n_test,)`` on the device and in
        the dtype of ``score`` (as upstream; computed in float64 whatever the
        dtypes of ``score`` and ``ground_truth``; float32 for half-precision
        scores), NaN where the ground truth or prediction is constant. With
        ``ci`` set, ``(corr, pval, BootstrapCI)`` (the interval from the float64
        values).

    Raises:
        ValueError: On shape mismatches, out-of-range indices or fewer than two
            subsets.
    """
    sc, gt = _score_and_values(score, ground_truth, "subset_indices", "n_subsets")
    counts = _subset_matrix(ground_truth[1], sc.shape[0])
    if counts.shape[0] != gt.shape[0]:
        msg = (
            f"ground_truth has {gt.shape[0]} rows of values but "
            f"{counts.shape[0]} subsets of indices; they must match."
        )
        raise ValueError(msg)
    if gt.shape[0] < 2:
        msg = f"LDS needs at least 2 subsets; got {gt.shape[0]}."
        raise ValueError(msg)
    pred = counts @ sc  # (n_subsets, n_test)
    corr, pval = _spearman_columns(pred, gt)
    return _correlation_result(score, corr, pval, ci, n_boot, seed)


def loo_corr(
    score: torch.Tensor,
    ground_truth: tuple[torch.Tensor, torch.Tensor | None],
    *,
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, BootstrapCI]:
    """Pearson correlation between scores and leave-one-out ground truth.

    For test sample ``j`` this is Pearson's r between ``score[rows, j]`` and
    ``gt[:, j]``. When ``gt`` has ``n_train`` rows, ``rows`` is all training
    samples in order (row ``i`` of ``gt`` = model trained without sample ``i``;
    upstream behaviour, the second element is then ignored). When ``gt`` has
    fewer rows, the second element must give the removed train positions
    (as returned by :func:`dattri.metric.calculate_loo_ground_truth`) and
    ``rows`` is those positions.

    Note that the LOO target is the *raw* target of each leave-one-out model
    (not negated, not differenced), so a good attributor of a loss-type target
    correlates positively with it only if its sign convention matches.

    Args:
        score: Attribution scores of shape ``(n_train, n_test)``.
        ground_truth: ``(gt_values, removed)`` with ``gt_values`` of shape
            ``(n_models, n_test)`` and ``removed`` of shape ``(n_models,)`` or
            ``None``.
        ci: If given (e.g. ``0.95``), also return a bootstrap confidence
            interval of the mean correlation over test samples.
        n_boot: Number of bootstrap resamples (only used with ``ci``).
        seed: Bootstrap RNG seed (only used with ``ci``).

    Returns:
        ``(corr, pval)``, tensors of shape ``(n_test,)`` on the device and in the
        dtype of ``score`` (as :func:`lds`; computed in float64); with ``ci`` set,
        ``(corr, pval, BootstrapCI)``.

    Raises:
        ValueError: On shape mismatches or fewer than two models.
    """
    sc, gt = _score_and_values(score, ground_truth, "removed_indices", "n_models")
    if gt.shape[0] != sc.shape[0]:
        removed = ground_truth[1]
        if removed is None:
            msg = (
                f"ground_truth[0] has {gt.shape[0]} rows but score has "
                f"{sc.shape[0]} train rows; pass the removed train positions as "
                "ground_truth[1] to select matching score rows."
            )
            raise ValueError(msg)
        rows = _to_numpy64(removed, "ground_truth[1]").reshape(-1)
        if rows.shape[0] != gt.shape[0]:
            msg = (
                f"ground_truth[1] has {rows.shape[0]} removed indices but "
                f"ground_truth[0] has {gt.shape[0]} rows; they must match."
            )
            raise ValueError(msg)
        if (rows < 0).any() or (rows >= sc.shape[0]).any():
            msg = f"ground_truth[1] indices must lie in [0, {sc.shape[0]})."
            raise ValueError(msg)
        sc = sc[rows.astype(np.int64)]
    if gt.shape[0] < 2:
        msg = f"LOO correlation needs at least 2 models; got {gt.shape[0]}."
        raise ValueError(msg)
    corr, pval = _pearson_columns(sc, gt)
    return _correlation_result(score, corr, pval, ci, n_boot, seed)


def mislabel_detection_auc(
    score: torch.Tensor,
    ground_truth: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """ROC AUC of detecting mislabeled training samples from (self-)influence.

    Samples are inspected in decreasing order of ``score`` (higher = more
    suspicious). Ties are handled as in ``sklearn.metrics.roc_curve``: all
    samples with the same score enter the curve together (one diagonal
    segment), so the AUC equals ``sklearn.metrics.roc_auc_score``. Runs in
    ``O(n log n)``.

    Args:
        score: Scores of shape ``(n,)`` (``(n, 1)`` is accepted).
        ground_truth: Binary labels of shape ``(n,)``: 1/True = mislabeled.

    Returns:
        ``(auc, (fpr, tpr, thresholds))``: ``auc`` a float64 scalar tensor equal
        to ``sklearn.metrics.auc(fpr, tpr)``; ``fpr``, ``tpr`` and
        ``thresholds`` float64 tensors of shape ``(n_distinct + 1,)`` (``n + 1``
        without ties) starting at ``(0, 0)``; ``thresholds[0] = inf`` and
        ``thresholds[k]`` is the score at or above which samples are flagged
        (upstream used the count ``k`` instead). All on the device of ``score``.

    Raises:
        ValueError: If shapes differ, labels are not binary, or one class is
            absent.
    """
    s = _to_numpy64(score, "score")
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim != 1:
        msg = f"`score` must have shape (n,), got {tuple(s.shape)}."
        raise ValueError(msg)
    y = _to_numpy64(ground_truth, "ground_truth")
    if y.shape != s.shape:
        msg = (
            f"`ground_truth` must have the same shape as `score` {tuple(s.shape)}, "
            f"got {tuple(y.shape)}."
        )
        raise ValueError(msg)
    if not np.isin(y, (0.0, 1.0)).all():
        msg = "`ground_truth` must be binary (0/1 or bool; 1 = mislabeled)."
        raise ValueError(msg)
    if np.isnan(s).any():
        msg = "`score` contains NaN."
        raise ValueError(msg)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        msg = (
            "`ground_truth` must contain both mislabeled (1) and clean (0) samples "
            "for the AUC to be defined."
        )
        raise ValueError(msg)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # Last position of every group of equal scores.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[ends]
    fps = (ends + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s_sorted[ends]]
    auc = trapezoid(tpr, fpr)  # same routine as sklearn.metrics.auc
    dev = _out_device(score)
    return (
        torch.tensor(auc, dtype=torch.float64, device=dev),
        (
            torch.from_numpy(fpr).to(dev),
            torch.from_numpy(tpr).to(dev),
            torch.from_numpy(thresholds).to(dev),
        ),
    )
