"""Benchmark settings: dataset, model, training recipe and ground-truth sizes.

A :class:`Setting` is everything ``dattri-bench prepare`` needs to train the model(s)
and build LDS/LOO ground truth, and everything ``dattri-bench run`` needs to build
attribution tasks. All settings train with the same deterministic recipe for the
attributed model and for every ground-truth model (full-batch or minibatch SGD with
momentum and L2 weight decay, :class:`~dattri.model_util.SubsetTrainConfig`), so that
ground truth and attribution describe the same training algorithm.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dattri.benchmark.corpus_lm import create_corpus_lm, load_corpus, sequence_loss
from dattri.benchmark.datasets.digits import load_digits_dataset
from dattri.benchmark.generative import (
    GPT2Factory,
    create_music_lm,
    create_shakespeare_lm,
    load_maestro_windows,
    load_shakespeare_blocks,
    load_wikitext2_blocks,
)
from dattri.benchmark.models import create_lr_model, create_mlp_model, create_resnet9_model
from dattri.model_util.subset_train import SubsetTrainConfig

__all__ = ["SETTINGS", "Setting", "get_setting"]

Tensors = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Setting:
    """One benchmark setting.

    Attributes:
        name: registry key, e.g. ``"digits-lr"``.
        description: one line for ``dattri-bench list``.
        load_data: ``f(data_dir, download=False) -> (x_train, y_train, x_test, y_test)``
            (a loader without ``download`` is called as ``f(data_dir)``).
        model_factory: builds a fresh model (called under a fixed seed).
        train_config: training recipe shared by all models of the setting.
        final_layer: name of the last linear layer (RPS, last-layer methods).
        num_subsets: LDS subsets.
        subset_ratio: fraction of training samples per LDS subset.
        runs_per_subset: models per LDS subset (averaged).
        loo: also build leave-one-out ground truth.
        loo_size: number of training samples whose LOO model is trained (the first
            ``loo_size``; ``None`` = all).
        num_ensemble: models trained on random half subsets (TRAK-k ensembles).
        num_tracin_checkpoints: checkpoints along the training trajectory (TracIn).
        noise_ratio: fraction of flipped training labels (noisy-label AUC), 0 = clean.
        ihvp_damping: damping added to the Hessian by the IF methods (the weight
            decay for convex models; larger for non-convex ones, whose Hessian is
            indefinite).
        quick: overrides applied by ``--quick`` (small, for CI and smoke tests).
        inapplicable: ``{method: reason}`` for methods that do not apply to the
            setting (``dattri-bench list`` shows them; ``run`` reports the reason).
        method_kwargs: ``{method: {option: value}}`` setting-specific method options
            (e.g. LoGra's projection size for small layers).
        eval_batch_size: batch size of the methods' data loaders and of the
            ground-truth evaluation (None: the runner's default, 256, and the whole
            test set at once); bounds memory for large models.
        self_attribution: also compute self-influence with the inner-product
            methods (used for the noisy-label AUC; for the IF solvers it costs one
            inverse-HVP per training sample).
    """

    name: str
    description: str
    load_data: Callable[[Path | None], Tensors]
    model_factory: Callable[[], nn.Module]
    train_config: SubsetTrainConfig
    final_layer: str
    num_subsets: int = 100
    subset_ratio: float = 0.5
    runs_per_subset: int = 1
    loo: bool = False
    loo_size: int | None = None
    num_ensemble: int = 10
    num_tracin_checkpoints: int = 4
    noise_ratio: float = 0.0
    ihvp_damping: float = 1e-2
    quick: dict = field(default_factory=dict)
    inapplicable: dict = field(default_factory=dict)
    method_kwargs: dict = field(default_factory=dict)
    eval_batch_size: int | None = None
    self_attribution: bool = True

    def quick_version(self) -> Setting:
        """The setting with its ``quick`` overrides applied."""
        overrides = dict(self.quick)
        if "train_config" in overrides and isinstance(overrides["train_config"], dict):
            overrides["train_config"] = dataclasses.replace(
                self.train_config, **overrides["train_config"]
            )
        return dataclasses.replace(self, **overrides, quick={})


def _digits(n_train: int, n_test: int) -> Callable[[Path | None], Tensors]:
    def load(data_dir: Path | None, download: bool = False) -> Tensors:
        train, test = load_digits_dataset(n_train=n_train, n_test=n_test, seed=0)
        return (*train.tensors, *test.tensors)

    return load


def _first(train: Dataset, test: Dataset, n_train: int, n_test: int, flatten: bool) -> Tensors:
    """``(x_train, y_train, x_test, y_test)`` of the first samples of each split."""
    xs = []
    for ds, n in ((train, n_train), (test, n_test)):
        x = torch.stack([ds[i][0] for i in range(n)])
        y = torch.tensor([int(ds[i][1]) for i in range(n)])
        xs += [x.reshape(n, -1) if flatten else x, y]
    return tuple(xs)  # type: ignore[return-value]


def _mnist(n_train: int, n_test: int, flatten: bool = True) -> Callable[[Path | None], Tensors]:
    def load(data_dir: Path | None, download: bool = False) -> Tensors:
        from dattri.benchmark.datasets.mnist import create_mnist_dataset

        return _first(*create_mnist_dataset(data_dir, download=download), n_train, n_test, flatten)

    return load


def _cifar2(n_train: int, n_test: int) -> Callable[[Path | None], Tensors]:
    def load(data_dir: Path | None, download: bool = False) -> Tensors:
        from dattri.benchmark.datasets.cifar import create_cifar2_dataset

        return _first(*create_cifar2_dataset(data_dir, download=download), n_train, n_test, False)

    return load


_LR_TRAIN = SubsetTrainConfig(
    epochs=1500, lr=0.5, momentum=0.9, weight_decay=1e-2, batch_size=None, seed=0
)
_MLP_TRAIN = SubsetTrainConfig(
    epochs=1500, lr=0.2, momentum=0.9, weight_decay=1e-3, batch_size=None, seed=0
)
_QUICK_DIGITS = {
    "load_data": _digits(200, 40),
    "num_subsets": 20,
    "num_ensemble": 3,
    "num_tracin_checkpoints": 2,
    "loo_size": 20,
    "train_config": {"epochs": 200},
}

#: the digits models: factory, final layer and default (full-batch) recipe
_DIGITS_MODELS: dict[str, tuple[Callable[[], nn.Module], str, SubsetTrainConfig]] = {
    "lr": (lambda: create_lr_model("digits"), "linear", _LR_TRAIN),
    "mlp": (lambda: create_mlp_model("digits", hidden=(64,)), "fc2", _MLP_TRAIN),
}


def _digits_setting(model: str, **fields: object) -> Setting:
    """A setting on digits (1000 train / 200 test) with the digits ``model``.

    Defaults: the model's factory, final layer and recipe from
    :data:`_DIGITS_MODELS`, damping 1e-2 and the :data:`_QUICK_DIGITS` quick
    version; ``fields`` override them.
    """
    factory, final_layer, train_config = _DIGITS_MODELS[model]
    defaults = {
        "load_data": _digits(1000, 200),
        "model_factory": factory,
        "train_config": train_config,
        "final_layer": final_layer,
        "ihvp_damping": 1e-2,
        "quick": _QUICK_DIGITS,
    }
    return Setting(**{**defaults, **fields})


def _not_applicable(n_params: str) -> dict[str, str]:
    return {
        "if-explicit": f"not run: the dense Hessian of {n_params} parameters does not fit "
        "in memory; if-cg, if-lissa and if-arnoldi solve the same system",
        "rps": "representer points need one classification output per sample; "
        "a sequence has one next-token prediction per position",
        "knn-shapley": "KNN-Shapley needs one label per sample and a feature "
        "space for the inputs; sequences have a target per token",
        "dvemb": "not run: it records the per-sample gradients of every training step, "
        f"hundreds of GB to TB for {n_params} parameters (the benchmark's limit is 1 GiB)",
    }


#: the iHVP solver budgets of the generative settings at upstream's size
_SEQUENCE_SOLVERS = {
    "if-cg": {"max_iter": 20},
    "if-lissa": {"recursion_depth": 100},
    "if-arnoldi": {"proj_dim": 50, "max_iter": 100},
}


def _sequence_setting(
    *,
    n_params: str,
    train: dict,
    quick_load_data: Callable[[Path | None], Tensors],
    quick_epochs: int,
    method_kwargs: dict | None = None,
    **fields: object,
) -> Setting:
    """A generative setting at upstream's size with the shared sequence-model defaults.

    SGD (momentum 0.9, weight decay 1e-4, batches of 64 trained 8 models at a time,
    the mean next-token loss, batch order seed 0), LDS on 50 half subsets, damping
    0.1, no self-influence pass, the not-applicable methods for ``n_params``
    parameters, the iHVP budgets of :data:`_SEQUENCE_SOLVERS`, and a ``--quick``
    version (16 subsets, 2 ensemble models, 2 TracIn checkpoints) on
    ``quick_load_data``.
    """
    config = {
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "model_chunk_size": 8,
        "loss": sequence_loss,
        "seed": 0,
        **train,
    }
    defaults = {
        "num_subsets": 50,
        "runs_per_subset": 2,
        "num_ensemble": 5,
        "num_tracin_checkpoints": 3,
        "ihvp_damping": 1e-1,
        "eval_batch_size": 16,
    }
    return Setting(
        train_config=SubsetTrainConfig(**config),
        quick={
            "load_data": quick_load_data,
            "num_subsets": 16,
            "num_ensemble": 2,
            "num_tracin_checkpoints": 2,
            "train_config": {"epochs": quick_epochs},
        },
        self_attribution=False,
        inapplicable=_not_applicable(n_params),
        method_kwargs=copy.deepcopy(_SEQUENCE_SOLVERS) if method_kwargs is None else method_kwargs,
        **{**defaults, **fields},
    )


#: the generative settings at upstream's sizes (GPU recommended); each has a
#: ``--quick`` version sized for a few GPU minutes.
_GENERATIVE = [
    _sequence_setting(
        name="shakespeare-nanogpt",
        description="char-level nanoGPT at upstream's size (6 layers, 384-d, 10.8M params) "
        "on 256-char tinyshakespeare blocks (all ~3.9k train / 200 val blocks); target = "
        "mean next-char loss; GPU recommended (data: --download or --data-dir DIR)",
        load_data=load_shakespeare_blocks(n_train=None, n_test=200, block_size=256),
        model_factory=create_shakespeare_lm,
        # SGD with lr 0.1 diverges at this size (CPU probe: 6x384 model, context 64,
        # batch 16); 0.03 and 0.01 train stably
        train={"epochs": 20, "lr": 0.03},
        final_layer="gpt.lm_head",
        n_params="10.8M",
        quick_load_data=load_shakespeare_blocks(n_train=512, n_test=32, block_size=256),
        quick_epochs=20,
    ),
    _sequence_setting(
        name="wikitext2-gpt2",
        description="GPT-2 124M (transformers; pretrained weights from the Hugging Face "
        "cache, else config-built) fine-tuned on 512-token WikiText-2 blocks (all train / "
        "all validation blocks); target = mean next-token loss; GPU needed "
        "(data: --download or --data-dir DIR)",
        load_data=load_wikitext2_blocks(n_train=None, n_test=None, block_size=512),
        model_factory=GPT2Factory(),
        train={"epochs": 3, "lr": 1e-3, "batch_size": 8, "model_chunk_size": 2},
        final_layer="lm.lm_head",
        # pretrained initialisation + the shared batch order make every run of a
        # subset the same model: one run per subset, more subsets instead
        runs_per_subset=1,
        num_ensemble=3,
        eval_batch_size=4,
        n_params="124M",
        quick_load_data=load_wikitext2_blocks(n_train=256, n_test=32, block_size=128),
        quick_epochs=2,
        method_kwargs={
            "if-cg": {"max_iter": 10},
            "if-lissa": {"recursion_depth": 50},
            # Krylov basis of max_iter vectors of 124M parameters
            "if-arnoldi": {"proj_dim": 20, "max_iter": 30},
        },
    ),
    _sequence_setting(
        name="maestro-musictransformer",
        description="Music Transformer at upstream's size (6 layers, 512-d, relative "
        "attention, 13.1M params) on 256-event MAESTRO v2.0.0 windows (5000 train / 178 "
        "validation); target = mean next-event loss; GPU recommended "
        "(data: --download or --data-dir DIR)",
        load_data=load_maestro_windows(n_train=5000, n_test=178, block_size=256),
        model_factory=create_music_lm,
        # lr probed on CPU only for stability (6x512 model, context 64, batch 16)
        train={"epochs": 10, "lr": 0.03},
        final_layer="lm.Wout",
        n_params="13.1M",
        quick_load_data=load_maestro_windows(n_train=512, n_test=32, block_size=256),
        quick_epochs=5,
    ),
]

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        _digits_setting(
            "lr",
            name="digits-lr",
            description="scikit-learn digits (1000 train / 200 test), L2 logistic regression",
            loo=True,
            loo_size=200,
        ),
        _digits_setting(
            "mlp",
            name="digits-mlp",
            description="scikit-learn digits (1000 train / 200 test), MLP 64-64-10",
        ),
        _digits_setting(
            "mlp",
            name="digits-mlp-sgd",
            description="digits MLP 64-64-10 trained by minibatch SGD for 10 epochs "
            "(batch 64, lr 0.02; not converged: the IF assumption does not hold)",
            train_config=SubsetTrainConfig(
                epochs=10, lr=0.02, momentum=0.9, weight_decay=1e-3, batch_size=64, seed=0
            ),
            quick={**_QUICK_DIGITS, "train_config": {"epochs": 4}},
        ),
        _digits_setting(
            "lr",
            name="digits-lr-noisy",
            description="digits LR with 10% flipped training labels (noisy-label AUC)",
            noise_ratio=0.1,
            num_subsets=20,
        ),
        Setting(
            name="mnist-lr",
            description="MNIST-10 (5000 train / 500 test), L2 logistic regression "
            "(needs the MNIST files: --data-dir or --download)",
            load_data=_mnist(5000, 500),
            model_factory=lambda: create_lr_model("mnist"),
            train_config=dataclasses.replace(_LR_TRAIN, epochs=1000, lr=0.1),
            final_layer="linear",
            ihvp_damping=1e-2,
        ),
        Setting(
            name="mnist-mlp",
            description="MNIST-10 (5000 train / 500 test), MLP 784-128-64-10 "
            "(needs the MNIST files)",
            load_data=_mnist(5000, 500),
            model_factory=lambda: create_mlp_model("mnist", hidden=(128, 64)),
            train_config=dataclasses.replace(_MLP_TRAIN, epochs=500, lr=0.1),
            final_layer="fc3",
            ihvp_damping=1e-2,
        ),
        Setting(
            name="mnist-mlp-sgd",
            description="MNIST-10 (5000 train / 500 test), MLP 784-128-64-10 trained by "
            "minibatch SGD for 3 epochs (batch 64, lr 0.05, momentum 0.9; not converged: "
            "the IF assumption does not hold; needs the MNIST files)",
            load_data=_mnist(5000, 500),
            model_factory=lambda: create_mlp_model("mnist", hidden=(128, 64)),
            train_config=SubsetTrainConfig(
                epochs=3, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=64, seed=0
            ),
            final_layer="fc3",
            ihvp_damping=1e-2,
        ),
        Setting(
            name="cifar2-resnet9",
            description="CIFAR-2 cat/dog (5000 train / 500 test), ResNet-9 "
            "(needs the CIFAR-10 files; GPU recommended)",
            load_data=_cifar2(5000, 500),
            model_factory=lambda: create_resnet9_model(num_classes=2),
            train_config=SubsetTrainConfig(
                epochs=10, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, seed=0
            ),
            final_layer="linear",
            num_subsets=50,
            num_ensemble=5,
            ihvp_damping=1e-1,
        ),
        Setting(
            name="corpus-nanogpt",
            description="char-level nanoGPT (1 layer, 16-d, 5.8k params) on 32-char blocks "
            "of the shipped corpus (197 train / 24 test blocks); target = mean next-char "
            "loss; offline",
            load_data=load_corpus(n_test=24),
            model_factory=create_corpus_lm,
            train_config=SubsetTrainConfig(
                epochs=20,
                lr=0.5,
                momentum=0.9,
                weight_decay=1e-3,
                batch_size=32,
                loss=sequence_loss,
                seed=0,
            ),
            final_layer="gpt.lm_head",
            num_subsets=32,
            runs_per_subset=2,
            num_ensemble=4,
            num_tracin_checkpoints=3,
            ihvp_damping=1e-1,
            quick={
                "num_subsets": 16,
                "num_ensemble": 2,
                "num_tracin_checkpoints": 2,
                "train_config": {"epochs": 10},
                "method_kwargs": {
                    "if-cg": {"max_iter": 8},
                    "if-lissa": {"recursion_depth": 20, "batch_size": 25},
                    "if-arnoldi": {"proj_dim": 50, "max_iter": 60},
                    "logra": {"proj_dim_per_layer": 256},
                    "factgrass": {"proj_dim_per_layer": 256},
                },
            },
            self_attribution=False,
            inapplicable={
                "if-explicit": "not run: the dense (5.8k)^2 Hessian takes too long on "
                "CPU; if-cg, if-lissa and if-arnoldi solve the same system",
                "rps": "representer points need one classification output per sample; "
                "a sequence has one next-token prediction per position",
                "knn-shapley": "KNN-Shapley needs one label per sample and a feature "
                "space for the inputs; sequences have a target per token",
            },
            method_kwargs={
                # iteration counts for a 2-core CPU budget (each HVP is a pass over the data)
                "if-cg": {"max_iter": 20},
                "if-lissa": {"recursion_depth": 50},
                "if-arnoldi": {"proj_dim": 100, "max_iter": 150},
                "logra": {"proj_dim_per_layer": 256},
                "factgrass": {"proj_dim_per_layer": 256},
            },
        ),
        *_GENERATIVE,
    ]
}


def get_setting(name: str, quick: bool = False) -> Setting:
    """Look up a setting by name.

    Args:
        name: a key of :data:`SETTINGS`.
        quick: apply the setting's quick overrides.

    Returns:
        The setting.

    Raises:
        ValueError: if the name is unknown (the message lists the names).
    """
    if name not in SETTINGS:
        msg = f"Unknown setting {name!r}; available: {sorted(SETTINGS)}."
        raise ValueError(msg)
    setting = SETTINGS[name]
    return setting.quick_version() if quick else setting
