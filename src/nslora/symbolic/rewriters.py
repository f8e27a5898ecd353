"""The rewriter interface (`Sample` in, `Proposal` out) and the offline, deterministic `HintRewriter`
(the first steps of the gold solution as hints: the zero-cost control, no teacher)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from .checks import _mentions_answer


@dataclass(frozen=True)
class Sample:
    """One training example as a rewriter sees it."""
    id: str
    question: str             # the question trained on this epoch (maybe an earlier rewrite)
    original_question: str    # the source text
    solution: str
    final_answer: str
    system_prompt: str


@dataclass(frozen=True)
class Proposal:
    """A rewriter's answer: a new question, or why there is none."""
    question: str | None
    failure: str | None = None
    feedback: str = ""        # the teacher's critique of the student's answer ('' without a teacher)


@dataclass(frozen=True)
class Refusal:
    """The previous iteration's proposal and why the checks refused it: the next iteration's
    feedback, as TextGrad feeds a loss back."""
    proposal: str             # the refused text ('' when the reply had no tags)
    reason: str               # a check's reason code (`check_rewrite`) or 'no_improved_variable_tags'


class Rewriter(Protocol):
    # Teacher calls one `propose` makes (0 without a teacher); a sample's budget reservation is this
    # times `max_iters`.
    calls_per_iteration: int
    # Whether proposals may hold numbers the original lacks (see `check_rewrite`).
    may_add_numbers: bool

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int,
                refused: Refusal | None = None) -> Proposal:
        """A rewrite of `question` (the current version), which the student answered `student_output`.

        `iteration` counts from 1 within one epoch's rewrite of `sample`; `refused`: the previous
        iteration's proposal was refused by the checks, and why.
        """
        ...

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        """The new system prompt and 'accepted', or the old one and why not."""
        ...


def sample_from_row(row: Any, system_prompt: str) -> Sample:
    """A `Sample` from a row of an EXAMPLES table (e.g. from `DataFrame.itertuples()`)."""
    return Sample(id=str(row.id), question=str(row.question), original_question=str(row.original_question),
                  solution=str(row.solution), final_answer=str(row.final_answer), system_prompt=system_prompt)


# --------------------------------------------------------------------------------------------------
# HintRewriter


CALCULATOR = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
HINT_PREFIX = "\n\nHint: "


def solution_steps(solution: str) -> list[str]:
    """The solution's steps as hint sentences.

    GSM8K calculator annotations (`<<48/2=24>>`) give one step each ("48/2 = 24"); other solutions
    give their non-empty lines before the '#### ' line.
    """
    body = re.split(r"(?m)^\s*####", solution, maxsplit=1)[0]
    calls = CALCULATOR.findall(body)
    if calls:
        return [f"{lhs.strip()} = {rhs.strip()}" for lhs, rhs in calls]
    return [line.strip() for line in body.splitlines() if line.strip()]


def revealable_steps(sample: Sample) -> list[str]:
    """The steps that may be shown without stating the final answer.

    Where the question does not already contain the answer, the hints stop before the first step
    that states it (showing it would be rejected as 'answer_leaked'); otherwise only a last step
    stating the answer is held back.
    """
    steps = solution_steps(sample.solution)
    states = [_mentions_answer(step, sample.final_answer) for step in steps]
    if not _mentions_answer(sample.original_question, sample.final_answer) and any(states):
        return steps[:states.index(True)]
    if steps and states[-1]:
        return steps[:-1]
    return steps


def _hint_text(steps: list[str], calculator: bool) -> str:
    if calculator:
        return " ".join(f"{'First' if i == 0 else 'Then'} compute {s}." for i, s in enumerate(steps))
    return " ".join(steps)


class HintRewriter:
    """Offline, deterministic rewrites: the original question plus the first steps of its solution.

    Iteration i reveals i more steps than the current question already carries, so a question given
    hints in an earlier epoch gets further ones. No teacher, no critiques; the system prompt is left.
    """

    calls_per_iteration = 0
    may_add_numbers = True  # its hints are steps of the gold solution

    def hinted(self, sample: Sample, k: int) -> str:
        """The original question followed by the first `k` revealable steps as a hint."""
        steps = revealable_steps(sample)[:k]
        calculator = bool(CALCULATOR.search(sample.solution))
        return f"{sample.original_question.rstrip()}{HINT_PREFIX}{_hint_text(steps, calculator)}"

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int,
                refused: Refusal | None = None) -> Proposal:
        available = len(revealable_steps(sample))
        if available == 0:
            return Proposal(None, "no_hints")
        shown = next((k for k in range(available, 0, -1) if self.hinted(sample, k) == question), 0)
        if shown + 1 > available:
            return Proposal(None, "no_more_hints")
        return Proposal(self.hinted(sample, shown + 1))

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        return system_prompt, "no_teacher"
