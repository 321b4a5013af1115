"""Character-level tinyshakespeare with a nanoGPT model: upstream dattri's ``shakespeare_char``.

Example:
    >>> from dattri.benchmark.datasets.shakespeare_char import (
    ...     create_shakespeare_dataset, prepare_shakespeare_char)
    >>> path = prepare_shakespeare_char()  # doctest: +SKIP
    >>> train, val = create_shakespeare_dataset(path)  # doctest: +SKIP
"""

from dattri.benchmark.datasets.shakespeare_char import data, shakespeare_nanogpt
from dattri.benchmark.datasets.shakespeare_char.data import *  # noqa: F403
from dattri.benchmark.datasets.shakespeare_char.shakespeare_nanogpt import *  # noqa: F403
from dattri.benchmark.models.gpt import GPT, GPTConfig
from dattri.benchmark.models.train_gpt import NanoGPTTrainConfig

__all__ = [*data.__all__, *shakespeare_nanogpt.__all__, "GPT", "GPTConfig", "NanoGPTTrainConfig"]
