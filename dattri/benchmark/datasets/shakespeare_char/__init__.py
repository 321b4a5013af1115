"""Character-level tinyshakespeare with a nanoGPT model: upstream dattri's ``shakespeare_char``.

Example:
    >>> from dattri.benchmark.datasets.shakespeare_char import (
    ...     create_shakespeare_dataset, prepare_shakespeare_char)
    >>> path = prepare_shakespeare_char()  # doctest: +SKIP
    >>> train, val = create_shakespeare_dataset(path)  # doctest: +SKIP
"""

from dattri.benchmark.datasets.shakespeare_char.data import (
    ShakespeareCharDataset,
    create_shakespeare_dataset,
    load_meta,
    prepare_shakespeare_char,
)
from dattri.benchmark.datasets.shakespeare_char.shakespeare_nanogpt import (
    SHAKESPEARE_GPT_CONFIG,
    create_nanogpt_model,
    load_nanogpt_checkpoint,
    loss_shakespeare_nanogpt,
    save_nanogpt_checkpoint,
    train_shakespeare_nanogpt,
)
from dattri.benchmark.models.gpt import GPT, GPTConfig
from dattri.benchmark.models.train_gpt import NanoGPTTrainConfig

__all__ = [
    "GPT",
    "SHAKESPEARE_GPT_CONFIG",
    "GPTConfig",
    "NanoGPTTrainConfig",
    "ShakespeareCharDataset",
    "create_nanogpt_model",
    "create_shakespeare_dataset",
    "load_meta",
    "load_nanogpt_checkpoint",
    "loss_shakespeare_nanogpt",
    "prepare_shakespeare_char",
    "save_nanogpt_checkpoint",
    "train_shakespeare_nanogpt",
]
