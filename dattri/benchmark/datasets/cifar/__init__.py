"""CIFAR-10 / CIFAR-2: the pickle-batch reader and builders, and upstream's ResNet-9 helpers."""

from dattri.benchmark.datasets.cifar import cifar_resnet9, data
from dattri.benchmark.datasets.cifar.cifar_resnet9 import *  # noqa: F403
from dattri.benchmark.datasets.cifar.data import *  # noqa: F403

__all__ = [*cifar_resnet9.__all__, *data.__all__]
