"""Named Parquet schemas: checked on every read and write, errors name the file and column."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_examples
from nslora.schemas import EXAMPLES, SAMPLE_STATS, SchemaError, read_table, write_table


def test_round_trip(tmp_path):
    df = make_examples(3)
    path = write_table(df, tmp_path / "t.parquet", EXAMPLES)
    pd.testing.assert_frame_equal(read_table(path, EXAMPLES), df)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pandas(make_examples(2).drop(columns=["solution"])), path)
    with pytest.raises(SchemaError, match=r"bad\.parquet.*nslora\.examples.*missing column\(s\) \['solution'\]"):
        read_table(path, EXAMPLES)


def test_wrong_type_and_wrong_table(tmp_path):
    df = make_examples(2)
    df["source_index"] = "first"
    with pytest.raises(SchemaError, match="source_index"):
        write_table(df, tmp_path / "t.parquet", EXAMPLES)
    path = write_table(make_examples(2), tmp_path / "examples.parquet", EXAMPLES)
    with pytest.raises(SchemaError, match="nslora.sample_stats"):
        read_table(path, SAMPLE_STATS)


def test_null_question_names_the_row(tmp_path):
    df = make_examples(3)
    df.loc[1, "question"] = None
    path = tmp_path / "null.parquet"
    pq.write_table(pa.Table.from_pandas(df, schema=EXAMPLES, preserve_index=False), path)
    with pytest.raises(SchemaError, match=r"row 1: column 'question' is empty"):
        read_table(path, EXAMPLES)


def test_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        read_table(tmp_path / "nope.parquet", EXAMPLES)
