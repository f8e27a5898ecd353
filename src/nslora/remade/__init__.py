"""The remade dataset: the training set after the last symbolic update, with its dataset card.

`synthesize` turns the last epoch's EXAMPLES table (`data/train/epoch_N.parquet`) and the per-epoch
REWRITES logs (`data/rewrites/epoch_k.parquet`) into a table of schema `nslora.schemas.REMADE` and a
Hugging Face style dataset card (Markdown with YAML front matter). The stage
`stages/synthesize_dataset.py` writes both to `data/remade/`; DVC versions and publishes them:

    table, card = synthesize(final_train, [log_1, log_2], criterion="loss_ratio",
                             teacher="openai:gpt-4o", method="nslora",
                             source_license=SOURCE_LICENSES["gsm8k"])
    write_table(table, "data/remade/train.parquet", REMADE)

The gold answers are never rewritten: only questions (and maybe the system prompt) change, so the
remade set fine-tunes other models on the same targets with clearer questions.
"""

from .card import COLUMN_DESCRIPTIONS, SOURCE_LICENSES, dataset_card
from .table import remade_table, rewrite_counts, synthesize

__all__ = ["COLUMN_DESCRIPTIONS", "SOURCE_LICENSES", "dataset_card", "remade_table", "rewrite_counts", "synthesize"]
