"""The global system prompt refined from the teacher's critiques: two-stage's TextGrad-optimised
initial prompt, and NS-LoRA + system prompt's update at the end of an epoch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pandas as pd

from ..answers import is_right, squash_spaces
from ..config import SymbolicConfig
from ..schemas import system_prompt_of
from ..teacher import Teacher, TeacherError
from .grammar import TaggedReply
from .rewriters import sample_from_row
from .textgrad import FORMAT_CONSTRAINT, PROMPT_CONSTRAINTS, SYSTEM_ROLE, TextGradRewriter, _teacher_failure, _textgrad, _tgd_step

if TYPE_CHECKING:
    from ..selection.student import Student

# The system-prompt update sees at most this many critiques: a few hundred would overflow the
# teacher's context, and the common failure modes show up in a handful.
MAX_PROMPT_FEEDBACK = 16


def optimize_initial_prompt(train: pd.DataFrame, rewriter: TextGradRewriter, student: Student,
                            cfg: SymbolicConfig, samples: int, seed: int, concurrency: int,
                            progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """method=two_stage, stage one: optimise the global system prompt with TextGrad over a seeded
    sample of the training set before any LoRA epoch (up to `cfg.max_iters` rounds of: the base
    model answers, the teacher critiques the wrong answers, one TGD step on the prompt).

    Returns:
        (the training table with the final prompt in every row, metrics).
    """
    picked = train.sample(n=min(samples, len(train)), random_state=seed).sort_values("id")
    prompt = initial = system_prompt_of(train)
    rounds = []
    for _ in range(cfg.max_iters):
        outputs = student.answer(prompt, picked["question"].tolist(), cfg.student_max_new_tokens, progress=progress)
        wrong = [(row, out) for row, out in zip(picked.itertuples(), outputs) if not is_right(out, row.final_answer)]
        if not wrong:
            rounds.append({"wrong": 0, "update": "all_correct"})
            break
        pending = [sample_from_row(row, prompt) for row, _ in wrong]
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            critiques = list(pool.map(lambda a: rewriter.critique(a[0], a[0].question, a[1]).feedback,
                                      zip(pending, [out for _, out in wrong])))
        new_prompt, reason = rewriter.revise_system_prompt(prompt, [c for c in critiques if c])
        rounds.append({"wrong": len(wrong), "update": reason})
        if reason != "accepted":
            break
        prompt = new_prompt
    out = train.copy()
    out["system_prompt"] = prompt
    return out, {"samples": len(picked), "rounds": rounds, "system_prompt": prompt,
                 "changed": prompt != initial}


def update_system_prompt(teacher: Teacher, system_prompt: str, feedback: list[str],
                         cfg: SymbolicConfig) -> tuple[str, str]:
    """One TGD step on the system prompt, its gradient being the critiques of the student's answers.

    Args:
        teacher: the optimiser's engine.
        system_prompt: the current prompt.
        feedback: critiques (textual gradients) of selected samples; the first `MAX_PROMPT_FEEDBACK`
            are used.
        cfg: `max_length_ratio` bounds the new prompt's length relative to the old.

    Returns:
        (new prompt, 'accepted'), or (the old prompt, reason): 'no_feedback', 'empty', 'unchanged',
        'too_long', 'format_dropped' (the '#### ' answer-format instruction disappeared),
        'no_improved_variable_tags', 'budget_exhausted' or 'teacher_error: ...'.
    """
    critiques = [f.strip() for f in feedback if f and f.strip()][:MAX_PROMPT_FEEDBACK]
    if not critiques:
        return system_prompt, "no_feedback"
    tgm = _textgrad()
    variable = tgm.Variable(system_prompt, requires_grad=True, role_description=SYSTEM_ROLE)
    # One gradient holding every critique: Variable.gradients is a set, and iterating several would
    # order them differently from run to run (a different prompt, a teacher-cache miss).
    joined = "\n".join(f"<FEEDBACK>{c}</FEEDBACK>" for c in critiques)
    variable.gradients.add(tgm.tg.Variable(
        "Critiques of the student's answers to training questions it got wrong under this system "
        f"prompt:\n{joined}", requires_grad=False, role_description=f"feedback to {SYSTEM_ROLE}"))
    keeps_format = "####" in system_prompt
    constraints = PROMPT_CONSTRAINTS + ([FORMAT_CONSTRAINT] if keeps_format else [])
    try:
        new = _tgd_step(tgm, variable, tgm.TeacherEngine(teacher, grammar=TaggedReply.any_text()), constraints)
    except TeacherError as err:
        return system_prompt, _teacher_failure(err)
    if new is None:
        return system_prompt, "no_improved_variable_tags"
    reason = _check_system_prompt(system_prompt, new, cfg)
    return (system_prompt, reason) if reason else (new.strip(), "accepted")


def _check_system_prompt(old: str, new: str, cfg: SymbolicConfig) -> str | None:
    if not new.strip():
        return "empty"
    if squash_spaces(new) == squash_spaces(old):
        return "unchanged"
    if len(new.strip()) > cfg.max_length_ratio * max(len(old.strip()), 1):
        return "too_long"
    if "####" in old and "####" not in new:
        return "format_dropped"
    return None
