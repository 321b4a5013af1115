"""ImageNet from a local class-folder tree, read with Pillow (no torchvision).

Expected layout (what ``torchvision.datasets.ImageNet`` leaves after parsing the
official archives, and what most ImageNet copies look like)::

    <path>/train/<wnid>/*.JPEG
    <path>/val/<wnid>/*.JPEG

Class ids are the positions of the ``<wnid>`` folder names of ``train/`` in sorted
order (torchvision's ``ImageFolder`` convention); ``val/`` must use the same names.
Nothing is downloaded: ImageNet is distributed only after registration at
https://image-net.org/.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dattri.benchmark.datasets._optional import import_optional

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "create_imagenet_dataset",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[Any], torch.Tensor]


def _pil() -> Any:
    return import_optional(
        "PIL.Image",
        "Reading ImageNet images needs Pillow: pip install 'dattri[imagenet]' "
        "(or pip install pillow).",
    )


def _to_tensor(img: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


def imagenet_train_transform(size: int = 224) -> Transform:
    """Upstream's training transform: random resized crop, random flip, normalise.

    Crop box as ``torchvision.transforms.RandomResizedCrop(size)`` (area scale in
    ``[0.08, 1]``, aspect ratio in ``[3/4, 4/3]``, 10 tries, then a centre crop),
    bilinear resize to ``size x size``, horizontal flip with probability 0.5, then
    ImageNet mean/std normalisation. Randomness comes from torch's global RNG
    (seed it, or the DataLoader worker seeds, for reproducibility).

    Args:
        size: Output side length.

    Returns:
        ``f(PIL image) -> (3, size, size)`` float tensor.
    """
    image = _pil()

    def transform(img: Any) -> torch.Tensor:
        width, height = img.size
        area = width * height
        log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
        box = None
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(0.08, 1.0))
            aspect = math.exp(float(torch.empty(1).uniform_(log_lo, log_hi)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                box = (left, top, left + w, top + h)
                break
        if box is None:  # centre crop with the aspect ratio clamped to [3/4, 4/3]
            ratio = width / height
            if ratio < 3 / 4:
                w, h = width, round(width / (3 / 4))
            elif ratio > 4 / 3:
                w, h = round(height * (4 / 3)), height
            else:
                w, h = width, height
            left, top = (width - w) // 2, (height - h) // 2
            box = (left, top, left + w, top + h)
        out = img.resize((size, size), image.BILINEAR, box=box)
        if float(torch.rand(1)) < 0.5:
            out = out.transpose(image.FLIP_LEFT_RIGHT)
        return _to_tensor(out, IMAGENET_MEAN, IMAGENET_STD)

    return transform


def imagenet_eval_transform(size: int = 224) -> Transform:
    """Deterministic evaluation transform: resize the short side, centre crop, normalise.

    The short side is resized to ``round(size * 256 / 224)`` (256 for 224), then
    the central ``size x size`` square is kept.

    Args:
        size: Output side length.

    Returns:
        ``f(PIL image) -> (3, size, size)`` float tensor.
    """
    image = _pil()
    short = round(size * 256 / 224)

    def transform(img: Any) -> torch.Tensor:
        width, height = img.size
        scale = short / min(width, height)
        w, h = max(size, round(width * scale)), max(size, round(height * scale))
        img = img.resize((w, h), image.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        return _to_tensor(
            img.crop((left, top, left + size, top + size)), IMAGENET_MEAN, IMAGENET_STD
        )

    return transform


def _scan(folder: Path, classes: Sequence[str] | None) -> tuple[list[str], list[tuple[str, int]]]:
    if not folder.is_dir():
        msg = (
            f"ImageNet folder {folder} does not exist. Expected <path>/train/<wnid>/*.JPEG "
            "and <path>/val/<wnid>/*.JPEG (the official validation images must be sorted "
            "into class folders first, e.g. with the devkit's ground truth)."
        )
        raise FileNotFoundError(msg)
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not found:
        msg = f"{folder} has no class folders; expected {folder}/<wnid>/*.JPEG."
        raise FileNotFoundError(msg)
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        msg = f"{folder} has class folders {unknown[:5]} that train/ does not have."
        raise ValueError(msg)
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in found:
        files = sorted(f for f in (folder / name).iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        samples.extend((str(f), index[name]) for f in files)
    if not samples:
        msg = f"No images ({', '.join(IMG_EXTENSIONS)}) under {folder}."
        raise FileNotFoundError(msg)
    return list(classes), samples


class ImageFolderDataset(Dataset):
    """Images in class folders, decoded lazily with Pillow (torchvision ``ImageFolder``-like).

    Attributes:
        root: The folder scanned.
        classes: Class folder names; class id ``i`` is ``classes[i]``.
        class_to_idx: ``{folder name: class id}``.
        samples: ``[(file path, class id)]`` sorted by class, then file name.
        targets: Class ids of ``samples``.

    Args:
        root: Folder holding one sub-folder per class.
        transform: ``f(PIL RGB image) -> tensor``.
        classes: Class names fixing the ids (default: sorted sub-folder names).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.classes, self.samples = _scan(self.root, classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Decode sample ``index``.

        Args:
            index: Sample position.

        Returns:
            ``(image tensor, class id)``.
        """
        path, label = self.samples[index]
        with _pil().open(path) as img:
            return self.transform(img.convert("RGB")), label


def create_imagenet_dataset(
    path: str | os.PathLike,
    image_size: int = 224,
    eval_transform_for_val: bool = True,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Build the ImageNet train and validation sets from a local folder.

    Args:
        path: Root holding ``train/<wnid>/`` and ``val/<wnid>/`` (see the module
            docstring). Nothing is downloaded.
        image_size: Side of the square images returned (224 as upstream).
        eval_transform_for_val: Use the deterministic resize + centre crop for
            the validation set (default). ``False`` applies the random training
            transform to it too, as upstream does.

    Returns:
        ``(train_dataset, val_dataset)`` yielding ``(image (3, s, s), class id)``.

    Raises:
        FileNotFoundError: If a split folder, its class folders or images are missing.
        ImportError: If Pillow is not installed.
    """
    root = Path(path).expanduser()
    train_tf = imagenet_train_transform(image_size)
    train = ImageFolderDataset(root / "train", train_tf)
    val_tf = imagenet_eval_transform(image_size) if eval_transform_for_val else train_tf
    val = ImageFolderDataset(root / "val", val_tf, classes=train.classes)
    return train, val
