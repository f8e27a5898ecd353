"""Build the train and test example tables from a data source (the `prepare` stage).

Run as: python stages/prepare.py --params params.yaml --train-out data/train/epoch_0.parquet \
            --test-out data/test.parquet
or from Python:

    train, test = prepare_examples(DataConfig(source="reasoning_gym", task="leg_counting"))

Every example gets a worked solution in GSM8K format (reasoning lines, then `#### <final answer>`),
because that is what the student is trained on and what evaluation's strict-match filter reads.
Sources: reasoning-gym tasks (generated offline), GSM8K (local files or the hub), CliniFact CSVs
and bAbI text files. Everything is deterministic in `DataConfig.seed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from ..config import DataConfig
from ..schemas import EXAMPLES
from . import babi, clinifact, gsm8k, reasoning_gym
from .common import DataError, Example

__all__ = ["DataError", "Example", "prepare_examples"]


def prepare_examples(
    config: DataConfig, base_dir: Path = Path(".")
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load or generate the examples of `config.source` and split them into train and test.

    Args:
        config: the `data` section of params.yaml.
        base_dir: directory that relative `config.path` values are resolved from.

    Returns:
        (train, test) DataFrames with the columns of `nslora.schemas.EXAMPLES`, ready for
        `write_table(df, path, EXAMPLES)`.

    Raises:
        DataError: a missing or malformed input file, an unknown task or a bad task_config key;
            the message names the file (or params key), the row or line, and the field.
    """
    for key in ("train_size", "test_size"):
        if getattr(config, key) < 1:
            raise DataError(f"data.{key}: must be at least 1, got {getattr(config, key)}")
    loaders: dict[str, Callable[[DataConfig, Path], tuple[list[Example], list[Example]]]] = {
        "reasoning_gym": reasoning_gym.load,
        "gsm8k": gsm8k.load,
        "clinifact": clinifact.load,
        "babi": babi.load,
    }
    if config.source not in loaders:
        raise DataError(
            f"data.source: unknown source {config.source!r}; use one of {list(loaders)}"
        )
    train, test = loaders[config.source](config, Path(base_dir))
    _refuse_overlap(train, test, config)
    return _frame(train, "train", config.system_prompt), _frame(test, "test", config.system_prompt)


def _refuse_overlap(train: list[Example], test: list[Example], config: DataConfig) -> None:
    """A test question that is also a training question measures memory, not learning."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    seen = {norm(e.question): e for e in train}
    shared = [(seen[norm(e.question)], e) for e in test if norm(e.question) in seen]
    if shared:
        first_train, first_test = shared[0]
        raise DataError(
            f"data ({config.source}{'/' + config.task if config.source == 'reasoning_gym' else ''}): "
            f"{len(shared)} test question(s) also in the training set, e.g. test item "
            f"{first_test.index} = training item {first_train.index}: {first_test.question[:80]!r}. "
            "Remove them from one split (or, for generated tasks, widen task_config or change data.seed)")


def _frame(examples: list[Example], split: str, system_prompt: str) -> pd.DataFrame:
    rows = [
        {
            "id": f"{_id_prefix(e.source)}-{split}-{e.index:05d}",
            "split": split,
            "source": e.source,
            "source_index": e.index,
            "system_prompt": system_prompt,
            "question": e.question,
            "solution": e.solution,
            "final_answer": e.answer,
            "original_question": e.question,
            "rewrite_epoch": 0,
            "rewrite_iterations": 0,
            "rewrite_engine": "",
            "rewrite_reason": "",
        }
        for e in examples
    ]
    df = pd.DataFrame(rows, columns=EXAMPLES.names)
    return df.astype({c: "int64" for c in ("source_index", "rewrite_epoch", "rewrite_iterations")})


def _id_prefix(source: str) -> str:
    # "reasoning_gym/leg_counting" -> "leg_counting", "babi/qa1" -> "babi-qa1"
    return source.removeprefix("reasoning_gym/").replace("/", "-")
