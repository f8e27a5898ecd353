"""What every data source shares: `Example`, `DataError`, seeded sampling, and reading input files
so that a bad one is named with its line (UTF-8 text, CSV rows that must match their header).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

from ..config import DataConfig


class DataError(ValueError):
    """Malformed or missing input data. The message names the file, the row (0-based, as in
    `source_index`) or line (1-based, as in an editor), the field, and what to do."""


class Example(NamedTuple):
    source: str  # "reasoning_gym/leg_counting", "gsm8k", "clinifact", "babi/qa1"
    index: int  # row index in the source
    question: str
    solution: str  # reasoning lines, then "#### <answer>"
    answer: str


def sample(examples: list[Example], size: int, seed: int) -> list[Example]:
    # Shuffle everything, then cut: a larger size only appends examples, and all rows are kept
    # in a seeded order when size exceeds them.
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:size]


def data_directory(config: DataConfig, base_dir: Path, what: str) -> Path:
    if config.path is None:
        raise DataError(f"data.path: not set; {config.source!r} needs the directory with {what}")
    directory = (base_dir / Path(config.path).expanduser())
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (data.path); it must hold {what}")
    return directory


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{file}: line {line}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save the file as UTF-8") from None


def csv_rows(file: Path) -> list[dict[str, str]]:
    """The data rows of a CSV file as header -> value dicts.

    Every row must have exactly the header's fields: pandas would take a row with one extra field
    as having an index column, or drop the extra value, shifting or losing data without a word.
    """
    import csv
    import io

    # A StringIO splits lines only at \n and \r (str.splitlines would also split quoted fields at
    # U+2028 and friends, which abstracts contain).
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{file}: empty; it needs a header line and one row per example")
        header = [h.strip() for h in header]
        rows = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # a blank line
            if len(fields) != len(header):
                raise DataError(
                    f"{file}: row {len(rows)} (line {reader.line_num}): {len(fields)} fields, the header "
                    f"has {len(header)}; quote fields that contain commas, or fix that row")
            rows.append(dict(zip(header, fields)))
    except csv.Error as err:
        raise DataError(f"{file}: line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def take(examples: list[Example], size: int, seed: int, file: Path | str, split: str) -> list[Example]:
    """`_sample`, refusing an empty file, and a training file with fewer examples than asked for
    (a run on fewer samples than its params say would be compared with runs on more)."""
    if not examples:
        raise DataError(f"{file}: no examples in the {split} split; it needs at least one")
    if split == "train" and len(examples) < size:
        raise DataError(f"{file}: {len(examples)} training examples, fewer than data.train_size={size}; "
                        f"lower data.train_size to at most {len(examples)} or add examples")
    return sample(examples, size, seed)


def text_field(record: dict, field: str, file: Path | str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if value is None else f"is empty or not text ({value!r})"
        raise DataError(f"{file}: {where}: field '{field}' {problem}. Fix or remove that row.")
    return value.strip()
