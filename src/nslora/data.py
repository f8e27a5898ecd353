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

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pandas as pd

from nslora.config import DataConfig
from nslora.schemas import EXAMPLES


class DataError(ValueError):
    """Malformed or missing input data. The message names the file, the row (0-based, as in
    `source_index`) or line (1-based, as in an editor), the field, and what to do."""


class Example(NamedTuple):
    source: str  # "reasoning_gym/leg_counting", "gsm8k", "clinifact", "babi/qa1"
    index: int  # row index in the source
    question: str
    solution: str  # reasoning lines, then "#### <answer>"
    answer: str


# Item i of a reasoning-gym dataset is drawn from Random(seed + i), so the test stream starts far
# beyond any train stream; otherwise test item 0 of seed 1 would be train item 1 of seed 0.
TEST_SEED_OFFSET = 1_000_000
GSM_SYMBOLIC_HELD_OUT = 0.2  # fraction of gsm_symbolic templates reserved for the test split


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
        "reasoning_gym": _reasoning_gym,
        "gsm8k": _gsm8k,
        "clinifact": _clinifact,
        "babi": _babi,
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


def _sample(examples: list[Example], size: int, seed: int) -> list[Example]:
    # Shuffle everything, then cut: a larger size only appends examples, and all rows are kept
    # in a seeded order when size exceeds them.
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:size]


# ----------------------------------------------------------------------------- reasoning-gym


def _legs_solution(item: dict) -> str | None:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    lines, subtotals = [], []
    for animal, count in item["metadata"]["animals"].items():
        legs = ANIMALS[animal]
        subtotals.append(count * legs)
        # Plural as the question writes it ("woodlouses"), so the solution names what was asked.
        many = f"{count} {animal}s have" if count > 1 else f"{count} {animal} has"
        lines.append(f"Each {animal} has {legs} legs, so {many} {count} * {legs} = {subtotals[-1]} legs.")
    total = sum(subtotals)
    if len(subtotals) > 1:
        lines.append(" + ".join(map(str, subtotals)) + f" = {total} legs in total.")
    else:
        lines.append(f"That is {total} legs in total.")
    return "\n".join(lines) if str(total) == item["answer"] else None


_EXPRESSION = re.compile(r"\s*(-?\d+)((?:\s*[-+*]\s*-?\d+)+)\s*")
_TERM = re.compile(r"\s*([-+*])\s*(-?\d+)")


def _arithmetic_solution(item: dict) -> str | None:
    expression = item["metadata"]["expression"]
    match = _EXPRESSION.fullmatch(expression)
    terms = _TERM.findall(match.group(2)) if match else []
    # Left to right is only the true order when no '*' competes with '+'/'-' (and no '/' or
    # parentheses, which the pattern rejects); otherwise state the expression's value directly.
    if not terms or len({op == "*" for op, _ in terms}) > 1:
        return f"{expression} = {item['answer']}"
    value, lines = int(match.group(1)), []
    for op, number in terms:
        n = int(number)
        new = value + n if op == "+" else value - n if op == "-" else value * n
        lines.append(f"{value} {op} {f'({n})' if n < 0 else n} = {new}")
        value = new
    return "\n".join(lines) if str(value) == item["answer"] else f"{expression} = {item['answer']}"


def _gsm_symbolic_solution(item: dict) -> str | None:
    lines = item["metadata"]["answer_cot"].strip().splitlines()
    # A few templates end in '#### 15.0' while the answer is '15': the gold answer wins.
    if lines and lines[-1].startswith("####"):
        lines = lines[:-1]
    return "\n".join(lines).strip()


# Each builder returns the reasoning lines (without the '####' line), or None when the metadata
# does not reproduce the gold answer: never train on a solution that contradicts its label.
SOLUTION_BUILDERS: dict[str, Callable[[dict], str | None]] = {
    "leg_counting": _legs_solution,
    "chain_sum": _arithmetic_solution,
    "basic_arithmetic": _arithmetic_solution,
    "gsm_symbolic": _gsm_symbolic_solution,
}


def reasoning_gym_solution(task: str, item: dict) -> str:
    """A worked solution for one reasoning-gym item, ending in `#### <answer>`.

    Args:
        task: the reasoning-gym task name.
        item: the item as returned by the dataset (`question`, `answer`, `metadata`).

    Returns:
        Reasoning lines built from the metadata where a builder exists for `task`, otherwise
        "The answer is <answer>.", followed by the line `#### <answer>`.
    """
    answer = str(item["answer"]).strip()
    builder = SOLUTION_BUILDERS.get(task)
    reasoning = builder({**item, "answer": answer}) if builder else None
    return f"{reasoning or f'The answer is {answer}.'}\n#### {answer}"


def _create(task: str, size: int, seed: int, task_config: dict) -> Any:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise DataError(
            f"data.task: unknown reasoning-gym task {task!r}. Known tasks include "
            f"{', '.join(sorted(DATASETS)[:12])}, ... (reasoning_gym.factory.DATASETS lists all)"
        )
    fields = [f.name for f in dataclasses.fields(DATASETS[task][1])]
    fields = [name for name in fields if name not in ("seed", "size")]
    for key in task_config:
        if key not in fields:
            raise DataError(
                f"data.task_config.{key}: not an option of reasoning-gym task {task!r} (size and "
                f"seed come from data.train_size/test_size/seed). Options: {', '.join(fields)}"
            )
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    except (AssertionError, TypeError, ValueError) as err:
        raise DataError(
            f"data.task_config: reasoning-gym rejected {task_config} for {task!r}: {err}"
        ) from err


def _rg_example(task: str, item: dict, index: int) -> Example:
    return Example(
        source=f"reasoning_gym/{task}",
        index=index,
        question=str(item["question"]).strip(),
        solution=reasoning_gym_solution(task, item),
        answer=str(item["answer"]).strip(),
    )


def _reasoning_gym(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    task = config.task
    if task == "gsm_symbolic":
        return _gsm_symbolic(config)
    train_ds = _create(task, config.train_size, config.seed, config.task_config)
    train = [_rg_example(task, train_ds[i], i) for i in range(config.train_size)]
    seen = {e.question for e in train}
    # Small task spaces repeat questions; draw extra test items to replace those seen in train.
    pool = 4 * config.test_size + 100
    test_ds = _create(task, pool, config.seed + TEST_SEED_OFFSET, config.task_config)
    test = []
    for i in range(pool):
        example = _rg_example(task, test_ds[i], i)
        if example.question not in seen:
            test.append(example)
            if len(test) == config.test_size:
                return train, test
    raise DataError(
        f"data.task_config: only {len(test)} of {pool} generated {task!r} test questions are not "
        f"in the training set; the task space is too small for train_size={config.train_size} and "
        f"test_size={config.test_size}. Widen data.task_config or lower the sizes."
    )


def _gsm_symbolic(config: DataConfig) -> tuple[list[Example], list[Example]]:
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    # Split by template, not by item: items of one template differ only in names and numbers, so a
    # test set sharing templates with train would measure memorised problem shapes.
    templates = sorted(set(tasks_ok))
    n_held_out = round(GSM_SYMBOLIC_HELD_OUT * len(templates))
    held_out = set(random.Random(config.seed).sample(templates, n_held_out))
    pool = 10 * (config.train_size + config.test_size) + 100
    ds = _create("gsm_symbolic", pool, config.seed, config.task_config)
    train: list[Example] = []
    test: list[Example] = []
    for i, template in enumerate(ds.task_indices):
        split, size = (test, config.test_size) if template in held_out else (train, config.train_size)
        if len(split) < size:
            split.append(_rg_example("gsm_symbolic", ds[i], i))
        if len(train) == config.train_size and len(test) == config.test_size:
            return train, test
    raise DataError(
        f"data.train_size/test_size: {pool} gsm_symbolic items gave only {len(train)} train and "
        f"{len(test)} test examples; lower the sizes"
    )


# ----------------------------------------------------------------------------- files


def _directory(config: DataConfig, base_dir: Path, what: str) -> Path:
    if config.path is None:
        raise DataError(f"data.path: not set; {config.source!r} needs the directory with {what}")
    directory = (base_dir / Path(config.path).expanduser())
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (data.path); it must hold {what}")
    return directory


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{file}: line {line}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save the file as UTF-8") from None


def _csv_rows(file: Path) -> list[dict[str, str]]:
    """The data rows of a CSV file as header -> value dicts.

    Every row must have exactly the header's fields: pandas would take a row with one extra field
    as having an index column, or drop the extra value, shifting or losing data without a word.
    """
    import csv
    import io

    # A StringIO splits lines only at \n and \r (str.splitlines would also split quoted fields at
    # U+2028 and friends, which abstracts contain).
    reader = csv.reader(io.StringIO(_read_text(file), newline=""))
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


def _take(examples: list[Example], size: int, seed: int, file: Path | str, split: str) -> list[Example]:
    """`_sample`, refusing an empty file, and a training file with fewer examples than asked for
    (a run on fewer samples than its params say would be compared with runs on more)."""
    if not examples:
        raise DataError(f"{file}: no examples in the {split} split; it needs at least one")
    if split == "train" and len(examples) < size:
        raise DataError(f"{file}: {len(examples)} training examples, fewer than data.train_size={size}; "
                        f"lower data.train_size to at most {len(examples)} or add examples")
    return _sample(examples, size, seed)


def _text(record: dict, field: str, file: Path | str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if value is None else f"is empty or not text ({value!r})"
        raise DataError(f"{file}: {where}: field '{field}' {problem}. Fix or remove that row.")
    return value.strip()


def _gsm8k(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    path = config.path or "openai/gsm8k"
    local = base_dir / Path(path).expanduser()
    splits = _gsm8k_local(local) if local.is_dir() else _gsm8k_hub(path, local)
    train, test = (
        _take([_gsm8k_example(file, where, i, record) for i, (where, record) in enumerate(records)],
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
            for n, line in enumerate(_read_text(jsonl).splitlines(), 1):
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
    question = _text(record, "question", file, where)
    answer = _text(record, "answer", file, where)
    reasoning, sep, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        raise DataError(
            f"{file}: {where}: field 'answer' does not end in '#### <final answer>'. "
            "GSM8K answers end with a line '#### N'; fix or remove that row."
        )
    return Example("gsm8k", index, question, f"{reasoning.rstrip()}\n#### {final}".lstrip(), final)


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


def _clinifact(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    directory = _directory(config, base_dir, "CliniFact's train.csv and test.csv")
    splits = []
    for split, size in (("train", config.train_size), ("test", config.test_size)):
        file = directory / f"{split}.csv"
        if not file.exists():
            raise DataError(f"{file}: no such file; the CliniFact directory needs {split}.csv")
        # Strings only: a label must be exactly 0/1/2, and abstracts are never parsed as numbers.
        rows = _csv_rows(file)
        missing = [c for c in ("claim", "article_abstract", "label") if c not in rows[0]] if rows else []
        if missing:
            raise DataError(
                f"{file}: header: field(s) {missing} missing; CliniFact CSVs need the columns "
                "claim, article_abstract and label"
            )
        examples = []
        for i, record in enumerate(rows):
            claim = _text(record, "claim", file, f"row {i}")
            abstract = _text(record, "article_abstract", file, f"row {i}")
            label = record["label"].strip()
            if label not in CLINIFACT_LABELS:
                raise DataError(
                    f"{file}: row {i}: field 'label' is {label!r}, expected the integer 0 (FALSE), "
                    "1 (TRUE) or 2 (NONE). Fix or remove that row."
                )
            answer, reason = CLINIFACT_LABELS[label]
            question = CLINIFACT_QUESTION.format(claim=claim, abstract=abstract)
            examples.append(Example("clinifact", i, question, f"{reason}\n#### {answer}", answer))
        splits.append(_take(examples, size, config.seed, file, split))
    return splits[0], splits[1]


def _babi(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
    directory = _directory(config, base_dir, "bAbI's qa*_train.txt/qa*_test.txt (tasks_1-20_v1-2/en)")
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
        splits.append(_take(examples, size, config.seed, ", ".join(read), split))
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
    for n, line in enumerate(_read_text(file).splitlines(), 1):
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
