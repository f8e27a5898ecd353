"""bAbI: `tasks_1-20_v1-2/en`, each question over the story told so far.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .common import DataError, Example, data_directory, read_text, take


def load(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    directory = data_directory(config, base_dir, "bAbI's qa*_train.txt/qa*_test.txt (tasks_1-20_v1-2/en)")
    numbers = [t.strip() for t in config.task.split(",")]
    if not all(t.isdigit() and 1 <= int(t) <= 20 for t in numbers):
        raise DataError(f"data.task: {config.task!r} is not a bAbI task; use 1-20 or a list like '1,2'")
    splits = []
    for split, size in (("train", config.train_size), ("test", config.test_size)):
        examples, read = [], []
        for n in numbers:
            files = sorted(directory.glob(f"qa{int(n)}_*_{split}.txt"))
            if len(files) != 1:
                raise DataError(f"{directory}: needs one qa{int(n)}_*_{split}.txt, found {len(files)}")
            examples += read_babi(files[0], f"babi/qa{int(n)}")
            read.append(str(files[0]))
        splits.append(take(examples, size, config.seed, ", ".join(read), split))
    return splits[0], splits[1]


def read_babi(file: Path, source: str) -> list[Example]:
    """Parse one bAbI file: each question becomes an example over the story told so far.

    Args:
        file: a `qa{N}_*_{train,test}.txt` file in the standard format (`ID text` lines; ID 1
            starts a new story; questions are `ID question<TAB>answer<TAB>supporting IDs`).
        source: the `source` column value, e.g. "babi/qa1".

    Returns:
        One Example per question, numbered from 0 in file order; the solution quotes the
        supporting statements and ends in `#### <answer>`.

    Raises:
        DataError: an unparsable line, naming the file, the line and the field.
    """
    examples = []
    story: dict[str, str] = {}  # statement id -> text, for the current story only
    for n, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        number, _, text = line.strip().partition(" ")
        if not number.isdigit() or not text.strip():
            raise DataError(f"{file}: line {n}: field 'id': need '<number> <text>', got {line!r}")
        if number == "1":
            story = {}
        if "\t" not in text:
            story[number] = text.strip()
            continue
        parts = [p.strip() for p in text.split("\t")]
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise DataError(
                f"{file}: line {n}: field 'answer': a question line needs "
                f"'question<TAB>answer<TAB>supporting ids', got {len(parts)} tab-separated fields"
            )
        question, answer, support = parts
        for ref in support.split():
            if ref not in story:
                raise DataError(
                    f"{file}: line {n}: field 'supporting ids': {ref!r} is not a statement of "
                    "this story"
                )
        facts = "\n".join(story[ref] for ref in support.split())
        examples.append(
            Example(
                source=source,
                index=len(examples),
                question="Story:\n" + "\n".join(story.values()) + f"\n\nQuestion: {question}",
                solution=f"{facts}\n#### {answer}".lstrip(),
                answer=answer,
            )
        )
    return examples
