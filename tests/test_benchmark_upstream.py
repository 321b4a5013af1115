"""Upstream's benchmark API: names and signatures, helpers on local data, load_benchmark.

Every dataset is written by the test (MNIST IDX files, CIFAR pickles, a tiny
ImageNet-style folder); nothing is downloaded (the download code runs against a
``file://`` mirror).
"""

from __future__ import annotations

import importlib
import inspect
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from torch import nn
from torch.utils.data import DataLoader

from dattri.benchmark.utils import SubsetSampler
from tests.test_benchmark_data import make_cifar_batches, write_idx

ROOT = Path(__file__).resolve().parents[1]
EMPTY = inspect.Parameter.empty

# ----------------------------------------------------------- names and signatures
#: module -> {name: upstream parameters [(name, default or EMPTY)], or None for a
#: non-callable / a class whose constructor is checked separately}. From sections 1,
#: 10 and 11 of the upstream API reference.
UPSTREAM = {
    "dattri.benchmark.datasets.mnist": {
        "LogisticRegressionMnist": [],
        "MLPMnist": [("dropout_rate", 0.1)],
        "create_lr_model": [("dataset", EMPTY)],
        "create_mlp_model": [("dataset", EMPTY)],
        "create_mnist_dataset": [("path", EMPTY)],
        "loss_mnist_lr": [("model_path", EMPTY), ("dataloader", EMPTY), ("device", "cpu")],
        "loss_mnist_mlp": [("model_path", EMPTY), ("dataloader", EMPTY), ("device", "cpu")],
        "train_mnist_lr": [
            ("dataloader", EMPTY),
            ("seed", 0),
            ("device", "cpu"),
            ("epoch_num", 20),
        ],
        "train_mnist_mlp": [
            ("dataloader", EMPTY),
            ("seed", 0),
            ("device", "cpu"),
            ("epoch_num", 50),
        ],
    },
    "dattri.benchmark.datasets.cifar": {
        "create_cifar2_dataset": [("path", EMPTY)],
        "create_cifar_dataset": [("path", EMPTY)],
        "create_resnet9_model": [("num_classes", 2)],
        "loss_cifar_resnet9": [
            ("model_path", EMPTY),
            ("dataloader", EMPTY),
            ("device", "cpu"),
            ("num_classes", 2),
        ],
        "train_cifar_resnet9": [
            ("dataloader", EMPTY),
            ("seed", 0),
            ("device", "cpu"),
            ("num_classes", 2),
            ("num_epochs", 10),
        ],
    },
    "dattri.benchmark.datasets.imagenet": {
        "create_imagenet_dataset": [("path", EMPTY)],
        "create_resnet18_model": [],
        "loss_imagenet_resnet18": [("model_path", EMPTY), ("dataloader", EMPTY), ("device", "cpu")],
        "train_imagenet_resnet18": [
            ("dataloader", EMPTY),
            ("seed", 0),
            ("device", "cpu"),
            ("num_epochs", 15),
        ],
    },
    "dattri.benchmark.load": {
        "load_benchmark": [
            ("model", EMPTY),
            ("dataset", EMPTY),
            ("metric", EMPTY),
            ("download_path", "~/.dattri"),
            ("redownload", False),
        ],
        "generate_url_map": [("identifier", EMPTY)],
        "REPO_URL": None,
        "SUPPORTED_DATASETS": None,
        "LOSS_MAP": None,
        "TRAIN_FUNC_MAP": None,
        "MODEL_MAP": None,
        "SAMPLERSIZE_MAP": None,
    },
    "dattri.benchmark.utils": {
        "flip_label": [("label", EMPTY), ("label_space", None), ("p", 0.1)],
        "SubsetSampler": [("indices", EMPTY)],
    },
    "dattri.benchmark.models": {"SUPPORTED_MODELS": None},
    "dattri.benchmark.models.logistic_regression": {
        "LogisticRegressionMnist": [],
        "create_lr_model": [("dataset", EMPTY)],
    },
    "dattri.benchmark.models.mlp": {"MLPMnist": [("dropout_rate", 0.1)]},
    "dattri.benchmark.models.resnet9": {"create_resnet9_model": [("num_classes", 2)]},
    "dattri.script.dattri_retrain": {"main": []},
}


def _check_compatible(func, expected, where):
    """Upstream's parameters come first, in order, with upstream's defaults.

    A parameter upstream requires may have a default here; every extra parameter
    of ours must be optional (a default or ``**kwargs``), so upstream calls bind.
    """
    params = list(inspect.signature(func).parameters.values())
    params = [p for p in params if p.name != "self"]
    assert len(params) >= len(expected), f"{where}: {params} lacks upstream's {expected}"
    for p, (name, default) in zip(params, expected):
        assert p.name == name, f"{where}: parameter {p.name!r} where upstream has {name!r}"
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY), where
        if default is not EMPTY:
            assert p.default == default, f"{where}: {name}={p.default!r}, upstream {default!r}"
    for p in params[len(expected) :]:
        assert p.default is not EMPTY or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL), (
            f"{where}: extra parameter {p.name!r} must be optional"
        )


@pytest.mark.parametrize("module", sorted(UPSTREAM))
def test_upstream_names_and_signatures(module):
    mod = importlib.import_module(module)
    for name, expected in UPSTREAM[module].items():
        assert hasattr(mod, name), f"{module}.{name} is missing"
        if expected is not None:
            _check_compatible(getattr(mod, name), expected, f"{module}.{name}")


def test_upstream_maps_and_constants():
    from dattri.benchmark import load
    from dattri.benchmark.models import SUPPORTED_MODELS

    ids = {
        "mnist_lr",
        "mnist_mlp",
        "cifar2_resnet9",
        "shakespeare_nanogpt",
        "maestro_musictransformer",
        "wikitext2_gpt2",
    }
    for table in (load.LOSS_MAP, load.TRAIN_FUNC_MAP, load.MODEL_MAP, load.SAMPLERSIZE_MAP):
        assert set(table) == ids
    assert load.SAMPLERSIZE_MAP["maestro_musictransformer"] == (5000, 178)
    assert load.SAMPLERSIZE_MAP["wikitext2_gpt2"] == (4656, 481)
    assert set(load.SUPPORTED_DATASETS) == {
        "mnist",
        "cifar2",
        "shakespeare",
        "maestro",
        "wikitext2",
    }
    assert (
        load.REPO_URL == "https://huggingface.co/datasets/trais-lab/dattri-benchmark/resolve/main/"
    )
    urls = load.generate_url_map("mnist_lr")
    assert urls["models_full"] == load.REPO_URL + "mnist_lr/mnist_lr_full.zip?download=true"
    assert urls["groundtruth"]["loo"][1] == (
        load.REPO_URL + "mnist_lr/loo/target_values_loo.pt?download=true"
    )
    assert SUPPORTED_MODELS == ["lr", "mlp", "resnet9", "resnet18", "musictransformer", "nanogpt"]
    # Classic model factories give upstream's architectures.
    assert sum(p.numel() for p in load.MODEL_MAP["mnist_lr"]().parameters()) == 7850
    mlp = load.MODEL_MAP["mnist_mlp"]()
    assert sum(p.numel() for p in mlp.parameters()) == 109386
    assert {n.split(".")[0] for n, _ in mlp.named_parameters()} == {"fc1", "fc2", "fc3"}
    assert load.MODEL_MAP["cifar2_resnet9"]().linear.out_features == 2


def test_console_script_registered():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dattri_retrain"] == "dattri.script.dattri_retrain:main"
    module, func = scripts["dattri_retrain"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_resnet18_matches_torchvision_layout():
    from dattri.benchmark.datasets.imagenet import create_resnet18_model

    model = create_resnet18_model()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    keys = list(model.state_dict())
    assert len(keys) == 122  # 62 parameters + 3 buffers for each of the 20 BatchNorms
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.1.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer4.0.downsample.1.num_batches_tracked",
        "fc.bias",
    ):
        assert key in keys
    assert "layer1.0.downsample.0.weight" not in keys
    x = torch.randn(2, 3, 64, 64)
    assert model.eval()(x).shape == (2, 1000)


# ------------------------------------------------------------------ local data
def write_mnist(folder: Path, n_train: int = 200, n_test: int = 60, seed: int = 0) -> None:
    """Extracted IDX files in torchvision's ``MNIST/raw`` layout, learnable classes.

    Class ``c`` has a bright 4x4 block at row ``2 + 2c`` on top of noise.
    """
    rng = np.random.default_rng(seed)
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for n, prefix in ((n_train, "train"), (n_test, "t10k")):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 6 + 2 * c, 10:14] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    write_mnist(folder)
    return folder


def _manual_ce(model, loader):
    with torch.no_grad():
        return torch.cat(
            [nn.functional.cross_entropy(model(x), y, reduction="none") for x, y in loader]
        )


def test_mnist_helpers_on_local_files(mnist_dir, tmp_path):
    from dattri.benchmark.datasets.mnist import (
        LogisticRegressionMnist,
        create_mnist_dataset,
        loss_mnist_lr,
        loss_mnist_mlp,
        train_mnist_lr,
        train_mnist_mlp,
    )

    train, test = create_mnist_dataset(str(mnist_dir))  # upstream's call: path only
    x0, y0 = train[0]
    assert x0.shape == (1, 28, 28) and int(y0) in range(10)
    train_loader = DataLoader(train, batch_size=32, sampler=SubsetSampler(range(150)))
    test_loader = DataLoader(test, batch_size=32, sampler=SubsetSampler(range(50)))

    state = torch.random.get_rng_state()
    model = train_mnist_lr(train_loader)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert isinstance(model, LogisticRegressionMnist) and not model.training
    again = train_mnist_lr(train_loader, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = train_mnist_lr(train_loader, seed=1)
    assert not torch.equal(model.linear.weight, other.linear.weight)
    xs, ys = next(iter(DataLoader(test, batch_size=60)))
    assert (model(xs).argmax(1) == ys).float().mean() > 0.9

    path = tmp_path / "lr.pt"
    torch.save(model.state_dict(), path)
    losses = loss_mnist_lr(str(path), test_loader)
    assert losses.shape == (50,)
    torch.testing.assert_close(losses, _manual_ce(model, test_loader))

    mlp = train_mnist_mlp(train_loader, epoch_num=2)
    assert not mlp.training
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    mlp_losses = loss_mnist_mlp(tmp_path / "mlp.pt", test_loader)
    assert mlp_losses.shape == (50,)
    torch.testing.assert_close(mlp_losses, _manual_ce(mlp.eval(), test_loader))  # dropout off
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        loss_mnist_lr(tmp_path / "nope.pt", test_loader)


def test_cifar_helpers_on_local_pickles(tmp_path):
    from dattri.benchmark.datasets.cifar import (
        create_cifar2_dataset,
        create_cifar_dataset,
        create_resnet9_model,
        loss_cifar_resnet9,
        train_cifar_resnet9,
    )

    make_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=10)
    train10, _ = create_cifar_dataset(tmp_path, verify=False)
    assert len(train10) == 50
    train, test = create_cifar2_dataset(tmp_path, verify=False)
    assert set(train.tensors[1].tolist()) == {0, 1}
    loader = DataLoader(train, batch_size=4)
    model = train_cifar_resnet9(loader, num_epochs=1)
    assert isinstance(model, type(create_resnet9_model())) and not model.training
    torch.save(model.state_dict(), tmp_path / "r9.pt")
    test_loader = DataLoader(test, batch_size=4)
    losses = loss_cifar_resnet9(tmp_path / "r9.pt", test_loader)
    assert losses.shape == (len(test),)
    torch.testing.assert_close(losses, _manual_ce(model, test_loader))


def write_imagenet(root: Path, classes=("n01", "n02"), per_class: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (40 + 7 * i, 36 + 5 * c)  # different sizes and aspect ratios
                arr = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"img_{i}.JPEG", format="JPEG")
        (root / split / "n01" / "notes.txt").write_text("not an image")


def test_imagenet_helpers_on_local_folder(tmp_path):
    from dattri.benchmark.datasets.imagenet import (
        create_imagenet_dataset,
        loss_imagenet_resnet18,
        train_imagenet_resnet18,
    )

    write_imagenet(tmp_path / "imnet")
    train, val = create_imagenet_dataset(tmp_path / "imnet", image_size=32)
    assert len(train) == 4 and len(val) == 4
    assert train.classes == ["n01", "n02"] and train.targets == [0, 0, 1, 1]
    x, y = train[2]
    assert x.shape == (3, 32, 32) and y == 1
    torch.manual_seed(0)
    a = train[0][0]
    torch.manual_seed(0)
    assert torch.equal(a, train[0][0])  # random crop follows torch's RNG
    assert torch.equal(val[1][0], val[1][0])  # evaluation transform is deterministic
    # Normalisation: a mid-grey image maps to (0.5 - mean) / std per channel.
    loader = DataLoader(train, batch_size=2)
    model = train_imagenet_resnet18(loader, num_epochs=1)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    val_loader = DataLoader(val, batch_size=2)
    loss = loss_imagenet_resnet18(tmp_path / "r18.pt", val_loader)
    assert isinstance(loss, float)
    assert loss == pytest.approx(float(_manual_ce(model, val_loader).mean()), rel=1e-5)

    with pytest.raises(FileNotFoundError, match="val/<wnid>"):
        create_imagenet_dataset(tmp_path / "missing")
    (tmp_path / "imnet" / "val" / "n99").mkdir()
    with pytest.raises(ValueError, match="n99"):
        create_imagenet_dataset(tmp_path / "imnet", image_size=32)


def test_imagenet_transforms_values():
    from PIL import Image

    from dattri.benchmark.datasets.imagenet import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        imagenet_eval_transform,
        imagenet_train_transform,
    )

    grey = Image.fromarray(np.full((50, 80, 3), 128, dtype=np.uint8))
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for tf in (imagenet_eval_transform(24), imagenet_train_transform(24)):
        out = tf(grey)
        assert out.shape == (3, 24, 24)
        torch.testing.assert_close(out[:, 5, 7], expected, atol=1e-5, rtol=0)
    # Centre crop keeps the middle: a left/right split image gives both halves.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    out = imagenet_eval_transform(16)(Image.fromarray(arr))
    assert out[0, 8, 0] < 0 < out[0, 8, 15]


@pytest.mark.filterwarnings("ignore:IFAttributorCG")  # upstream's example: max_iter=10
def test_upstream_readme_example_runs(mnist_dir):
    """Upstream's README example (MNIST LR + IF-CG), unchanged, on test-written files."""
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.benchmark.datasets.mnist import create_mnist_dataset, train_mnist_lr
    from dattri.benchmark.utils import SubsetSampler as UpstreamSampler
    from dattri.task import AttributionTask

    dataset_train, dataset_test = create_mnist_dataset(str(mnist_dir))
    test_loader = DataLoader(dataset_test, batch_size=64, sampler=UpstreamSampler(range(20)))
    train_loader = DataLoader(dataset_train, batch_size=64, sampler=UpstreamSampler(range(100)))
    model = train_mnist_lr(train_loader)

    def f(params, data_target_pair):
        image, label = data_target_pair
        loss = nn.CrossEntropyLoss()
        yhat = torch.func.functional_call(model, params, image)
        return loss(yhat, label)

    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorCG(task=task, max_iter=10, regularization=1e-2)
    attributor.cache(train_loader)
    with torch.no_grad():
        score = attributor.attribute(train_loader, test_loader)
    assert score.shape == (100, 20)
    assert torch.isfinite(score).all() and score.abs().sum() > 0
    # A training sample of the test sample's class helps it more, on average.
    y_train = torch.stack([dataset_train[i][1] for i in range(100)])
    y_test = torch.stack([dataset_test[i][1] for i in range(20)])
    same = y_train[:, None] == y_test[None, :]
    assert score[same].mean() > score[~same].mean()


# -------------------------------------------------------------- load_benchmark
def _fake_hub(tmp_path: Path, identifier: str, n_models: int = 2) -> Path:
    """A ``file://`` mirror of the HF repository for one identifier (no LOO files)."""
    from dattri.benchmark.load import MODEL_MAP

    hub = tmp_path / "hub" / identifier
    (hub / "lds").mkdir(parents=True)
    for kind in ("full", "half"):
        with zipfile.ZipFile(hub / f"{identifier}_{kind}.zip", "w") as zf:
            for i in range(n_models):
                torch.manual_seed(i)
                file = tmp_path / "w.pt"
                torch.save(MODEL_MAP[identifier]().state_dict(), file)
                zf.write(file, f"{i}/model_weights_0.pt")
    torch.save(torch.arange(12).reshape(3, 4), hub / "lds" / "indices_lds.pt")
    torch.save(-torch.rand(3, 5), hub / "lds" / "target_values_lds.pt")
    return tmp_path / "hub"


def test_load_benchmark_downloads_upstream_layout(mnist_dir, tmp_path, monkeypatch):
    import shutil

    from dattri.benchmark import load

    hub = _fake_hub(tmp_path, "mnist_lr")
    monkeypatch.setattr(load, "REPO_URL", hub.as_uri() + "/")
    download_path = tmp_path / "dl"
    shutil.copytree(mnist_dir / "MNIST", download_path / "dataset" / "MNIST")
    with pytest.warns(UserWarning, match="does not exist"):  # no LOO files, as upstream warns
        inputs, (values, indices) = load.load_benchmark("lr", "mnist", "lds", str(download_path))
    root = download_path / "benchmark" / "mnist_lr"
    assert inputs["models_full"] == [
        root / "models_full" / str(i) / "model_weights_0.pt" for i in range(2)
    ]
    assert len(inputs["models_half"]) == 2
    assert values.shape == (3, 5) and indices.shape == (3, 4)
    assert set(inputs) == {
        "model",
        "models_full",
        "models_half",
        "train_dataset",
        "test_dataset",
        "train_sampler",
        "test_sampler",
        "loss_func",
        "target_func",
        "train_func",
    }
    assert not inputs["model"].training
    assert len(inputs["train_sampler"]) == 5000 and len(inputs["test_sampler"]) == 500
    assert inputs["loss_func"] is inputs["target_func"] is load.loss_mnist_lr
    assert inputs["train_func"] is load.train_mnist_lr
    assert len(inputs["train_dataset"]) == 200
    # The ground-truth style function scores a downloaded checkpoint.
    loader = DataLoader(inputs["test_dataset"], batch_size=16, sampler=SubsetSampler(range(10)))
    assert inputs["target_func"](inputs["models_full"][1], loader).shape == (10,)
    # redownload=True fetches the files again.
    new_values = -torch.rand(3, 5)
    torch.save(new_values, hub / "mnist_lr" / "lds" / "target_values_lds.pt")
    with pytest.warns(UserWarning, match="does not exist"):
        _, (again, _) = load.load_benchmark("lr", "mnist", "lds", str(download_path), True)
    assert torch.equal(again, new_values)
    # Present now: no second download (the mirror can go away); LOO is missing.
    shutil.rmtree(hub)
    load.load_benchmark("lr", "mnist", "lds", str(download_path))
    with pytest.raises(load.BenchmarkNotFoundError, match="--export-upstream"):
        load.load_benchmark("lr", "mnist", "loo", str(download_path))


def test_download_refuses_zip_path_traversal(tmp_path, monkeypatch):
    from dattri.benchmark import load

    hub = tmp_path / "hub" / "mnist_lr"
    hub.mkdir(parents=True)
    with zipfile.ZipFile(hub / "mnist_lr_full.zip", "w") as zf:
        zf.writestr("../../evil.pt", b"x")
    monkeypatch.setattr(load, "REPO_URL", (tmp_path / "hub").as_uri() + "/")
    with pytest.raises(ValueError, match="outside"):
        load.download_benchmark("mnist_lr", tmp_path / "dl" / "benchmark" / "mnist_lr")
    assert not (tmp_path / "dl" / "evil.pt").exists()


def test_load_benchmark_errors(tmp_path, monkeypatch):
    from dattri.benchmark import load

    with pytest.raises(ValueError, match="--export-upstream"):
        load.load_benchmark("lr", "digits", "lds", str(tmp_path))
    with pytest.raises(ValueError, match="metric"):
        load.load_benchmark("lr", "mnist", "brittleness", str(tmp_path))
    monkeypatch.setattr(load, "REPO_URL", "http://127.0.0.1:9/")  # nothing listens: offline
    with pytest.raises(
        load.BenchmarkNotFoundError, match=r"dattri-bench prepare SETTING --export-upstream"
    ):
        load.load_benchmark("lr", "mnist", "lds", str(tmp_path))


def test_export_upstream_then_load_benchmark_matches_dattri_bench_run(tmp_path):
    """prepare --export-upstream -> load_benchmark -> an attributor: same LDS as `run`."""
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.benchmark.cli import main
    from dattri.benchmark.load import load_benchmark
    from dattri.benchmark.settings import get_setting
    from dattri.metric import lds, loo_corr
    from dattri.task import AttributionTask

    cache, export, out = tmp_path / "cache", tmp_path / "export", tmp_path / "out"
    common = ["digits-lr", "--quick", "--quiet", "--cache-dir", str(cache)]
    assert main(["prepare", *common, "--export-upstream", str(export)]) == 0
    assert main(["run", *common, "--methods", "if-explicit", "--out", str(out)]) == 0
    report = json.loads((out / "digits-lr-quick.json").read_text())["results"][0]

    inputs, ground_truth = load_benchmark("lr", "digits", "lds", download_path=str(export))
    setting = get_setting("digits-lr", quick=True)
    root = export / "benchmark" / "digits_lr"
    assert inputs["models_full"] == [root / "models_full" / "0" / "model_weights_0.pt"]
    assert len(inputs["models_half"]) == setting.num_ensemble
    assert ground_truth[0].shape == (setting.num_subsets, 40)
    assert ground_truth[1].shape == (setting.num_subsets, 100)

    model = inputs["model"]
    train_loader = DataLoader(
        inputs["train_dataset"], batch_size=256, sampler=inputs["train_sampler"]
    )
    test_loader = DataLoader(inputs["test_dataset"], batch_size=256, sampler=inputs["test_sampler"])

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    checkpoint = torch.load(inputs["models_full"][0], weights_only=True)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=[checkpoint])
    damping = max(setting.train_config.weight_decay, setting.ihvp_damping)
    attributor = IFAttributorExplicit(task, regularization=damping, verbose=False)
    attributor.cache(train_loader)
    scores = attributor.attribute(train_loader, test_loader)
    corr, _ = lds(scores.double(), ground_truth)
    assert float(torch.nanmean(corr)) == pytest.approx(report["lds"], abs=1e-9)
    assert report["lds"] > 0.6

    _, (loo_values, removed) = load_benchmark("lr", "digits", "loo", str(export))
    loo, _ = loo_corr(scores.double()[removed], (loo_values, removed))
    assert float(torch.nanmean(loo)) == pytest.approx(report["loo"], abs=1e-9)

    # The returned functions: the target is the per-example test loss of a checkpoint,
    # and train_func retrains the setting's model (full-batch SGD here) to the same weights.
    target = inputs["target_func"](inputs["models_full"][0], test_loader)
    model.load_state_dict(checkpoint)
    torch.testing.assert_close(target, _manual_ce(model, test_loader))
    full_loader = DataLoader(inputs["train_dataset"], batch_size=len(inputs["train_dataset"]))
    retrained = inputs["train_func"](full_loader, seed=0)
    for name, value in retrained.state_dict().items():
        torch.testing.assert_close(value, checkpoint[name], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------- dattri_retrain
def test_dattri_retrain_lds_partition_and_loo(mnist_dir, tmp_path):
    from dattri.benchmark.datasets.mnist import (
        create_lr_model,
        create_mnist_dataset,
        loss_mnist_lr,
        loss_mnist_mlp,
    )
    from dattri.metric import calculate_lds_ground_truth, calculate_loo_ground_truth
    from dattri.model_util import SubsetTrainConfig, train_subset_models
    from dattri.script.dattri_retrain import main

    save = tmp_path / "lds"
    base = ["--dataset", "mnist", "--model", "lr", "--data_path", str(mnist_dir), "--quiet"]
    lds_args = [*base, "--mode", "lds", "--train_subset", "40", "--save_path", str(save)]
    lds_args += ["--extra_param", "epoch_num=2", "--seed", "3"]
    main([*lds_args, "--partition", "0,2,4"])
    assert (save / "1" / "model_weights_0.pt").exists()
    assert not (save / "metadata.yml").exists()  # written by the job that completes the run
    main([*lds_args, "--partition", "2,4,4"])
    assert (save / "metadata.yml").exists()
    _, test = create_mnist_dataset(str(mnist_dir))
    test_loader = DataLoader(test, batch_size=16, sampler=SubsetSampler(range(10)))
    values, indices = calculate_lds_ground_truth(loss_mnist_lr, save, test_loader)
    assert values.shape == (4, 10) and indices.shape == (4, 20)

    # The vectorised path trains exactly what the sequential trainer would.
    train, _ = create_mnist_dataset(str(mnist_dir))
    x = torch.stack([train[i][0] for i in range(40)])
    y = torch.stack([train[i][1] for i in range(40)])
    masks = torch.zeros(1, 40)
    masks[0, indices[3]] = 1
    cfg = SubsetTrainConfig(
        epochs=2, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=64, seed=3
    )
    (expected,) = train_subset_models(
        lambda: create_lr_model("mnist"),
        (x, y),
        masks,
        cfg,
        init_seeds=[3 + 3],
        vectorized=False,
        verbose=False,
    )
    saved = torch.load(save / "3" / "model_weights_0.pt", weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value)

    # --no_vectorize: one model at a time with train_mnist_lr, same layout.
    seq = tmp_path / "seq"
    seq_args = [*base, "--mode", "lds", "--train_subset", "40", "--save_path", str(seq)]
    main([*seq_args, "--partition", "0,2,2", "--extra_param", "epoch_num=1", "--no_vectorize"])
    v2, i2 = calculate_lds_ground_truth(loss_mnist_lr, seq, test_loader)
    assert v2.shape == (2, 10) and i2.shape == (2, 20)
    assert "train_mnist_lr" in (seq / "metadata.yml").read_text()

    loo = tmp_path / "loo"
    loo_args = [*base, "--mode", "loo", "--train_subset", "30", "--save_path", str(loo)]
    loo_args[3] = "mlp"  # --model mlp (mnist_mlp; upstream's script only takes lr)
    main([*loo_args, "--partition", "0,3,none", "--extra_param", "epoch_num=1"])
    assert sorted(p.name for p in loo.glob("index_*")) == ["index_0", "index_1", "index_2"]
    loo_values, removed = calculate_loo_ground_truth(loss_mnist_mlp, loo, test_loader)
    assert loo_values.shape == (3, 10) and removed.tolist() == [0, 1, 2]

    from dattri.script.dattri_retrain import key_value_pair

    assert key_value_pair("epoch_num=3") == ("epoch_num", 3)
    assert key_value_pair("lr=0.5") == ("lr", 0.5)
    assert key_value_pair("name=abc") == ("name", "abc")
    # retrain_lds's own arguments may come as --extra_param (upstream forwards them).
    ratio = tmp_path / "ratio"
    ratio_args = [*base, "--mode", "lds", "--train_subset", "40", "--save_path", str(ratio)]
    main([*ratio_args, "--partition", "0,1,1", "--extra_param", "subset_ratio=0.25"])
    assert len((ratio / "0" / "indices.txt").read_text().split()) == 10
    with pytest.raises(SystemExit):
        main([*ratio_args, "--extra_param", "num_subsets=3"])
    with pytest.raises(SystemExit):
        main([*base, "--model", "resnet9", "--mode", "lds"])
    with pytest.raises(SystemExit):
        main([*base, "--mode", "lds", "--partition", "1,2"])


def test_upstream_model_module_paths_name_our_models():
    """Upstream's vendored-model import paths resolve to our implementations (one copy).

    ``dattri.benchmark.models.MusicTransformer`` is our model class itself (upstream: a
    vendored package of that name), so it is not a module alias here.
    """
    from dattri.benchmark.datasets.wikitext2 import create_gpt2_model
    from dattri.benchmark.models import MusicTransformer, gpt, music_transformer
    from dattri.benchmark.models.gpt2 import create_gpt2_model as gpt2_alias
    from dattri.benchmark.models.nanoGPT import model as nano_model

    assert gpt2_alias is create_gpt2_model
    assert nano_model.GPT is gpt.GPT and nano_model.GPTConfig is gpt.GPTConfig
    assert MusicTransformer is music_transformer.MusicTransformer
