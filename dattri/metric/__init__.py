"""Evaluation metrics and ground truth for data attribution.

* :func:`lds`, :func:`loo_corr`, :func:`mislabel_detection_auc`,
  :func:`bootstrap_ci` (vectorised, scipy/sklearn-exact).
* :func:`calculate_lds_ground_truth`, :func:`calculate_loo_ground_truth` (read the
  directories written by :mod:`dattri.model_util` retrainers).
* :func:`brittleness`, :func:`check_if_flip`.
"""

from dattri.metric.brittleness import brittleness, check_if_flip
from dattri.metric.ground_truth import calculate_lds_ground_truth, calculate_loo_ground_truth
from dattri.metric.metrics import BootstrapCI, bootstrap_ci, lds, loo_corr, mislabel_detection_auc

__all__ = [
    "BootstrapCI",
    "bootstrap_ci",
    "brittleness",
    "calculate_lds_ground_truth",
    "calculate_loo_ground_truth",
    "check_if_flip",
    "lds",
    "loo_corr",
    "mislabel_detection_auc",
]
