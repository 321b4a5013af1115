"""CIFAR-10 and CIFAR-2 (cat vs dog) from the official python pickle batches."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dattri.benchmark.datasets.download import (
    download_file,
    extract_tar,
    get_dataset_dir,
    verify_checksum,
)

__all__ = [
    "CIFAR2_CLASSES",
    "CIFAR10_ARCHIVE",
    "CIFAR10_BATCH_MD5",
    "CIFAR10_CLASSES",
    "CIFAR10_URL",
    "create_cifar2_dataset",
    "create_cifar_dataset",
    "download_cifar10",
    "load_cifar10_arrays",
    "read_cifar_batch",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: The official archive with its published digests and size.
CIFAR10_ARCHIVE: dict[str, str | int] = {
    "filename": "cifar-10-python.tar.gz",
    "sha256": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    "md5": "c58f30108f718f92721af3b95e74349a",
    "size": 170498071,
}
#: Published MD5 of each extracted batch.
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: CIFAR-2 keeps cat (CIFAR id 3) -> 0 and dog (CIFAR id 5) -> 1.
CIFAR2_CLASSES = (3, 5)

_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCHES = ("test_batch",)
_SIDE = 32

# Globals a CIFAR batch pickle may reference: numpy array reconstruction only.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *(
        (module, name)
        for module in (
            "numpy.core.multiarray",
            "numpy._core.multiarray",
            "numpy.core.numeric",
            "numpy._core.numeric",
        )
        for name in ("_reconstruct", "scalar", "_frombuffer")
    ),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array globals (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                # numpy>=2 moved numpy.core to numpy._core; avoid the shim warning.
                module = "numpy._core." + module.removeprefix("numpy.core.")
            return super().find_class(module, name)
        msg = (
            f"CIFAR batch pickle references {module}.{name}, which is not a numpy "
            "array constructor; refusing to load it (not an official CIFAR batch?)."
        )
        raise pickle.UnpicklingError(msg)


def _parse_batch(fh: BinaryIO, name: str) -> tuple[np.ndarray, np.ndarray]:
    entry = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    if not isinstance(entry, dict):
        msg = f"{name}: expected a pickled dict, got {type(entry).__name__}."
        raise ValueError(msg)
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    label_key = next((k for k in ("labels", "fine_labels") if k in entry), None)
    if "data" not in entry or label_key is None:
        msg = f"{name}: batch dict needs keys b'data' and b'labels', got {list(entry)}."
        raise ValueError(msg)
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        msg = f"{name}: b'data' must have shape (n, 3072), got {data.shape}."
        raise ValueError(msg)
    if labels.shape != (data.shape[0],):
        msg = f"{name}: {labels.shape[0]} labels for {data.shape[0]} images."
        raise ValueError(msg)
    # Rows hold the 1024 red, then green, then blue values, each in row-major order.
    return data.reshape(-1, 3, _SIDE, _SIDE), labels


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR python batch (a pickled dict).

    Only numpy arrays, lists and plain values are unpickled; a pickle that
    references anything else is refused.

    Args:
        path: A batch file such as ``data_batch_1`` or ``test_batch``.

    Returns:
        ``(images, labels)``: uint8 ``(n, 3, 32, 32)`` and int64 ``(n,)``.

    Raises:
        ValueError: If the dict lacks ``b"data"``/``b"labels"`` or shapes are off.
        pickle.UnpicklingError: If the pickle references non-numpy globals.
    """
    path = Path(path)
    with path.open("rb") as fh:
        return _parse_batch(fh, str(path))


def _batches_from_folder(
    folder: Path, names: Sequence[str], verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        file = folder / name
        if verify:
            verify_checksum(file, md5=CIFAR10_BATCH_MD5[name])
        x, y = read_cifar_batch(file)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _batches_from_tar(archive: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    with tarfile.open(archive, "r:*") as tar:
        for name in names:
            try:
                member = tar.getmember(f"{_FOLDER}/{name}")
            except KeyError:
                msg = f"{archive} has no member {_FOLDER}/{name}."
                raise FileNotFoundError(msg) from None
            src = tar.extractfile(member)
            if src is None:
                msg = f"{archive}: {_FOLDER}/{name} is not a regular file."
                raise ValueError(msg)
            with src:
                x, y = _parse_batch(io.BytesIO(src.read()), f"{archive}:{name}")
            images.append(x)
            labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def download_cifar10(path: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Download, verify and extract the official CIFAR-10 python archive.

    Args:
        path: Target folder; defaults to ``~/.dattri/datasets/cifar10``.
        verbose: Show a progress bar.

    Returns:
        The folder that now holds ``cifar-10-batches-py/``.
    """
    root = get_dataset_dir("cifar10") if path is None else Path(path).expanduser()
    archive = download_file(
        CIFAR10_URL,
        root / str(CIFAR10_ARCHIVE["filename"]),
        sha256=str(CIFAR10_ARCHIVE["sha256"]),
        size=int(CIFAR10_ARCHIVE["size"]),
        verbose=verbose,
    )
    extract_tar(archive, root)
    return root


def load_cifar10_arrays(
    path: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    verbose: bool = True,
) -> dict[str, np.ndarray]:
    """Load the raw CIFAR-10 arrays from a folder or the ``.tar.gz`` archive.

    ``path`` may be the ``cifar-10-batches-py`` folder, a folder containing it,
    the ``cifar-10-python.tar.gz`` archive, or a folder containing the archive.

    Args:
        path: See above; defaults to ``~/.dattri/datasets/cifar10``.
        download: Download and extract the archive into ``path`` when missing.
        verify: Check published MD5s of extracted batches (or the archive's
            SHA-256 when reading from the archive).
        verbose: Show download progress.

    Returns:
        Dict with ``train_images`` uint8 ``(50000, 3, 32, 32)``, ``train_labels``
        int64 ``(50000,)``, ``test_images`` ``(10000, 3, 32, 32)``,
        ``test_labels`` ``(10000,)``.

    Raises:
        FileNotFoundError: If no CIFAR data is found and ``download`` is False.
        ChecksumError: If ``verify`` and a file differs from the official one.
    """
    root = get_dataset_dir("cifar10") if path is None else Path(path).expanduser()

    def find() -> tuple[str, Path] | None:
        if root.is_file():
            return "tar", root
        for folder in (root, root / _FOLDER):
            if (folder / _TEST_BATCHES[0]).is_file():
                return "folder", folder
        archive = root / str(CIFAR10_ARCHIVE["filename"])
        if archive.is_file():
            return "tar", archive
        return None

    source = find()
    if source is None and download:
        download_cifar10(root, verbose=verbose)
        source = find()
    if source is None:
        msg = (
            f"No CIFAR-10 data in {root} (expected {_FOLDER}/ or "
            f"{CIFAR10_ARCHIVE['filename']}). Pass download=True to fetch "
            f"{CIFAR10_URL}, or point `path` at the data."
        )
        raise FileNotFoundError(msg)
    kind, location = source
    if kind == "folder":
        train = _batches_from_folder(location, _TRAIN_BATCHES, verify)
        test = _batches_from_folder(location, _TEST_BATCHES, verify)
    else:
        if verify:
            verify_checksum(location, sha256=str(CIFAR10_ARCHIVE["sha256"]))
        train = _batches_from_tar(location, _TRAIN_BATCHES)
        test = _batches_from_tar(location, _TEST_BATCHES)
    return {
        "train_images": train[0],
        "train_labels": train[1],
        "test_images": test[0],
        "test_labels": test[1],
    }


def _to_dataset(
    images: np.ndarray, labels: np.ndarray, normalize: bool, dtype: torch.dtype
) -> TensorDataset:
    x = torch.from_numpy(images).to(dtype) / 255.0
    if normalize:
        x = (x - 0.5) / 0.5
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        msg = f"`dtype` must be a floating dtype, got {dtype}."
        raise TypeError(msg)


def create_cifar_dataset(
    path: str | os.PathLike | None = None,
    download: bool = True,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    verbose: bool = True,
) -> tuple[TensorDataset, TensorDataset]:
    """Build the CIFAR-10 train (50k) and test (10k) sets.

    Images are scaled to ``[0, 1]`` and, when ``normalize``, mapped to
    ``[-1, 1]`` by ``(x - 0.5) / 0.5`` per channel. The float train set takes
    about 600 MiB in float32.

    Args:
        path: Data location (see :func:`load_cifar10_arrays`); defaults to
            ``~/.dattri/datasets/cifar10``.
        download: Download and extract the official archive if missing (default
            True, as upstream's builder; data already there is not fetched).
        normalize: Apply the 0.5 normalisation.
        dtype: Floating dtype of the images.
        verify: Check the published checksums.
        verbose: Show download progress.

    Returns:
        ``(train_ds, test_ds)`` yielding ``(image (3, 32, 32), label int64)``.
    """
    _check_dtype(dtype)
    arrays = load_cifar10_arrays(path, download=download, verify=verify, verbose=verbose)
    return (
        _to_dataset(arrays["train_images"], arrays["train_labels"], normalize, dtype),
        _to_dataset(arrays["test_images"], arrays["test_labels"], normalize, dtype),
    )


def create_cifar2_dataset(
    path: str | os.PathLike | None = None,
    download: bool = True,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    verbose: bool = True,
    classes: tuple[int, int] = CIFAR2_CLASSES,
) -> tuple[TensorDataset, TensorDataset]:
    """Build CIFAR-2: the cat (label 0) and dog (label 1) images of CIFAR-10.

    Samples keep their original relative order (10000 train, 2000 test).

    Args:
        path: Data location (see :func:`load_cifar10_arrays`).
        download: Download and extract the official archive if missing (default
            True, as upstream's builder; data already there is not fetched).
        normalize: Apply the 0.5 normalisation.
        dtype: Floating dtype of the images.
        verify: Check the published checksums.
        verbose: Show download progress.
        classes: The two CIFAR-10 class ids mapped to labels 0 and 1
            (default ``(3, 5)``: cat, dog).

    Returns:
        ``(train_ds, test_ds)`` yielding ``(image (3, 32, 32), label in {0, 1})``.

    Raises:
        ValueError: If ``classes`` is not two distinct ids in ``0..9``.
    """
    _check_dtype(dtype)
    if len(classes) != 2 or classes[0] == classes[1] or not set(classes) <= set(range(10)):
        msg = f"`classes` must be two distinct CIFAR-10 ids in 0..9, got {classes}."
        raise ValueError(msg)
    arrays = load_cifar10_arrays(path, download=download, verify=verify, verbose=verbose)
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        keep = np.isin(labels, classes)
        binary = (labels[keep] == classes[1]).astype(np.int64)
        out.append(_to_dataset(images[keep], binary, normalize, dtype))
    return out[0], out[1]
