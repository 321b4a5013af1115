"""Upstream's module path ``dattri.benchmark.models.nanoGPT`` (a vendored nanoGPT there).

Here it names our own nanoGPT-style model, :mod:`dattri.benchmark.models.gpt`
(``GPT``, ``GPTConfig``; nanoGPT's parameter names, so its ``ckpt.pt`` files load).
"""

from __future__ import annotations

from dattri.benchmark.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
