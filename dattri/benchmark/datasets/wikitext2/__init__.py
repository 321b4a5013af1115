"""WikiText-2 with GPT-2 (optional extra ``nlp``): upstream dattri's ``wikitext2`` module."""

from dattri.benchmark.datasets.wikitext2.data import (
    GPT2_TOKENIZER,
    GROUP_LINES,
    WIKITEXT2_SHA256,
    WIKITEXT2_SIZE,
    WIKITEXT2_URLS,
    TokenBlockDataset,
    create_wikitext2_dataset,
    download_wikitext2,
    group_into_blocks,
    import_transformers,
    read_wikitext2_lines,
)
from dattri.benchmark.datasets.wikitext2.wikitext2_gpt2 import (
    GPT2_MODEL,
    create_gpt2_model,
    loss_wikitext2_gpt2,
    per_example_lm_loss,
    train_wikitext2_gpt2,
)

__all__ = [
    "GPT2_MODEL",
    "GPT2_TOKENIZER",
    "GROUP_LINES",
    "WIKITEXT2_SHA256",
    "WIKITEXT2_SIZE",
    "WIKITEXT2_URLS",
    "TokenBlockDataset",
    "create_gpt2_model",
    "create_wikitext2_dataset",
    "download_wikitext2",
    "group_into_blocks",
    "import_transformers",
    "loss_wikitext2_gpt2",
    "per_example_lm_loss",
    "read_wikitext2_lines",
    "train_wikitext2_gpt2",
]
