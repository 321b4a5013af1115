"""Metric values vs scipy/sklearn, upstream doc examples, bootstrap CI, input errors."""

import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score, roc_curve

from dattri.metric import bootstrap_ci, lds, loo_corr, mislabel_detection_auc


def _random_subsets(rng, n_train, n_subsets, size):
    return torch.tensor(
        np.stack([rng.choice(n_train, size, replace=False) for _ in range(n_subsets)])
    )


# --------------------------------------------------------------------------- LDS


@pytest.mark.parametrize("ties", [False, True])
def test_lds_matches_scipy_spearmanr(ties):
    rng = np.random.default_rng(0)
    n_train, n_test, n_sub = 30, 7, 12
    if ties:  # small integer values -> many ties in predictions and ground truth
        # mixed dtypes: computed in float64, returned in the score's dtype
        score = torch.tensor(rng.integers(-1, 2, size=(n_train, n_test)), dtype=torch.float64)
        gt = torch.tensor(rng.integers(0, 3, size=(n_sub, n_test)), dtype=torch.float32)
    else:
        score = torch.tensor(rng.normal(size=(n_train, n_test)))
        gt = torch.tensor(rng.normal(size=(n_sub, n_test)))
    idx = _random_subsets(rng, n_train, n_sub, 15)
    corr, pval = lds(score, (gt, idx))
    assert corr.shape == (n_test,) and pval.shape == (n_test,)
    assert corr.dtype == torch.float64
    for j in range(n_test):
        pred = np.array([score[idx[s], j].double().sum().item() for s in range(n_sub)])
        ref = stats.spearmanr(pred, gt[:, j].numpy())
        assert corr[j].item() == pytest.approx(ref.statistic, abs=1e-12)
        assert pval[j].item() == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-14)


def test_lds_upstream_doc_example():
    # 3 subsets of a 3-sample training set, 2 test samples.
    score = torch.tensor([[1.0, 1.0], [2.0, 0.0], [4.0, 3.0]])
    idx = torch.tensor([[0], [1], [2]])  # predictions = score rows
    gt = torch.tensor([[0.1, 1.0], [0.2, 1.0], [0.3, 5.0]])
    corr, pval = lds(score, (gt, idx))
    # float32 scores -> float32 results (upstream), comparable with float32 tensors
    assert torch.allclose(corr, torch.tensor([1.0, 0.8660254]))
    assert torch.allclose(pval, torch.tensor([0.0, 0.3333]), atol=1e-4)


def test_lds_perfect_linear_datamodel_is_one():
    rng = np.random.default_rng(1)
    score = torch.tensor(rng.normal(size=(50, 6)))
    idx = _random_subsets(rng, 50, 20, 25)
    gt = torch.stack([score[i].sum(0) for i in idx])  # exact additive ground truth
    corr, pval = lds(score, (gt, idx))
    assert torch.allclose(corr, torch.ones(6, dtype=torch.float64))
    assert (pval < 1e-10).all()
    # A monotone transform keeps the rank correlation at 1; noise lowers it.
    corr2, _ = lds(score, (torch.exp(gt / 10), idx))
    assert torch.allclose(corr2, torch.ones(6, dtype=torch.float64))
    noisy = gt + torch.tensor(rng.normal(scale=3.0, size=gt.shape))
    corr3, _ = lds(score, (noisy, idx))
    assert (corr3 < 1).all() and corr3.mean() > 0.3


def test_lds_duplicate_and_ragged_indices():
    score = torch.arange(5.0)[:, None]
    # duplicates count with multiplicity; ragged subsets given as a list
    corr, _ = lds(score, (torch.tensor([[8.0], [1.0], [3.0]]), [[4, 4], [1], [0, 1, 2]]))
    # preds: 8, 1, 3 -> identical order
    assert corr.item() == pytest.approx(1.0)


def test_lds_constant_ground_truth_gives_nan_with_warning():
    score = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    gt = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    with pytest.warns(stats.ConstantInputWarning):
        corr, pval = lds(score, (gt, idx))
    assert torch.isnan(corr[0]) and torch.isnan(pval[0])
    assert not torch.isnan(corr[1])


def test_lds_bootstrap_ci_default_return_unchanged():
    rng = np.random.default_rng(2)
    score = torch.tensor(rng.normal(size=(20, 40)))
    idx = _random_subsets(rng, 20, 10, 10)
    gt = torch.stack([score[i].sum(0) for i in idx]) + torch.tensor(rng.normal(size=(10, 40)))
    out = lds(score, (gt, idx))
    assert len(out) == 2
    corr, pval, ci = lds(score, (gt, idx), ci=0.9, n_boot=500, seed=3)
    assert torch.equal(corr, out[0]) and torch.equal(pval, out[1])
    assert ci.low <= ci.mean <= ci.high
    assert ci.mean == pytest.approx(corr.mean().item())
    assert ci.n == 40 and ci.ci == 0.9 and ci.n_boot == 500
    # deterministic per seed
    assert lds(score, (gt, idx), ci=0.9, n_boot=500, seed=3)[2] == ci


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_narrows_with_more_samples_and_matches_normal_theory():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.normal(size=30), ci=0.95, n_boot=2000, seed=0)
    large = bootstrap_ci(rng.normal(size=3000), ci=0.95, n_boot=2000, seed=0)
    assert small.low <= small.mean <= small.high
    assert large.low <= large.mean <= large.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    # width close to 2 * 1.96 * sd / sqrt(n) for normal data
    assert large.high - large.low == pytest.approx(2 * 1.96 / np.sqrt(3000), rel=0.15)


def test_bootstrap_ci_drops_nan_and_validates():
    ci = bootstrap_ci(torch.tensor([1.0, float("nan"), 3.0]), n_boot=100)
    assert ci.n == 2 and ci.mean == pytest.approx(2.0)
    assert 1.0 <= ci.low <= ci.high <= 3.0
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci([1.0, 2.0], ci=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci([float("nan")])


# --------------------------------------------------------------------------- LOO


def test_loo_corr_matches_scipy_pearsonr():
    rng = np.random.default_rng(3)
    score = torch.tensor(rng.normal(size=(25, 6)), dtype=torch.float32)
    gt = torch.tensor(rng.normal(size=(25, 6))) + 0.5 * score.double()
    corr, pval = loo_corr(score, (gt, torch.arange(25)))
    assert corr.dtype == pval.dtype == torch.float32  # the score's dtype, as upstream
    corr64, pval64 = loo_corr(score.double(), (gt, torch.arange(25)))
    for j in range(6):
        ref = stats.pearsonr(score[:, j].double().numpy(), gt[:, j].numpy())
        assert corr64[j].item() == pytest.approx(ref.statistic, abs=1e-12)
        assert pval64[j].item() == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
        # float32 output = the float64 result rounded to float32
        assert corr[j].item() == np.float32(corr64[j].item())
        assert pval[j].item() == np.float32(pval64[j].item())
    # tiny n: n == 2 and n == 3 follow scipy too
    for n in (2, 3):
        x, y = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))
        c, p = loo_corr(torch.tensor(x), (torch.tensor(y), None))
        ref = stats.pearsonr(x[:, 0], y[:, 0])
        assert c.item() == pytest.approx(ref.statistic) and p.item() == pytest.approx(ref.pvalue)


def test_loo_corr_upstream_doc_example():
    score = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    gt = torch.tensor([[2.0, 4.0], [4.0, 3.0], [6.0, 1.0], [8.0, 2.0]])
    corr, pval = loo_corr(score, (gt, torch.arange(4)))
    assert torch.allclose(corr, torch.tensor([1.0, -0.8]))
    assert torch.allclose(pval, torch.tensor([4.44e-16, 0.2]))


def test_loo_corr_with_subset_of_removed_indices():
    rng = np.random.default_rng(4)
    score = torch.tensor(rng.normal(size=(10, 3)))
    removed = torch.tensor([1, 4, 7, 9])
    gt = 2 * score[removed] + 1
    corr, _ = loo_corr(score, (gt, removed))
    assert torch.allclose(corr, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="removed train positions"):
        loo_corr(score, (gt, None))
    with pytest.raises(ValueError, match="must match"):
        loo_corr(score, (gt, removed[:3]))


def test_loo_corr_ci():
    rng = np.random.default_rng(5)
    score = torch.tensor(rng.normal(size=(15, 20)))
    gt = score + torch.tensor(rng.normal(size=(15, 20)))
    corr, _, ci = loo_corr(score, (gt, None), ci=0.95, n_boot=300)
    assert ci.low <= corr.mean().item() <= ci.high


# --------------------------------------------------------------------------- AUC


def test_mislabel_auc_upstream_values():
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    auc, (fpr, tpr, _) = mislabel_detection_auc(torch.tensor([6.0, 5, 4, 3, 2, 1]), labels)
    assert auc.item() == 1.0 and auc.item() == sk_auc(fpr.numpy(), tpr.numpy())
    # one clean sample ranked above one mislabeled sample: 8 of 9 pairs correct
    auc, (fpr, tpr, _) = mislabel_detection_auc(torch.tensor([6.0, 5, 3, 4, 2, 1]), labels)
    assert auc.item() == pytest.approx(8 / 9)
    assert auc.item() == sk_auc(fpr.numpy(), tpr.numpy())
    assert fpr.shape == (7,) and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


@pytest.mark.parametrize("ties", [False, True])
def test_mislabel_auc_matches_sklearn(ties):
    rng = np.random.default_rng(6)
    n = 200
    y = rng.integers(0, 2, size=n)
    s = rng.integers(0, 6, size=n).astype(float) + y if ties else rng.normal(size=n) + y
    auc, (fpr, tpr, thr) = mislabel_detection_auc(torch.tensor(s), torch.tensor(y).bool())
    assert auc.item() == pytest.approx(roc_auc_score(y, s), abs=1e-14)
    assert auc.item() == sk_auc(fpr.numpy(), tpr.numpy())  # exact equality
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), ref_fpr)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr)
    np.testing.assert_array_equal(thr.numpy()[1:], ref_thr[1:])


# --------------------------------------------------------------------------- errors


def test_metric_input_errors():
    score = torch.zeros(5, 2)
    idx = torch.tensor([[0, 1], [2, 3], [1, 4]])
    with pytest.raises(ValueError, match="n_test"):
        lds(score, (torch.zeros(3, 3), idx))
    with pytest.raises(ValueError, match="must match"):
        lds(score, (torch.zeros(4, 2), idx))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        lds(score, (torch.zeros(3, 2), idx + 3))
    with pytest.raises(ValueError, match="n_train, n_test"):
        lds(torch.zeros(5), (torch.zeros(3, 2), idx))
    with pytest.raises(ValueError, match="at least 2"):
        lds(score, (torch.zeros(1, 2), idx[:1]))
    with pytest.raises(ValueError, match="pair"):
        lds(score, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="n_test"):
        loo_corr(score, (torch.zeros(5, 3), None))
    with pytest.raises(ValueError, match="binary"):
        mislabel_detection_auc(torch.arange(4.0), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="same shape"):
        mislabel_detection_auc(torch.arange(4.0), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="both"):
        mislabel_detection_auc(torch.arange(4.0), torch.ones(4))
    with pytest.raises(TypeError, match="score"):
        lds(object(), (torch.zeros(3, 2), idx))


def test_metrics_do_not_warn_on_regular_input():
    rng = np.random.default_rng(7)
    score = torch.tensor(rng.normal(size=(10, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lds(score, (torch.tensor(rng.normal(size=(5, 3))), _random_subsets(rng, 10, 5, 5)))
        loo_corr(score, (torch.tensor(rng.normal(size=(10, 3))), None))
