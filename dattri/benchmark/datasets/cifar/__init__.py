"""CIFAR-10 / CIFAR-2: the pickle-batch reader and builders, and upstream's ResNet-9 helpers."""

from dattri.benchmark.datasets.cifar.cifar_resnet9 import (
    create_resnet9_model,
    loss_cifar_resnet9,
    train_cifar_resnet9,
)
from dattri.benchmark.datasets.cifar.data import (
    CIFAR2_CLASSES,
    CIFAR10_ARCHIVE,
    CIFAR10_BATCH_MD5,
    CIFAR10_CLASSES,
    CIFAR10_URL,
    create_cifar2_dataset,
    create_cifar_dataset,
    download_cifar10,
    load_cifar10_arrays,
    read_cifar_batch,
)

__all__ = [
    "CIFAR2_CLASSES",
    "CIFAR10_ARCHIVE",
    "CIFAR10_BATCH_MD5",
    "CIFAR10_CLASSES",
    "CIFAR10_URL",
    "create_cifar2_dataset",
    "create_cifar_dataset",
    "create_resnet9_model",
    "download_cifar10",
    "load_cifar10_arrays",
    "loss_cifar_resnet9",
    "read_cifar_batch",
    "train_cifar_resnet9",
]
