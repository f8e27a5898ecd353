"""The `prepare` stage: nslora.data.prepare_examples and stages/prepare.py, on real files.

Shared data sets are read from ../shared/data (never copied into the project); their tests skip
when it is absent. Tiny hand-written files cover the same formats everywhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import reasoning_gym
from reasoning_gym.arithmetic.leg_counting import ANIMALS

from nslora.config import DataConfig
from nslora.data import DataError, prepare_examples
from nslora.schemas import EXAMPLES, read_table, write_table

ROOT = Path(__file__).parents[1]
SHARED = Path(__file__).parents[2] / "shared" / "data"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (see ../shared/data/README.md)")
    return path


def check_tables(train: pd.DataFrame, test: pd.DataFrame, tmp_path: Path, config: DataConfig) -> None:
    """Schema-valid, round-trips through Parquet, GSM8K-format solutions, unique ids."""
    for split, df in (("train", train), ("test", test)):
        path = write_table(df, tmp_path / f"{split}.parquet", EXAMPLES)
        pd.testing.assert_frame_equal(read_table(path, EXAMPLES), df)
        assert (df.split == split).all() and df.id.is_unique
        assert (df.system_prompt == config.system_prompt).all()
        assert (df.question == df.original_question).all()
        assert (df.rewrite_epoch == 0).all() and (df.rewrite_engine == "").all()
        for col in ("question", "solution", "final_answer"):
            assert (df[col] == df[col].str.strip()).all() and (df[col] != "").all()
        for solution, answer in zip(df.solution, df.final_answer):
            assert solution.splitlines()[-1] == f"#### {answer}"


def reasoning(solution: str) -> str:
    return solution.rsplit("\n#### ", 1)[0]


# ----------------------------------------------------------------------------- reasoning-gym

LEGS = DataConfig(
    task="leg_counting",
    task_config={"min_animals": 1, "max_animals": 3, "min_instances": 1, "max_instances": 4},
    train_size=64,
    test_size=32,
    seed=3,
)


def test_leg_counting_solutions_are_correct_arithmetic(tmp_path):
    train, test = prepare_examples(LEGS)
    check_tables(train, test, tmp_path, LEGS)
    assert len(train) == 64 and len(test) == 32
    assert train.id.iloc[0] == "leg_counting-train-00000"
    assert (train.source == "reasoning_gym/leg_counting").all()
    step = re.compile(r"Each (.+) has (\d+) legs, so (\d+) .+ ha(?:ve|s) (\d+) \* (\d+) = (\d+) legs\.")
    for question, solution, answer in zip(train.question, train.solution, train.final_answer):
        *steps, total_line = reasoning(solution).splitlines()
        subtotals = []
        for line in steps:
            animal, legs, count, count2, legs2, subtotal = step.fullmatch(line).groups()
            assert ANIMALS[animal] == int(legs) == int(legs2) and count == count2
            assert int(count) * int(legs) == int(subtotal)
            assert f"{count} {animal}" in question
            subtotals.append(int(subtotal))
        assert sum(subtotals) == int(answer)
        assert NUMBER.findall(total_line)[-1] == answer


def test_reasoning_gym_is_deterministic_and_disjoint():
    train, test = prepare_examples(LEGS)
    again_train, again_test = prepare_examples(LEGS)
    pd.testing.assert_frame_equal(train, again_train)
    pd.testing.assert_frame_equal(test, again_test)
    assert not set(train.question) & set(test.question)
    other, _ = prepare_examples(DataConfig(**{**LEGS.__dict__, "seed": 4}))
    assert list(other.question) != list(train.question)


def test_small_task_space_tops_up_test_without_train_questions():
    # 2 one-digit terms: ~200 distinct questions, so many test draws repeat train ones.
    config = DataConfig(
        task="chain_sum",
        task_config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        train_size=100,
        test_size=40,
    )
    train, test = prepare_examples(config)
    assert len(test) == 40 and not set(train.question) & set(test.question)


def test_chain_sum_steps_left_to_right(tmp_path):
    config = DataConfig(task="chain_sum", train_size=40, test_size=10)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    for solution, answer in zip(train.solution, train.final_answer):
        lines = reasoning(solution).splitlines()
        for line in lines:
            left, op, right, result = re.fullmatch(r"(-?\d+) ([-+]) \(?(-?\d+)\)? = (-?\d+)", line).groups()
            assert int(left) + (int(right) if op == "+" else -int(right)) == int(result)
        assert NUMBER.findall(lines[-1])[-1] == answer


def test_basic_arithmetic_and_fallback_tasks(tmp_path):
    config = DataConfig(task="basic_arithmetic", train_size=40, test_size=10)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    # Precedence and parentheses are not stepped through: the whole expression equals the answer.
    for question, solution, answer in zip(train.question, train.solution, train.final_answer):
        if "(" in question:
            assert reasoning(solution).endswith(f" = {answer}")
    config = DataConfig(task="word_sorting", train_size=5, test_size=5)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    assert train.solution.iloc[0] == f"The answer is {train.final_answer.iloc[0]}.\n#### {train.final_answer.iloc[0]}"


def test_gsm_symbolic_splits_by_template(tmp_path):
    config = DataConfig(task="gsm_symbolic", train_size=120, test_size=40, seed=7)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    size = int(max(train.source_index.max(), test.source_index.max())) + 1
    templates = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=7).task_indices
    train_templates = {templates[i] for i in train.source_index}
    test_templates = {templates[i] for i in test.source_index}
    assert not train_templates & test_templates
    assert 0 < len(test_templates) <= 17  # about 20% of the 85 templates are held out
    pd.testing.assert_frame_equal(test, prepare_examples(config)[1])


# ----------------------------------------------------------------------------- gsm8k


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def gsm8k_dir(tmp_path: Path, train: list, test: list | None = None) -> Path:
    directory = tmp_path / "gsm8k"
    directory.mkdir(parents=True)
    write_jsonl(directory / "train.jsonl", train)
    write_jsonl(directory / "test.jsonl", test or [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    return directory


def test_gsm8k_local_jsonl(tmp_path):
    rows = [{"question": f" Q{i}? ", "answer": f"Step {i}.\n#### 1,00{i}"} for i in range(6)]
    directory = gsm8k_dir(tmp_path, rows)
    config = DataConfig(source="gsm8k", path="gsm8k", train_size=4, test_size=10)
    train, test = prepare_examples(config, base_dir=tmp_path)
    check_tables(train, test, tmp_path, config)
    assert len(train) == 4 and len(test) == 1
    for _, row in train.iterrows():
        i = row.source_index
        assert row.id == f"gsm8k-train-{i:05d}" and row.question == f"Q{i}?"
        assert row.final_answer == f"100{i}" and row.solution == f"Step {i}.\n#### 100{i}"
    # Parquet in the same layout gives the same examples.
    for split in ("train", "test"):
        path = directory / f"{split}.jsonl"
        pd.read_json(path, lines=True).to_parquet(directory / f"{split}.parquet")
        path.unlink()
    parquet_train, _ = prepare_examples(config, base_dir=tmp_path)
    pd.testing.assert_frame_equal(parquet_train, train)


def test_gsm8k_shared(tmp_path):
    path = shared("gsm8k")
    config = DataConfig(source="gsm8k", path=str(path), train_size=200, test_size=50, seed=1)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    assert train.source_index.max() < 7473 and test.source_index.max() < 1319
    assert not set(train.question) & set(test.question)
    pd.testing.assert_frame_equal(train, prepare_examples(config)[0])


# ----------------------------------------------------------------------------- clinifact


def clinifact_dir(tmp_path: Path, labels: list) -> Path:
    directory = tmp_path / "clinifact"
    directory.mkdir(parents=True)
    for split in ("train", "test"):
        pd.DataFrame(
            {
                "index": range(len(labels)),
                # Different claims per split: a test question that is also a training one is refused.
                "claim": [f"Drug {i} beats placebo{' in trial B' if split == 'test' else ''}."
                          for i in range(len(labels))],
                "article_abstract": [f"Abstract {i},\nwith a comma and a newline." for i in range(len(labels))],
                "label": labels,
            }
        ).to_csv(directory / f"{split}.csv", index=False)
    return directory


def test_clinifact_tiny(tmp_path):
    clinifact_dir(tmp_path, [0, 1, 2])
    config = DataConfig(source="clinifact", path="clinifact", train_size=3, test_size=2)
    train, test = prepare_examples(config, base_dir=tmp_path)
    check_tables(train, test, tmp_path, config)
    by_index = train.set_index("source_index")
    assert list(by_index.sort_index().final_answer) == ["FALSE", "TRUE", "NONE"]
    assert "Claim: Drug 1 beats placebo." in by_index.question[1]
    assert "Abstract 1,\nwith a comma" in by_index.question[1]
    assert len(test) == 2


def test_clinifact_shared(tmp_path):
    path = shared("clinifact")
    config = DataConfig(source="clinifact", path=str(path), train_size=1260, test_size=100)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    assert len(train) == 1260 and len(test) == 100
    assert set(train.final_answer) == {"TRUE", "FALSE", "NONE"}


# ----------------------------------------------------------------------------- bAbI

BABI = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
"""


def babi_dir(tmp_path: Path, text: str = BABI) -> Path:
    directory = tmp_path / "en"
    directory.mkdir(parents=True)
    for split in ("train", "test"):
        # The test stories differ from the training ones (an overlap is refused).
        story = text if split == "train" else text.replace("Mary", "Alice").replace("Sandra", "Eve")
        (directory / f"qa1_single-supporting-fact_{split}.txt").write_text(story)
    return directory


def test_babi_tiny(tmp_path):
    babi_dir(tmp_path)
    config = DataConfig(source="babi", task="1", path="en", train_size=3, test_size=10)
    train, test = prepare_examples(config, base_dir=tmp_path)
    check_tables(train, test, tmp_path, config)
    rows = train.set_index("source_index").sort_index()
    assert list(rows.final_answer) == ["bathroom", "hallway", "office"]
    assert rows.question[1] == (
        "Story:\nMary moved to the bathroom.\nJohn went to the hallway.\n"
        "Daniel went back to the hallway.\n\nQuestion: Where is Daniel?"
    )
    assert rows.solution[1] == "Daniel went back to the hallway.\n#### hallway"
    assert rows.question[2] == "Story:\nSandra travelled to the office.\n\nQuestion: Where is Sandra?"
    assert (train.source == "babi/qa1").all() and rows.id[0] == "babi-qa1-train-00000"


def test_babi_shared(tmp_path):
    path = shared("babi/tasks_1-20_v1-2/en")
    config = DataConfig(source="babi", task="1,2", path=str(path), train_size=300, test_size=50)
    train, test = prepare_examples(config)
    check_tables(train, test, tmp_path, config)
    assert set(train.source) == {"babi/qa1", "babi/qa2"}
    for question, solution in zip(train.question, train.solution):
        for fact in reasoning(solution).splitlines():
            assert fact in question


# ----------------------------------------------------------------------------- errors


def error(config: DataConfig, base_dir: Path = Path(".")) -> str:
    with pytest.raises(DataError) as info:
        prepare_examples(config, base_dir)
    return str(info.value)


def test_gsm8k_errors_name_file_line_and_field(tmp_path):
    ok = {"question": "Q?", "answer": "A\n#### 1"}
    config = DataConfig(source="gsm8k", path="gsm8k", train_size=5, test_size=5)
    cases = [
        ([ok, {"question": "Q?"}], "line 2", "'answer' is missing"),
        ([ok, ok, {"question": "Q?", "answer": "no final line"}], "line 3", "'answer' does not end in '#### "),
        ([{"question": "  ", "answer": "#### 3"}], "line 1", "'question'"),
        ([ok, "{not json"], "line 2", "not a JSON object"),
    ]
    for i, (rows, where, field) in enumerate(cases):
        gsm8k_dir(tmp_path / str(i), rows)
        message = error(config, tmp_path / str(i))
        assert f"{tmp_path / str(i) / 'gsm8k' / 'train.jsonl'}: {where}: " in message and field in message
    (tmp_path / "0" / "gsm8k" / "test.jsonl").unlink()
    assert "test.jsonl" in error(config, tmp_path / "0")


def test_clinifact_errors_name_file_row_and_field(tmp_path):
    directory = clinifact_dir(tmp_path, [1, "yes", 2])
    config = DataConfig(source="clinifact", path=str(directory), train_size=1)
    message = error(config)
    assert f"{directory / 'train.csv'}: row 1: field 'label' is 'yes'" in message and "0 (FALSE)" in message
    pd.DataFrame({"claim": ["c"], "label": [1]}).to_csv(directory / "train.csv", index=False)
    assert "article_abstract" in error(config) and "train.csv" in error(config)
    pd.DataFrame({"claim": ["c", ""], "article_abstract": ["a", "b"], "label": [1, 0]}).to_csv(
        directory / "train.csv", index=False
    )
    assert "train.csv: row 1: field 'claim'" in error(config)
    (directory / "test.csv").unlink()
    directory.joinpath("train.csv").write_text("claim,article_abstract,label\nc,a,1\n")
    assert f"{directory / 'test.csv'}: no such file" in error(config)
    assert "data.path: not set" in error(DataConfig(source="clinifact"))
    assert "no such directory" in error(DataConfig(source="clinifact", path=str(tmp_path / "nope")))


def test_csv_rows_cannot_shift_and_bad_files_are_named(tmp_path):
    directory = clinifact_dir(tmp_path, [0, 1, 2])
    config = DataConfig(source="clinifact", path=str(directory), train_size=3, test_size=3)
    train_csv = directory / "train.csv"
    header = "claim,article_abstract,label\n"
    # Every row one field too many: pandas would take the first column as an index and shift
    # claim into the abstract silently.
    train_csv.write_text(header + "c0,a0,0,extra\nc1,a1,1,extra\nc2,a2,2,extra\n")
    assert f"{train_csv}: row 0 (line 2): 4 fields, the header has 3" in error(config)
    train_csv.write_text(header + "c0,a0,0\nc1,a1,1\nc2,a, with a comma,2\n")
    assert f"{train_csv}: row 2 (line 4): 4 fields" in error(config) and "quote fields" in error(config)
    train_csv.write_bytes(header.encode() + "c0,caf\u00e9,0\n".encode("latin-1"))
    assert f"{train_csv}: line 2: not UTF-8 text" in error(config)
    train_csv.write_text("")
    assert f"{train_csv}: empty" in error(config)
    train_csv.write_text(header)
    assert f"{train_csv}: no examples in the train split" in error(config)
    train_csv.write_text(header + "c0,a0,0\nc1,a1,1\n")
    assert f"{train_csv}: 2 training examples, fewer than data.train_size=3" in error(config)


def test_gsm8k_empty_short_and_overlapping_splits_are_refused(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(4)]
    directory = gsm8k_dir(tmp_path, rows, rows)  # the same rows in train and test
    config = DataConfig(source="gsm8k", path=str(directory), train_size=4, test_size=4)
    message = error(config)
    assert "4 test question(s) also in the training set" in message and "Remove them" in message
    (directory / "test.jsonl").write_text(json.dumps({"question": "  q3? ", "answer": "#### 3"}) + "\n")
    assert "1 test question(s) also in the training set" in error(config)  # case and spaces ignored
    (directory / "test.jsonl").write_text("\n")
    assert f"{directory / 'test.jsonl'}: no examples in the test split" in error(config)
    (directory / "train.jsonl").write_bytes(b'{"question": "Q\xff?", "answer": "#### 1"}\n')
    assert f"{directory / 'train.jsonl'}: line 1: not UTF-8 text" in error(config)


def test_babi_errors_name_file_line_and_field(tmp_path):
    cases = [
        ("1 Mary moved.\nMary went home.\n", "line 2: field 'id'"),
        ("1 Mary moved.\n2 Where is Mary?\tbathroom\n", "line 2: field 'answer'"),
        ("1 Mary moved.\n2 Where is Mary?\tbathroom\t7\n", "line 2: field 'supporting ids'"),
    ]
    for i, (text, expected) in enumerate(cases):
        directory = babi_dir(tmp_path / str(i), text)
        message = error(DataConfig(source="babi", task="1", path=str(directory)))
        assert f"qa1_single-supporting-fact_train.txt: {expected}" in message
    assert "data.task" in error(DataConfig(source="babi", task="21", path=str(directory)))
    assert "qa2_*_train.txt" in error(DataConfig(source="babi", task="2", path=str(directory)))


def test_reasoning_gym_config_errors():
    assert "data.task: unknown reasoning-gym task 'leg_countin'" in error(DataConfig(task="leg_countin"))
    message = error(DataConfig(task="leg_counting", task_config={"max_animalz": 2}))
    assert "data.task_config.max_animalz" in message and "max_animals" in message
    assert "data.task_config.seed" in error(DataConfig(task_config={"seed": 1}))
    assert "data.task_config" in error(DataConfig(task_config={"min_animals": 5, "max_animals": 2}))
    assert "data.test_size" in error(DataConfig(test_size=0))


# ----------------------------------------------------------------------------- the stage script


def run_stage(tmp_path: Path, params: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(params)
    command = [sys.executable, str(ROOT / "stages" / "prepare.py"), "--params", "params.yaml",
               "--train-out", "data/train/epoch_0.parquet", "--test-out", "data/test.parquet"]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env})


def test_stage_writes_parquet(tmp_path):
    result = run_stage(tmp_path, "data:\n  task: chain_sum\n  train_size: 20\n  test_size: 5\n")
    assert result.returncode == 0, result.stderr
    assert "20 train" in result.stdout and "5 test" in result.stdout
    assert len(read_table(tmp_path / "data/train/epoch_0.parquet", EXAMPLES)) == 20
    assert len(read_table(tmp_path / "data/test.parquet", EXAMPLES)) == 5


def test_stage_bad_params_key_exits_2(tmp_path):
    result = run_stage(tmp_path, "data:\n  task: chain_sum\n  trian_size: 20\n")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.trian_size" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_stage_unreachable_hub_exits_2(tmp_path):
    # Offline mode fails fast; without it the hub client retries for ~25 s before giving up.
    result = run_stage(tmp_path, "data:\n  source: gsm8k\n", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert result.returncode == 2
    assert "openai/gsm8k" in result.stderr and "local directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
