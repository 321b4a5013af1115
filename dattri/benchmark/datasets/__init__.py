"""Benchmark datasets read with numpy/torch only (no torchvision, no hub).

Builders return ``torch.utils.data.TensorDataset`` pairs ``(train, test)`` (or
:class:`CharTextDataset` pairs for text). Nothing is downloaded unless the caller
passes ``download=True``; files are cached under ``~/.dattri/datasets/<name>``
(override the root with the ``DATTRI_HOME`` environment variable).
"""

from dattri.benchmark.datasets.cifar import (
    CIFAR2_CLASSES,
    CIFAR10_CLASSES,
    create_cifar2_dataset,
    create_cifar_dataset,
    download_cifar10,
    load_cifar10_arrays,
    read_cifar_batch,
)
from dattri.benchmark.datasets.digits import (
    load_digits_binary_dataset,
    load_digits_dataset,
)
from dattri.benchmark.datasets.download import (
    ChecksumError,
    download_file,
    extract_tar,
    file_digest,
    get_dataset_dir,
    verify_checksum,
)
from dattri.benchmark.datasets.mnist import (
    MNIST_MEAN,
    MNIST_STD,
    create_mnist_dataset,
    download_mnist,
    load_mnist_arrays,
    read_idx,
)
from dattri.benchmark.datasets.text import (
    SHAKESPEARE_URL,
    CharTextDataset,
    create_char_datasets,
    create_shakespeare_dataset,
    default_corpus,
    load_shakespeare_text,
)

__all__ = [
    "CIFAR2_CLASSES",
    "CIFAR10_CLASSES",
    "MNIST_MEAN",
    "MNIST_STD",
    "SHAKESPEARE_URL",
    "CharTextDataset",
    "ChecksumError",
    "create_char_datasets",
    "create_cifar2_dataset",
    "create_cifar_dataset",
    "create_mnist_dataset",
    "create_shakespeare_dataset",
    "default_corpus",
    "download_cifar10",
    "download_file",
    "download_mnist",
    "extract_tar",
    "file_digest",
    "get_dataset_dir",
    "load_cifar10_arrays",
    "load_digits_binary_dataset",
    "load_digits_dataset",
    "load_mnist_arrays",
    "load_shakespeare_text",
    "read_cifar_batch",
    "read_idx",
    "verify_checksum",
]
