"""Upstream's module path for the logistic-regression model (an alias of :mod:`.linear`)."""

from dattri.benchmark.models.linear import LogisticRegressionMnist, create_lr_model

__all__ = ["LogisticRegressionMnist", "create_lr_model"]
