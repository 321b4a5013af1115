"""Benchmarks: datasets, models, training helpers and label-noise utilities.

Subpackages:
    dattri.benchmark.datasets: MNIST (IDX), CIFAR-10/CIFAR-2 (pickle batches),
        scikit-learn digits, character-level text; numpy/torch only.
    dattri.benchmark.models: logistic regression, MLP, ResNet-9, a small GPT and
        the ``train_classifier`` / ``train_full_batch`` helpers.
    dattri.benchmark.utils: ``flip_label`` and ``SubsetSampler``.
"""

from dattri.benchmark.utils import SubsetSampler, flip_label

__all__ = ["SubsetSampler", "flip_label"]
