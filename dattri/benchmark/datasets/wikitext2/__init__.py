"""WikiText-2 with GPT-2 (optional extra ``nlp``): upstream dattri's ``wikitext2`` module."""

from dattri.benchmark.datasets.wikitext2 import data, wikitext2_gpt2
from dattri.benchmark.datasets.wikitext2.data import *  # noqa: F403
from dattri.benchmark.datasets.wikitext2.wikitext2_gpt2 import *  # noqa: F403

__all__ = [*data.__all__, *wikitext2_gpt2.__all__]
