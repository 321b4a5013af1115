"""Upstream's module path ``dattri.benchmark.models.gpt2``: GPT-2 through ``transformers``.

The implementation lives with the WikiText-2 benchmark
(:func:`dattri.benchmark.datasets.wikitext2.create_gpt2_model`); this module only keeps
upstream's import path working.
"""

from __future__ import annotations

from dattri.benchmark.datasets.wikitext2 import create_gpt2_model

__all__ = ["create_gpt2_model"]
