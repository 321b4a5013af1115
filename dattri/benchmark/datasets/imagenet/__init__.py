"""ImageNet (local folder, Pillow) and upstream's ResNet-18 helpers."""

from dattri.benchmark.datasets.imagenet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    ImageFolderDataset,
    create_imagenet_dataset,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from dattri.benchmark.datasets.imagenet.imagenet_resnet18 import (
    create_resnet18_model,
    loss_imagenet_resnet18,
    train_imagenet_resnet18,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "create_imagenet_dataset",
    "create_resnet18_model",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "loss_imagenet_resnet18",
    "train_imagenet_resnet18",
]
