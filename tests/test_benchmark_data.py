"""Tests of dattri.benchmark.datasets and dattri.benchmark.utils (offline only)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark import SubsetSampler, flip_label
from dattri.benchmark.datasets import (
    CIFAR2_CLASSES,
    MNIST_MEAN,
    MNIST_STD,
    CharTextDataset,
    ChecksumError,
    create_char_datasets,
    create_cifar2_dataset,
    create_cifar_dataset,
    create_mnist_dataset,
    create_shakespeare_dataset,
    default_corpus,
    download_file,
    extract_tar,
    file_digest,
    get_dataset_dir,
    load_digits_binary_dataset,
    load_digits_dataset,
    read_cifar_batch,
    read_idx,
    verify_checksum,
)
from dattri.benchmark.datasets.mnist import MNIST_FILES

# --------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` in the official IDX layout (big-endian header and data)."""
    codes = {
        np.dtype(np.uint8): 0x08,
        np.dtype(np.int8): 0x09,
        np.dtype(np.int16): 0x0B,
        np.dtype(np.int32): 0x0C,
        np.dtype(np.float32): 0x0D,
        np.dtype(np.float64): 0x0E,
    }
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.uint8, (5, 28, 28)),
        (np.uint8, (7,)),
        (np.int8, (3, 4)),
        (np.int16, (2, 3, 2)),
        (np.int32, (6,)),
        (np.float32, (2, 5)),
        (np.float64, (4, 1, 2)),
    ],
)
def test_read_idx_roundtrip(tmp_path, compress, dtype, shape):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal(shape).astype(dtype)
    file = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(file, array, compress)
    out = read_idx(file)
    assert out.dtype == np.dtype(dtype)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_content(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    file = tmp_path / "no_suffix"
    write_idx(file, array, compress=True)
    np.testing.assert_array_equal(read_idx(file), array)


def test_read_idx_header_is_big_endian(tmp_path):
    # dims 258 = 0x00000102: little-endian reading would give 33619968.
    array = np.zeros((258,), dtype=np.uint8)
    array[-1] = 9
    write_idx(tmp_path / "a", array)
    raw = (tmp_path / "a").read_bytes()
    assert raw[:8] == bytes([0, 0, 0x08, 1, 0, 0, 1, 2])
    out = read_idx(tmp_path / "a")
    assert out.shape == (258,)
    assert out[-1] == 9


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match="two zero bytes"):
        read_idx(bad_magic)
    bad_type = tmp_path / "type"
    bad_type.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match="type code"):
        read_idx(bad_type)
    truncated = tmp_path / "trunc"
    write_idx(truncated, np.arange(10, dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)


def make_mnist_folder(folder: Path, n_train: int = 6, n_test: int = 4) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        write_idx(folder / MNIST_FILES[key]["filename"], array, compress=True)
    return arrays


def test_create_mnist_dataset_from_idx_files(tmp_path):
    arrays = make_mnist_folder(tmp_path)
    train, test = create_mnist_dataset(tmp_path, verify=False)
    assert isinstance(train, TensorDataset)
    x, y = train.tensors
    assert x.shape == (6, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    expected = (arrays["train_images"].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), arrays["train_labels"])
    assert test.tensors[0].shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(test.tensors[1].numpy(), arrays["test_labels"])
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)

    flat, _ = create_mnist_dataset(tmp_path, verify=False, flatten=True, normalize=False)
    assert flat.tensors[0].shape == (6, 784)
    np.testing.assert_allclose(
        flat.tensors[0].numpy(),
        arrays["train_images"].reshape(6, -1) / 255.0,
        rtol=1e-6,
    )


def test_create_mnist_dataset_finds_extracted_files_in_raw(tmp_path):
    arrays = make_mnist_folder(tmp_path / "src")
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for spec in MNIST_FILES.values():
        name = spec["filename"]
        (raw / name.removesuffix(".gz")).write_bytes(
            gzip.decompress((tmp_path / "src" / name).read_bytes())
        )
    # Extracted files have no published digest, so verify=True still loads them.
    train, _ = create_mnist_dataset(tmp_path / "root", normalize=False, verify=True)
    np.testing.assert_allclose(
        train.tensors[0][:, 0].numpy(), arrays["train_images"] / 255.0, rtol=1e-6
    )


def test_create_mnist_dataset_checksum_failure(tmp_path):
    make_mnist_folder(tmp_path)
    with pytest.raises(ChecksumError, match="sha256"):
        create_mnist_dataset(tmp_path, verify=True)


def test_create_mnist_dataset_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        create_mnist_dataset(tmp_path / "empty", download=False)


def test_create_mnist_dataset_label_count_mismatch(tmp_path):
    make_mnist_folder(tmp_path)
    name = MNIST_FILES["train_labels"]["filename"]
    write_idx(tmp_path / name, np.zeros(5, dtype=np.uint8), compress=True)
    with pytest.raises(ValueError, match="disagree"):
        create_mnist_dataset(tmp_path, verify=False)


def test_mnist_published_checksums_are_well_formed():
    for spec in MNIST_FILES.values():
        assert len(spec["sha256"]) == 64
        assert len(spec["md5"]) == 32
        int(spec["sha256"], 16)
        assert spec["size"] > 0


# --------------------------------------------------------------------- checksums


def test_verify_checksum_and_download_via_file_url(tmp_path):
    src = tmp_path / "src.bin"
    payload = b"dattri" * 1000
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    md5 = hashlib.md5(payload).hexdigest()
    assert file_digest(src) == sha
    assert file_digest(src, "md5") == md5
    verify_checksum(src, sha256=sha, md5=md5, size=len(payload))
    with pytest.raises(ChecksumError, match="sha256"):
        verify_checksum(src, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="md5"):
        verify_checksum(src, md5="0" * 32)
    with pytest.raises(ChecksumError, match="bytes"):
        verify_checksum(src, size=len(payload) + 1)
    with pytest.raises(FileNotFoundError):
        verify_checksum(tmp_path / "missing", sha256=sha)

    dest = tmp_path / "out" / "file.bin"
    got = download_file(src.as_uri(), dest, sha256=sha, verbose=False)
    assert got == dest
    assert dest.read_bytes() == payload

    bad_dest = tmp_path / "out" / "bad.bin"
    with pytest.raises(ChecksumError):
        download_file(src.as_uri(), bad_dest, sha256="0" * 64, verbose=False)
    assert not bad_dest.exists()
    assert not bad_dest.with_name("bad.bin.part").exists()


def test_download_file_tries_mirrors_and_reports_errors(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    missing = (tmp_path / "nope.bin").as_uri()
    dest = tmp_path / "d" / "x.bin"
    download_file([missing, src.as_uri()], dest, sha256=sha, verbose=False)
    assert dest.read_bytes() == b"abc"
    with pytest.raises(OSError, match="nope"):
        download_file([missing], tmp_path / "d" / "y.bin", verbose=False)
    with pytest.raises(ValueError, match="urls"):
        download_file([], tmp_path / "d" / "z.bin")
    # A corrupt cached file is replaced by a fresh download.
    dest.write_bytes(b"corrupt")
    download_file(src.as_uri(), dest, sha256=sha, verbose=False)
    assert dest.read_bytes() == b"abc"


def test_get_dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DATTRI_HOME", str(tmp_path))
    assert get_dataset_dir("mnist") == tmp_path / "datasets" / "mnist"
    assert get_dataset_dir("x", root=tmp_path / "r") == tmp_path / "r" / "x"


def test_extract_tar_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ValueError, match="outside"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


# -------------------------------------------------------------------------- CIFAR


def make_cifar_batches(
    folder: Path, per_batch: int = 4, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write six official-format batches; labels cycle so every class appears."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        entry = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        batches[name] = (data, np.array(labels))
    return batches


def test_read_cifar_batch_layout(tmp_path):
    batches = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    images, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    data, expected_labels = batches["data_batch_2"]
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected_labels)
    # Row layout: 1024 red values, then green, then blue, each row-major 32x32.
    for n in range(4):
        for c in range(3):
            for h, w in [(0, 0), (0, 31), (5, 7), (31, 0), (31, 31)]:
                assert images[n, c, h, w] == data[n, c * 1024 + h * 32 + w]


def test_read_cifar_batch_python2_numpy_names(tmp_path):
    # Official batches were pickled by Python 2 with numpy 1.x module names.
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [3, 5]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (tmp_path / "b").write_bytes(raw)
    images, labels = read_cifar_batch(tmp_path / "b")
    np.testing.assert_array_equal(images.reshape(2, -1), data)
    np.testing.assert_array_equal(labels, [3, 5])


def test_read_cifar_batch_refuses_code_and_bad_dicts(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_batch(tmp_path / "evil")
    (tmp_path / "nolabels").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="labels"):
        read_cifar_batch(tmp_path / "nolabels")
    (tmp_path / "shape").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]})
    )
    with pytest.raises(ValueError, match="3072"):
        read_cifar_batch(tmp_path / "shape")


def test_create_cifar_dataset_folder_and_tar(tmp_path):
    folder = tmp_path / "root" / "cifar-10-batches-py"
    batches = make_cifar_batches(folder)
    train, test = create_cifar_dataset(tmp_path / "root", verify=False)
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32)
    assert x.dtype == torch.float32
    assert test.tensors[0].shape == (4, 3, 32, 32)
    first = batches["data_batch_1"][0][0].reshape(3, 32, 32) / 255.0
    np.testing.assert_allclose(x[0].numpy(), (first - 0.5) / 0.5, rtol=1e-6, atol=1e-6)
    assert float(x.min()) >= -1.0
    assert float(x.max()) <= 1.0
    labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(y.numpy(), labels)

    # Same data straight from a tar.gz archive (the official distribution form).
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    train_tar, test_tar = create_cifar_dataset(archive, verify=False)
    assert torch.equal(train_tar.tensors[0], x)
    assert torch.equal(test_tar.tensors[1], test.tensors[1])
    # ... and extracted by the safe extractor.
    extract_tar(archive, tmp_path / "extracted")
    train_ext, _ = create_cifar_dataset(tmp_path / "extracted", verify=False)
    assert torch.equal(train_ext.tensors[0], x)


def test_create_cifar2_dataset_selects_cat_and_dog(tmp_path):
    batches = make_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=10)
    train, test = create_cifar2_dataset(tmp_path, verify=False, normalize=False)
    assert CIFAR2_CLASSES == (3, 5)
    all_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    all_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    keep = np.flatnonzero((all_labels == 3) | (all_labels == 5))
    x, y = train.tensors
    assert len(train) == len(keep) == 10
    np.testing.assert_array_equal(y.numpy(), (all_labels[keep] == 5).astype(np.int64))
    np.testing.assert_allclose(x.reshape(len(keep), -1).numpy(), all_data[keep] / 255.0, rtol=1e-6)
    assert set(test.tensors[1].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="classes"):
        create_cifar2_dataset(tmp_path, verify=False, classes=(3, 3))


def test_cifar_checksum_and_missing(tmp_path):
    make_cifar_batches(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ChecksumError, match="md5"):
        create_cifar_dataset(tmp_path, verify=True)
    with pytest.raises(FileNotFoundError, match="download=True"):
        create_cifar_dataset(tmp_path / "nothing", download=False)


# ------------------------------------------------------------------------- digits


def test_load_digits_dataset_shapes_and_determinism():
    train, test = load_digits_dataset(n_train=300, n_test=100, seed=3)
    x, y = train.tensors
    assert x.shape == (300, 64)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert test.tensors[0].shape == (100, 64)
    assert set(y.tolist()) <= set(range(10))
    again, _ = load_digits_dataset(n_train=300, n_test=100, seed=3)
    assert torch.equal(again.tensors[0], x)
    other, _ = load_digits_dataset(n_train=300, n_test=100, seed=4)
    assert not torch.equal(other.tensors[0], x)
    # Standardised with train statistics: mean 0, std 1 on non-constant pixels.
    x64 = x.double()
    std = x64.std(dim=0, unbiased=False)
    torch.testing.assert_close(x64.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5, rtol=0)
    varying = std > 0
    assert varying.sum() > 50
    torch.testing.assert_close(
        std[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_load_digits_split_is_disjoint_and_raw_scaling():
    from sklearn.datasets import load_digits

    raw = load_digits().data
    train, test = load_digits_dataset(
        n_train=1000, n_test=797, standardize=False, dtype=torch.float64
    )
    rows = np.concatenate([train.tensors[0].numpy(), test.tensors[0].numpy()]) * 16
    # Every original sample appears exactly once across the two splits.
    ours = np.sort(rows.round().astype(np.int64).view([("", np.int64)] * 64).ravel())
    ref = np.sort(raw.astype(np.int64).view([("", np.int64)] * 64).ravel())
    np.testing.assert_array_equal(ours, ref)
    assert float(train.tensors[0].max()) <= 1.0
    with pytest.raises(ValueError, match="exceeds"):
        load_digits_dataset(n_train=1700, n_test=200)
    with pytest.raises(ValueError, match="n_test"):
        load_digits_dataset(n_test=0)


def test_load_digits_binary_dataset():
    train, _test = load_digits_binary_dataset(n_train=200, n_test=50)
    assert set(train.tensors[1].tolist()) == {0, 1}
    pair_train, _pair_test = load_digits_binary_dataset(
        n_train=250, n_test=100, classes=(1, 7), standardize=False
    )
    assert len(pair_train) == 250
    assert set(pair_train.tensors[1].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="exceeds"):
        load_digits_binary_dataset(n_train=400, n_test=100, classes=(1, 7))
    with pytest.raises(ValueError, match="classes"):
        load_digits_binary_dataset(classes=(1, 1))


# ----------------------------------------------------------------------- flip_label


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
def test_flip_label_exact_count_and_different_labels(kind):
    base = np.random.default_rng(0).integers(0, 10, 503)
    label = {
        "tensor": torch.as_tensor(base),
        "numpy": base.copy(),
        "list": base.tolist(),
    }[kind]
    flipped, idx = flip_label(label, p=0.2, seed=7)
    assert type(flipped) is type(label)
    out = np.asarray(flipped.numpy() if kind == "tensor" else flipped)
    assert len(idx) == int(0.2 * 503) == len(set(idx))
    assert idx == sorted(idx)
    changed = np.flatnonzero(out != base)
    np.testing.assert_array_equal(changed, idx)
    assert set(out.tolist()) <= set(range(10))
    np.testing.assert_array_equal(np.asarray(label if kind != "tensor" else label.numpy()), base)
    again, idx_again = flip_label(label, p=0.2, seed=7)
    assert idx_again == idx
    np.testing.assert_array_equal(np.asarray(again), out)
    _other, idx_other = flip_label(label, p=0.2, seed=8)
    assert idx_other != idx


def test_flip_label_tensor_dtype_and_label_space():
    label = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.int32)
    flipped, idx = flip_label(label, label_space=[0, 1, 2], p=0.5, seed=0)
    assert flipped.dtype == torch.int32
    assert len(idx) == 4
    assert torch.all(flipped[idx] != label[idx])
    # Binary space: a flip must be the other class.
    flipped2, idx2 = flip_label(label, p=1.0, seed=1)
    torch.testing.assert_close(flipped2, 1 - label)
    assert idx2 == list(range(8))
    same, none = flip_label(label, p=0.0, seed=1)
    assert none == []
    torch.testing.assert_close(same, label)


def test_flip_label_targets_are_uniform_over_other_classes():
    label = np.zeros(30000, dtype=np.int64)
    flipped, idx = flip_label(label, label_space=range(4), p=0.5, seed=0)
    counts = np.bincount(flipped[idx], minlength=4)
    assert counts[0] == 0
    # 15000 draws over 3 classes: std of a count is ~58, allow ~5 sigma.
    np.testing.assert_allclose(counts[1:], 5000, atol=300)


def test_flip_label_errors():
    with pytest.raises(ValueError, match="`p`"):
        flip_label([0, 1], p=1.5)
    with pytest.raises(ValueError, match="label_space"):
        flip_label([0, 1, 5], label_space=[0, 1], p=0.5)
    with pytest.raises(ValueError, match="two classes"):
        flip_label([2, 2, 2, 2], p=0.5)
    with pytest.raises(ValueError, match="1-D"):
        flip_label(np.zeros((2, 2), dtype=int))
    with pytest.raises(TypeError, match="integer"):
        flip_label([0.5, 1.0])


# ----------------------------------------------------------------- SubsetSampler


def test_subset_sampler_order_and_len():
    sampler = SubsetSampler([5, 2, 9, 2])
    assert list(sampler) == [5, 2, 9, 2]
    assert len(sampler) == 4
    assert list(SubsetSampler(range(3))) == [0, 1, 2]
    assert list(SubsetSampler(torch.tensor([4, 1]))) == [4, 1]
    assert all(type(i) is int for i in SubsetSampler(np.array([3, 0])))
    dataset = TensorDataset(torch.arange(10) * 10)
    loader = DataLoader(dataset, batch_size=2, sampler=SubsetSampler([7, 3, 8]))
    assert [b[0].tolist() for b in loader] == [[70, 30], [80]]
    with pytest.raises(ValueError, match="1-D"):
        SubsetSampler(np.zeros((2, 2), dtype=int))
    with pytest.raises(TypeError, match="integers"):
        SubsetSampler([0.5])


# ------------------------------------------------------------------------- text


def test_char_text_dataset_windows_and_vocab():
    text = "hello world, hello data!"
    ds = CharTextDataset(text, block_size=5)
    assert ds.vocab == tuple(sorted(set(text)))
    assert ds.vocab_size == len(set(text))
    assert ds.decode(ds.encode(text)) == text
    assert len(ds) == (len(text) - 5 - 1) // 5 + 1
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == y.shape == (5,)
        assert ds.decode(x) == text[5 * i : 5 * i + 5]
        assert ds.decode(y) == text[5 * i + 1 : 5 * i + 6]
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    xs, ys = ds.as_tensors()
    assert xs.shape == (len(ds), 5)
    for i in range(len(ds)):
        assert torch.equal(xs[i], ds[i][0])
        assert torch.equal(ys[i], ds[i][1])

    overlapping = CharTextDataset(text, block_size=4, stride=1)
    assert len(overlapping) == len(text) - 4
    assert overlapping.decode(overlapping[3][1]) == text[4:8]


def test_char_text_dataset_errors():
    with pytest.raises(ValueError, match="block_size"):
        CharTextDataset("abc", block_size=3)
    with pytest.raises(ValueError, match="block_size"):
        CharTextDataset("abcdef", block_size=0)
    with pytest.raises(ValueError, match="vocabulary"):
        CharTextDataset("abcz", block_size=2, vocab="abc")
    with pytest.raises(ValueError, match="repeat"):
        CharTextDataset("abcd", block_size=2, vocab="abca" + "d")
    with pytest.raises(TypeError, match="str"):
        CharTextDataset(b"abcd", block_size=2)


def test_default_corpus_and_char_splits():
    text = default_corpus()
    assert len(text) > 5000
    assert text.isascii()
    train, val = create_char_datasets(block_size=32)
    assert train.vocab == val.vocab == tuple(sorted(set(text)))
    cut = int(len(text) * 0.9)
    assert train.decode(train.data) == text[:cut]
    assert val.decode(val.data) == text[cut:]
    x, _y = train[0]
    assert x.dtype == torch.int64
    assert x.shape == (32,)
    with pytest.raises(ValueError, match="train_frac"):
        create_char_datasets(train_frac=1.0)


def test_create_shakespeare_dataset_from_local_file(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (tmp_path / "input.txt").write_text(text)
    train, val = create_shakespeare_dataset(tmp_path, block_size=16)
    assert train.vocab == tuple(sorted(set(text)))
    assert train.decode(train.data) + val.decode(val.data) == text
    train2, _ = create_shakespeare_dataset(tmp_path / "input.txt", block_size=16)
    assert torch.equal(train2.data, train.data)
    with pytest.raises(FileNotFoundError, match="download=True"):
        create_shakespeare_dataset(tmp_path / "missing")
