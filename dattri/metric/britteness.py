"""Alias of :mod:`dattri.metric.brittleness` under upstream's misspelled module name."""

from dattri.metric.brittleness import brittleness, check_if_flip

__all__ = ["brittleness", "check_if_flip"]
