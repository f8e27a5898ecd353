"""The symbolic_rewrite stage against a real OpenAI-compatible server on 127.0.0.1: rewrites flow
into the next epoch's data; 500, 429, malformed and too-slow replies are retried or recorded and
never crash the stage; completed calls are cached, so re-runs and resumed runs repeat none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from nslora.config import LoraParams, TrainConfig
from nslora.schemas import EXAMPLES, REWRITES, SELECTION, read_table, write_table
from nslora.numerical.training import init_adapter
from openai_server import OpenAIServer, textgrad_teacher_reply

# Runs the stage script as a subprocess against real servers.
pytestmark = pytest.mark.integration

SAMPLES = 4  # selected, answered wrong; one TextGrad iteration = 4 teacher calls each
CALLS = 4 * SAMPLES


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(reply=textgrad_teacher_reply) as running:
        yield running


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    from conftest import make_examples

    root = tmp_path_factory.mktemp("symbolic_stage")
    train = make_examples(8)
    write_table(train, root / "train.parquet", EXAMPLES)
    adapter = init_adapter(tiny_model_dir, train, LoraParams(r=4), TrainConfig(batch_size=4), root / "epoch_1")
    selection = pd.DataFrame({
        "id": train["id"], "epoch": 1, "criterion": "grad_norm", "score": range(8), "eligible": True,
        "rank": range(8), "selected": [i < SAMPLES for i in range(8)], "student_output": "I do not know.",
        "student_answer": "[invalid]", "correct": False})
    write_table(selection, root / "selection.parquet", SELECTION)
    return {"root": root, "model": tiny_model_dir, "adapter": adapter, "train": train}


def run_stage(inputs, server, work: Path, cache: Path, **teacher) -> tuple[subprocess.CompletedProcess, dict]:
    params = {
        "model": {"name": str(inputs["model"]), "precision": "fp32"},
        "symbolic": {"max_iters": 1, "student_max_new_tokens": 4},
        "teacher": {"engine": "openai", "model": "test-model", "base_url": server.base_url,
                    "timeout": 2.0, "max_retries": 2, "concurrency": 4, **teacher},
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    root = inputs["root"]
    cmd = [sys.executable, str(ROOT / "stages" / "symbolic_rewrite.py"), "--params", "params.yaml",
           "--epoch", "1", "--base", str(inputs["model"]), "--adapter", str(inputs["adapter"]),
           "--train", str(root / "train.parquet"), "--selection", str(root / "selection.parquet"),
           "--cache-dir", str(cache), "--out", "train_1.parquet", "--log", "rewrites.parquet",
           "--system-prompt-out", "system_prompt.txt", "--metrics", "metrics.json"]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((work / "metrics.json").read_text())


def test_rewrites_flow_into_next_epoch_and_a_warm_rerun_makes_no_call(inputs, server, tmp_path):
    server.reset_counts()
    _, metrics = run_stage(inputs, server, tmp_path / "run", tmp_path / "cache")
    assert server.count == CALLS and metrics["teacher"]["calls"] == CALLS
    assert metrics["accepted"] == SAMPLES and metrics["engine"] == "openai:test-model"
    train = read_table(tmp_path / "run" / "train_1.parquet", EXAMPLES)
    rewritten = train[train["rewrite_epoch"] == 1]
    assert len(rewritten) == SAMPLES
    assert rewritten["question"].str.endswith("then add them.").all()
    assert (rewritten["original_question"] != rewritten["question"]).all()
    original = inputs["train"].set_index("id")
    assert (rewritten.set_index("id")["final_answer"] == original.loc[rewritten["id"], "final_answer"]).all()
    untouched = train[train["rewrite_epoch"] == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(untouched, inputs["train"].iloc[SAMPLES:].reset_index(drop=True))
    read_table(tmp_path / "run" / "rewrites.parquet", REWRITES)

    # Forced re-run with the cache warm: zero calls reach the server; identical outputs.
    _, again = run_stage(inputs, server, tmp_path / "rerun", tmp_path / "cache")
    assert server.count == CALLS and again["teacher"]["calls"] == 0
    assert again["teacher"]["cache_hits"] == CALLS
    pd.testing.assert_frame_equal(read_table(tmp_path / "rerun" / "train_1.parquet", EXAMPLES), train)


def test_500_and_429_are_retried(inputs, server, tmp_path):
    server.reset_counts()
    server.fail_next(2, status=500)
    server.fail_next(1, status=429, retry_after=0.2)
    _, metrics = run_stage(inputs, server, tmp_path / "run", tmp_path / "cache", concurrency=1,
                           max_retries=4)
    assert metrics["accepted"] == SAMPLES
    assert metrics["teacher"]["retries"] == 3 and server.count == CALLS + 3
    assert server.counts_by_status[500] == 2 and server.counts_by_status[429] == 1


@pytest.mark.parametrize("fault", ["malformed", "slow"])
def test_failing_teacher_keeps_originals_and_records_why(inputs, server, tmp_path, fault):
    server.reset_counts()
    if fault == "malformed":
        server.malform_next(1000, kind="not_json")
    else:
        server.stall_next(1000, seconds=3.0)  # longer than teacher.timeout
    try:
        _, metrics = run_stage(inputs, server, tmp_path / "run", tmp_path / "cache",
                               max_retries=1, timeout=1.0)
    finally:
        server.clear_faults()
    assert metrics["accepted"] == 0 and metrics["attempted"] == SAMPLES
    log = read_table(tmp_path / "run" / "rewrites.parquet", REWRITES)
    assert log["reason"].str.startswith("teacher_error").all()
    assert metrics["teacher"]["failures"] >= SAMPLES
    train = read_table(tmp_path / "run" / "train_1.parquet", EXAMPLES)
    pd.testing.assert_frame_equal(train, inputs["train"])
    assert not any(Path(tmp_path / "cache").rglob("*.json"))  # failures are not cached as answers


def test_budget_ends_cleanly_and_a_resumed_run_repeats_no_completed_call(inputs, server, tmp_path):
    server.reset_counts()
    # 10 calls fund two whole samples (4 calls each) in id order; the 2 left fund no third.
    _, first = run_stage(inputs, server, tmp_path / "run", tmp_path / "cache", max_calls_per_epoch=10)
    assert first["budget_exhausted"] and first["teacher"]["calls"] == 8 and server.count == 8
    assert first["skipped"] == 2 and first["accepted"] == 2
    assert [c["label"] for c in first["teacher_calls"]] == ["ex-train-0000"] * 4 + ["ex-train-0001"] * 4
    assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 for c in first["teacher_calls"])
    _, second = run_stage(inputs, server, tmp_path / "resume", tmp_path / "cache")
    assert second["teacher"]["cache_hits"] == 8 and second["teacher"]["calls"] == CALLS - 8
    assert server.count == CALLS and second["accepted"] == SAMPLES


def test_openai_path_end_to_end_with_transformers_serve(inputs, transformers_serve, tmp_path):
    """A real model server (the tiny random Llama behind `transformers serve`): its replies are
    nonsense, so every rewrite is refused for a recorded reason and the originals are kept."""
    server = type("Serve", (), {"base_url": transformers_serve})()
    _, metrics = run_stage(inputs, server, tmp_path / "run", tmp_path / "cache",
                           model=str(inputs["model"]), max_tokens=24,
                           timeout=60.0)  # a real server on a busy machine, not the 2 s of the fault tests
    teacher = metrics["teacher"]
    assert teacher["calls"] > 0 and teacher["completion_tokens"] > 0
    # A random model sometimes says nothing at all: an empty reply is retried, then recorded.
    assert sum(teacher["failures_by_reason"].values()) == teacher["failures"]
    log = read_table(tmp_path / "run" / "rewrites.parquet", REWRITES)
    assert len(log) == SAMPLES and (log["reason"] != "").all() and not log["accepted"].any()
    # Nothing accepted: the next epoch's training set is the input, question for question.
    train = read_table(tmp_path / "run" / "train_1.parquet", EXAMPLES)
    assert metrics["accepted"] == 0 and (train["rewrite_epoch"] == 0).all()
    pd.testing.assert_frame_equal(train, inputs["train"].reset_index(drop=True))
