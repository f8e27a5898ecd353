"""Named Parquet schemas, validated on every read and write.

Every table the pipeline hands from one stage to the next has a schema constant here. `write_table`
and `read_table` refuse tables whose columns or types differ, naming the file and the column, and
writes are atomic (temporary file + rename) so a killed stage never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class SchemaError(ValueError):
    """A table that does not match its named schema."""


# One training or test example. `question` is what the model sees (possibly rewritten by a symbolic
# update); `original_question` keeps the source text. `solution` is the worked answer the model is
# trained on, ending in '#### <final_answer>'.
EXAMPLES = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("source_index", pa.int64()),
        ("system_prompt", pa.string()),
        ("question", pa.string()),
        ("solution", pa.string()),
        ("final_answer", pa.string()),
        ("original_question", pa.string()),
        ("rewrite_epoch", pa.int64()),
        ("rewrite_iterations", pa.int64()),
        ("rewrite_engine", pa.string()),
        ("rewrite_reason", pa.string()),
    ],
    metadata={"name": "nslora.examples", "version": "1"},
)

# Per-sample statistics of one LoRA epoch: the loss and gradient norm (over the LoRA parameters) of
# each sample, measured in the training pass itself, in the batch it was trained in.
SAMPLE_STATS = pa.schema(
    [
        ("id", pa.string()),
        ("epoch", pa.int64()),
        ("batch_index", pa.int64()),
        ("loss", pa.float64()),
        ("grad_norm", pa.float64()),
        ("answer_tokens", pa.int64()),
        ("tokens", pa.int64()),
    ],
    metadata={"name": "nslora.sample_stats", "version": "1"},
)

# The criterion's verdict on every training sample after an epoch: its score (lower = stalled,
# a candidate for a symbolic update), rank among eligible samples, whether it was selected, and for
# selected samples the student's answer and whether it was correct.
SELECTION = pa.schema(
    [
        ("id", pa.string()),
        ("epoch", pa.int64()),
        ("criterion", pa.string()),
        ("score", pa.float64()),
        ("eligible", pa.bool_()),
        ("rank", pa.int64()),
        ("selected", pa.bool_()),
        ("student_output", pa.string()),
        ("student_answer", pa.string()),
        ("correct", pa.bool_()),
    ],
    metadata={"name": "nslora.selection", "version": "1"},
)

# One symbolically updated sample of one epoch: what was proposed, what was kept, and why.
REWRITES = pa.schema(
    [
        ("id", pa.string()),
        ("epoch", pa.int64()),
        ("iterations", pa.int64()),            # proposals asked for (including a rejected last one)
        ("original_question", pa.string()),    # the source text, before any epoch's rewrite
        ("question_before", pa.string()),      # the question trained on in this epoch
        ("proposed_question", pa.string()),    # the last proposal, accepted or not ('' if none)
        ("question_after", pa.string()),       # the question the next epoch trains on
        ("accepted", pa.bool_()),              # question_after differs from question_before
        ("reason", pa.string()),               # 'correct', 'max_iters' or why the last step failed
        ("feedback", pa.string()),             # the teacher's critiques, one per iteration
        ("student_output_before", pa.string()),
        ("student_output_after", pa.string()),
        ("correct_after", pa.bool_()),
        ("engine", pa.string()),
    ],
    metadata={"name": "nslora.rewrites", "version": "1"},
)

# One evaluated test question: what the model generated and what was extracted from it.
PREDICTIONS = pa.schema(
    [
        ("id", pa.string()),
        ("epoch", pa.int64()),
        ("question", pa.string()),
        ("final_answer", pa.string()),
        ("output", pa.string()),
        ("flexible_extract", pa.string()),
        ("strict_match", pa.string()),
        ("correct_flexible", pa.bool_()),
        ("correct_strict", pa.bool_()),
    ],
    metadata={"name": "nslora.predictions", "version": "1"},
)


def _schema_name(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(b"name", b"table").decode()


def _check(table: pa.Table, schema: pa.Schema, path: Path | str) -> None:
    names = table.schema.names
    expected = schema.names
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        raise SchemaError(
            f"{path}: does not match schema {_schema_name(schema)}: "
            + (f"missing column(s) {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected column(s) {extra}" if extra else "")
            + ". Regenerate it with the stage that writes it (dvc repro)."
        )
    for f in schema:
        actual = table.schema.field(f.name).type
        if actual != f.type and not (pa.types.is_null(actual) and table.num_rows == 0):
            raise SchemaError(
                f"{path}: column '{f.name}' has type {actual}, schema {_schema_name(schema)} "
                f"needs {f.type}."
            )
        if table.column(f.name).null_count and f.name in ("id", "question", "final_answer"):
            row = table.column(f.name).to_pandas().isna().to_numpy().nonzero()[0][0]
            raise SchemaError(f"{path}: row {row}: column '{f.name}' is empty (null).")


def system_prompt_of(table: pd.DataFrame, what: str = "the training table") -> str:
    """The one system prompt of a training table ("" when it has no rows). Every row carries it, so
    a table stays self-contained; the pipeline always writes the same prompt into every row."""
    prompts = table["system_prompt"].unique()
    if len(prompts) > 1:
        raise ValueError(f"{what} carries {len(prompts)} different system prompts; a training table has one")
    return str(prompts[0]) if len(prompts) else ""


def require_columns(df: pd.DataFrame, schema: pa.Schema, what: str) -> None:
    """Check that an in-memory table has every column of `schema` (extra columns are allowed)."""
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise SchemaError(f"{what}: missing column(s) {missing} of schema {_schema_name(schema)}")


def to_table(df: pd.DataFrame, schema: pa.Schema, path: Path | str = "<table>") -> pa.Table:
    """Convert a DataFrame to an Arrow table of exactly `schema` (column order, types)."""
    missing = [n for n in schema.names if n not in df.columns]
    extra = [c for c in df.columns if c not in schema.names]
    if missing or extra:
        raise SchemaError(
            f"{path}: cannot write as {_schema_name(schema)}: missing {missing}, unexpected {extra}"
        )
    try:
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SchemaError(f"{path}: cannot write as {_schema_name(schema)}: {err}") from err
    _check(table, schema, path)
    return table


def write_table(df: pd.DataFrame, path: Path | str, schema: pa.Schema) -> Path:
    """Validate `df` against `schema` and write it atomically to `path`."""
    path = Path(path)
    table = to_table(df, schema, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_table(path: Path | str | BinaryIO, schema: pa.Schema, name: str | None = None) -> pd.DataFrame:
    """Read `path` (or an open binary stream, reported as `name`) and check it against `schema`.

    Raises:
        FileNotFoundError: the file does not exist.
        SchemaError: columns or types differ, naming the file and the column.
    """
    if not hasattr(path, "read"):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file (run the stage that writes it: dvc repro)")
    table = pq.read_table(path)
    _check(table, schema, name or path)
    return table.select(schema.names).to_pandas()


# The published remade dataset (data/remade/train.parquet): one row per training example after the
# last epoch, ready for fine-tuning another model on `question` -> `answer`. `rewritten` is True when
# `question` differs from the source text `original_question`; `criterion` is the run's selection
# rule (it judged every row), `teacher` the engine that wrote this row's question ('' if none).
REMADE = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),             # the final question (rewritten or the source text)
        ("original_question", pa.string()),    # the source dataset's question
        ("answer", pa.string()),               # the worked gold answer, ending '#### <final_answer>'
        ("final_answer", pa.string()),
        ("system_prompt", pa.string()),        # the system prompt after the last epoch
        ("source", pa.string()),               # e.g. 'gsm8k', 'reasoning_gym/leg_counting'
        ("source_index", pa.int64()),          # row of the example in its source
        ("rewritten", pa.bool_()),
        ("rewrite_epoch", pa.int64()),         # epoch of the last accepted rewrite (0 = none)
        ("rewrite_iterations", pa.int64()),
        ("criterion", pa.string()),
        ("teacher", pa.string()),
        ("rewrite_reason", pa.string()),       # 'correct' / 'max_iters' for rewrites, else ''
    ],
    metadata={"name": "nslora.remade", "version": "1"},
)
