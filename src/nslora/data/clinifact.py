"""CliniFact: a claim and an abstract -> TRUE / FALSE / NONE, from train.csv and test.csv.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .common import DataError, Example, csv_rows, data_directory, take, text_field


CLINIFACT_LABELS = {
    "0": ("FALSE", "The abstract reports a negative or inconclusive result for the claim."),
    "1": ("TRUE", "The abstract reports a result that supports the claim."),
    "2": ("NONE", "The abstract reports no direct result for the claim."),
}
CLINIFACT_QUESTION = (
    "Does the abstract support the claim? Answer TRUE if it reports a result supporting the claim, "
    "FALSE if its result is negative or inconclusive, or NONE if it reports no direct result for "
    "the claim.\n\nClaim: {claim}\n\nAbstract: {abstract}"
)


def load(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    directory = data_directory(config, base_dir, "CliniFact's train.csv and test.csv")
    splits = []
    for split, size in (("train", config.train_size), ("test", config.test_size)):
        file = directory / f"{split}.csv"
        if not file.exists():
            raise DataError(f"{file}: no such file; the CliniFact directory needs {split}.csv")
        # Strings only: a label must be exactly 0/1/2, and abstracts are never parsed as numbers.
        rows = csv_rows(file)
        missing = [c for c in ("claim", "article_abstract", "label") if c not in rows[0]] if rows else []
        if missing:
            raise DataError(
                f"{file}: header: field(s) {missing} missing; CliniFact CSVs need the columns "
                "claim, article_abstract and label"
            )
        examples = []
        for i, record in enumerate(rows):
            claim = text_field(record, "claim", file, f"row {i}")
            abstract = text_field(record, "article_abstract", file, f"row {i}")
            label = record["label"].strip()
            if label not in CLINIFACT_LABELS:
                raise DataError(
                    f"{file}: row {i}: field 'label' is {label!r}, expected the integer 0 (FALSE), "
                    "1 (TRUE) or 2 (NONE). Fix or remove that row."
                )
            answer, reason = CLINIFACT_LABELS[label]
            question = CLINIFACT_QUESTION.format(claim=claim, abstract=abstract)
            examples.append(Example("clinifact", i, question, f"{reason}\n#### {answer}", answer))
        splits.append(take(examples, size, config.seed, file, split))
    return splits[0], splits[1]
