"""MNIST-10: the IDX reader and dataset builder, and upstream's LR/MLP helpers.

Upstream's names (``from dattri.benchmark.datasets.mnist import train_mnist_lr,
create_mnist_dataset``) sit next to the reader's own names; the models are the
ones of :mod:`dattri.benchmark.models` and training runs in
:func:`~dattri.benchmark.models.train_classifier`.
"""

from dattri.benchmark.datasets.mnist.data import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_MIRRORS,
    MNIST_STD,
    create_mnist_dataset,
    download_mnist,
    load_mnist_arrays,
    read_idx,
)
from dattri.benchmark.datasets.mnist.mnist_lr import (
    LogisticRegressionMnist,
    create_lr_model,
    loss_mnist_lr,
    train_mnist_lr,
)
from dattri.benchmark.datasets.mnist.mnist_mlp import (
    MLPMnist,
    create_mlp_model,
    loss_mnist_mlp,
    train_mnist_mlp,
)

__all__ = [
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_MIRRORS",
    "MNIST_STD",
    "LogisticRegressionMnist",
    "MLPMnist",
    "create_lr_model",
    "create_mlp_model",
    "create_mnist_dataset",
    "download_mnist",
    "load_mnist_arrays",
    "loss_mnist_lr",
    "loss_mnist_mlp",
    "read_idx",
    "train_mnist_lr",
    "train_mnist_mlp",
]
