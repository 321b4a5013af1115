"""nanoGPT's ``model.py`` import path: ``from ...models.nanoGPT.model import GPT, GPTConfig``."""

from __future__ import annotations

from dattri.benchmark.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
