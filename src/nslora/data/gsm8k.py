"""GSM8K from a local directory (train/test .jsonl or .parquet) or the Hugging Face hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..config import DataConfig
from .common import DataError, Example, read_text, take, text_field


def load(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    path = config.path or "openai/gsm8k"
    local = base_dir / Path(path).expanduser()
    splits = _gsm8k_local(local) if local.is_dir() else _gsm8k_hub(path, local)
    train, test = (
        take([_gsm8k_example(file, where, i, record) for i, (where, record) in enumerate(records)],
              size, config.seed, file, split)
        for (file, records), size, split in ((splits["train"], config.train_size, "train"),
                                             (splits["test"], config.test_size, "test"))
    )
    return train, test


Records = tuple[Path | str, list[tuple[str, dict]]]  # (file, [(row or line label, record)])


def _gsm8k_local(directory: Path) -> dict[str, Records]:
    splits = {}
    for split in ("train", "test"):
        jsonl, parquet = directory / f"{split}.jsonl", directory / f"{split}.parquet"
        if jsonl.exists():
            records = []
            for n, line in enumerate(read_text(jsonl).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{jsonl}: line {n}: not a JSON object ({err}); fix it") from None
                if not isinstance(record, dict):
                    raise DataError(f"{jsonl}: line {n}: not a JSON object with question and answer")
                records.append((f"line {n}", record))
            splits[split] = (jsonl, records)
        elif parquet.exists():
            records = pd.read_parquet(parquet).to_dict("records")
            splits[split] = (parquet, [(f"row {i}", r) for i, r in enumerate(records)])
        else:
            raise DataError(
                f"{directory}: has no {split}.jsonl or {split}.parquet; put the GSM8K {split} split "
                "there (one {'question': ..., 'answer': '... #### N'} per line)"
            )
    return splits


def _gsm8k_hub(path: str, local: Path) -> dict[str, Records]:
    try:
        import datasets

        ds = datasets.load_dataset(path, "main")
    except Exception as err:  # the hub raises many kinds (connection, offline, not found)
        raise DataError(
            f"data.path: {path!r} is not a local directory ({local} does not exist) and loading it "
            f"from the Hugging Face hub failed ({type(err).__name__}: {err}). Without hub access, "
            "set data.path to a local directory with train.jsonl and test.jsonl."
        ) from err
    return {
        split: (f"{path}[{split}]", [(f"row {i}", r) for i, r in enumerate(ds[split])])
        for split in ("train", "test")
    }


def _gsm8k_example(file: Path | str, where: str, index: int, record: dict) -> Example:
    question = text_field(record, "question", file, where)
    answer = text_field(record, "answer", file, where)
    reasoning, sep, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        raise DataError(
            f"{file}: {where}: field 'answer' does not end in '#### <final answer>'. "
            "GSM8K answers end with a line '#### N'; fix or remove that row."
        )
    return Example("gsm8k", index, question, f"{reasoning.rstrip()}\n#### {final}".lstrip(), final)
