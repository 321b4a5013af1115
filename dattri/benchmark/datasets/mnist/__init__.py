"""MNIST-10: the IDX reader and dataset builder, and upstream's LR/MLP helpers.

Upstream's names (``from dattri.benchmark.datasets.mnist import train_mnist_lr,
create_mnist_dataset``) sit next to the reader's own names; the models are the
ones of :mod:`dattri.benchmark.models` and training runs in
:func:`~dattri.benchmark.models.train_classifier`.
"""

from dattri.benchmark.datasets.mnist import data, mnist_lr, mnist_mlp
from dattri.benchmark.datasets.mnist.data import *  # noqa: F403
from dattri.benchmark.datasets.mnist.mnist_lr import *  # noqa: F403
from dattri.benchmark.datasets.mnist.mnist_mlp import *  # noqa: F403

__all__ = [*data.__all__, *mnist_lr.__all__, *mnist_mlp.__all__]
