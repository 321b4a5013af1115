"""MNIST-10 from the official IDX files, read with numpy (no torchvision)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dattri.benchmark.datasets.download import (
    download_file,
    get_dataset_dir,
    verify_checksum,
)

__all__ = [
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_MIRRORS",
    "MNIST_STD",
    "create_mnist_dataset",
    "download_mnist",
    "load_mnist_arrays",
    "read_idx",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: Mirrors serving the four official files (tried in order).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Official gzip files with their published SHA-256 / MD5 digests and sizes.
MNIST_FILES: dict[str, dict[str, str | int]] = {
    "train_images": {
        "filename": "train-images-idx3-ubyte.gz",
        "sha256": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "size": 9912422,
    },
    "train_labels": {
        "filename": "train-labels-idx1-ubyte.gz",
        "sha256": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "md5": "d53e105ee54ea40749a09fcbcd1e9432",
        "size": 28881,
    },
    "test_images": {
        "filename": "t10k-images-idx3-ubyte.gz",
        "sha256": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "md5": "9fb629c4189551a2d022fa330f9573f3",
        "size": 1648877,
    },
    "test_labels": {
        "filename": "t10k-labels-idx1-ubyte.gz",
        "sha256": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "md5": "ec29112dd5afa0611ce80d1b7f02629c",
        "size": 4542,
    },
}

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a numpy array.

    Format: two zero bytes, a type code (``0x08`` ubyte, ``0x09`` byte, ``0x0B``
    short, ``0x0C`` int, ``0x0D`` float, ``0x0E`` double), the number of
    dimensions, then one big-endian ``uint32`` per dimension and the big-endian
    data in C order. Compression is detected from the gzip magic bytes, not the
    file name.

    Args:
        path: The IDX file.

    Returns:
        Array of shape ``dims`` in native byte order (``uint8`` for MNIST).

    Raises:
        ValueError: If the header is malformed or the data size does not match
            the dimensions.
    """
    path = Path(path)
    with path.open("rb") as fh:
        is_gzip = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        msg = f"{path} is not an IDX file: it must start with two zero bytes."
        raise ValueError(msg)
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        msg = f"{path}: unknown IDX type code 0x{type_code:02X}."
        raise ValueError(msg)
    header = 4 + 4 * ndim
    if len(raw) < header:
        msg = f"{path}: truncated IDX header ({ndim} dimensions announced)."
        raise ValueError(msg)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        msg = (
            f"{path}: IDX payload has {len(raw) - header} bytes, expected {expected} "
            f"for shape {dims}; the file is truncated or corrupt."
        )
        raise ValueError(msg)
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _locate(root: Path, filename: str) -> Path | None:
    """Find an MNIST file under ``root`` (gzip or extracted, common layouts)."""
    stem = filename.removesuffix(".gz")
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (filename, stem, dotted):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def download_mnist(path: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Download and verify the four official MNIST files.

    Args:
        path: Target folder; defaults to ``~/.dattri/datasets/mnist``.
        verbose: Show progress bars.

    Returns:
        The folder holding the four ``.gz`` files.
    """
    root = get_dataset_dir("mnist") if path is None else Path(path).expanduser()
    for spec in MNIST_FILES.values():
        name = str(spec["filename"])
        download_file(
            [mirror + name for mirror in MNIST_MIRRORS],
            root / name,
            sha256=str(spec["sha256"]),
            size=int(spec["size"]),
            verbose=verbose,
        )
    return root


def load_mnist_arrays(
    path: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    verbose: bool = True,
) -> dict[str, np.ndarray]:
    """Load the raw MNIST arrays.

    Args:
        path: Folder holding the IDX files (``.gz`` or extracted; also looked up
            in ``raw/`` and ``MNIST/raw/``). Defaults to
            ``~/.dattri/datasets/mnist``.
        download: Download missing files into ``path``.
        verify: Check the SHA-256 of ``.gz`` files against the official values.
            Extracted files have no published digest and are only shape-checked.
        verbose: Show download progress bars.

    Returns:
        Dict with ``train_images`` ``(60000, 28, 28)`` uint8, ``train_labels``
        ``(60000,)`` uint8, ``test_images`` ``(10000, 28, 28)``, ``test_labels``
        ``(10000,)`` (sizes are whatever the files hold).

    Raises:
        FileNotFoundError: If a file is missing and ``download`` is False.
        ChecksumError: If ``verify`` and a ``.gz`` file differs from the official.
        ValueError: If images and labels disagree in count or have wrong rank.
    """
    root = get_dataset_dir("mnist") if path is None else Path(path).expanduser()
    found = {key: _locate(root, str(s["filename"])) for key, s in MNIST_FILES.items()}
    missing = [str(MNIST_FILES[k]["filename"]) for k, v in found.items() if v is None]
    if missing and download:
        download_mnist(root, verbose=verbose)
        found = {k: _locate(root, str(s["filename"])) for k, s in MNIST_FILES.items()}
        missing = [str(MNIST_FILES[k]["filename"]) for k, v in found.items() if v is None]
    if missing:
        msg = (
            f"MNIST files {missing} not found in {root}. Pass download=True to fetch "
            f"them from {MNIST_MIRRORS[0]}, or point `path` at a folder holding them."
        )
        raise FileNotFoundError(msg)
    arrays: dict[str, np.ndarray] = {}
    for key, file in found.items():
        assert file is not None  # for type checkers; `missing` is empty here
        if verify and file.name.endswith(".gz"):
            verify_checksum(file, sha256=str(MNIST_FILES[key]["sha256"]))
        arrays[key] = read_idx(file)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            msg = (
                f"MNIST {split} files disagree: images {images.shape}, labels "
                f"{labels.shape}; expected (n, 28, 28) and (n,)."
            )
            raise ValueError(msg)
    return arrays


def _to_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    flatten: bool,
    normalize: bool,
    dtype: torch.dtype,
) -> TensorDataset:
    x = torch.from_numpy(images).to(dtype) / 255.0
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def create_mnist_dataset(
    path: str | os.PathLike | None = None,
    download: bool = True,
    flatten: bool = False,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    verbose: bool = True,
) -> tuple[TensorDataset, TensorDataset]:
    """Build the MNIST-10 train and test sets as tensor datasets.

    Pixels are scaled to ``[0, 1]`` and, when ``normalize``, standardised with
    mean 0.1307 and std 0.3081 (the usual MNIST constants).

    Args:
        path: Folder with the IDX files; defaults to ``~/.dattri/datasets/mnist``.
        download: Download (and verify) missing files into ``path`` (default
            True, as upstream's builder; files already there are not fetched).
        flatten: Return images as ``(n, 784)`` instead of ``(n, 1, 28, 28)``.
        normalize: Apply the (0.1307, 0.3081) standardisation.
        dtype: Floating dtype of the images.
        verify: Check the official SHA-256 of the ``.gz`` files.
        verbose: Show download progress bars.

    Returns:
        ``(train_ds, test_ds)``; each yields ``(image, label)`` with image of shape
        ``(1, 28, 28)`` (or ``(784,)``) and an int64 label in ``0..9``.
    """
    if not dtype.is_floating_point:
        msg = f"`dtype` must be a floating dtype, got {dtype}."
        raise TypeError(msg)
    arrays = load_mnist_arrays(path, download=download, verify=verify, verbose=verbose)
    train = _to_dataset(arrays["train_images"], arrays["train_labels"], flatten, normalize, dtype)
    test = _to_dataset(arrays["test_images"], arrays["test_labels"], flatten, normalize, dtype)
    return train, test
