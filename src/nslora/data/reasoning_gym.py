"""reasoning-gym tasks, generated offline, each with a worked solution in GSM8K format built from the
task's metadata; `gsm_symbolic` is split by template so test templates are unseen.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any, Callable

from ..config import DataConfig
from .common import DataError, Example

# Item i of a reasoning-gym dataset is drawn from Random(seed + i), so the test stream starts far
# beyond any train stream; otherwise test item 0 of seed 1 would be train item 1 of seed 0.
TEST_SEED_OFFSET = 1_000_000
GSM_SYMBOLIC_HELD_OUT = 0.2  # fraction of gsm_symbolic templates reserved for the test split


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


def load(config: DataConfig, base_dir: Path) -> tuple[list[Example], list[Example]]:
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
