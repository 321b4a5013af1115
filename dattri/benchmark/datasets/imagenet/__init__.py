"""ImageNet (local folder, Pillow) and upstream's ResNet-18 helpers."""

from dattri.benchmark.datasets.imagenet import data, imagenet_resnet18
from dattri.benchmark.datasets.imagenet.data import *  # noqa: F403
from dattri.benchmark.datasets.imagenet.imagenet_resnet18 import *  # noqa: F403

__all__ = [*data.__all__, *imagenet_resnet18.__all__]
