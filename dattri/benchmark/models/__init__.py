"""Benchmark models in plain torch (no torchvision) and their training helpers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dattri.benchmark.models._specs import DATASET_SPECS
from dattri.benchmark.models.gpt import GPT, GPTConfig, create_gpt_model
from dattri.benchmark.models.linear import (
    LogisticRegression,
    LogisticRegressionMnist,
    create_lr_model,
)
from dattri.benchmark.models.mlp import MLP, MLPMnist, create_mlp_model
from dattri.benchmark.models.music_transformer import MusicTransformer, MusicTransformerConfig
from dattri.benchmark.models.resnet9 import ResNet9, create_resnet9_model
from dattri.benchmark.models.resnet18 import ResNet18, create_resnet18_model
from dattri.benchmark.models.train import (
    full_batch_objective,
    train_classifier,
    train_full_batch,
)

#: Model names usable with :func:`create_model` (upstream's list, same order).
SUPPORTED_MODELS = ["lr", "mlp", "resnet9", "resnet18", "musictransformer", "nanogpt"]


def _create_musictransformer(**kwargs: object) -> nn.Module:
    from dattri.benchmark.datasets.maestro import create_musictransformer_model

    return create_musictransformer_model(**kwargs)  # type: ignore[arg-type]


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "lr": create_lr_model,
    "mlp": create_mlp_model,
    "resnet9": create_resnet9_model,
    "resnet18": create_resnet18_model,
    "musictransformer": _create_musictransformer,
    "nanogpt": create_gpt_model,
}


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Create a benchmark model by name.

    Args:
        name: One of :data:`SUPPORTED_MODELS`.
        **kwargs: Passed to the factory (``create_lr_model(dataset=...)``,
            ``create_mlp_model(dataset=...)``, ``create_resnet9_model(num_classes=...)``,
            ``create_gpt_model(**GPTConfig fields)``).

    Returns:
        A freshly initialised model.

    Raises:
        ValueError: If ``name`` is not supported.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        msg = f"Unknown model {name!r}; supported: {SUPPORTED_MODELS}."
        raise ValueError(msg) from None
    return factory(**kwargs)


__all__ = [
    "DATASET_SPECS",
    "GPT",
    "MLP",
    "SUPPORTED_MODELS",
    "GPTConfig",
    "LogisticRegression",
    "LogisticRegressionMnist",
    "MLPMnist",
    "MusicTransformer",
    "MusicTransformerConfig",
    "ResNet9",
    "ResNet18",
    "create_gpt_model",
    "create_lr_model",
    "create_mlp_model",
    "create_model",
    "create_resnet9_model",
    "create_resnet18_model",
    "full_batch_objective",
    "train_classifier",
    "train_full_batch",
]
