"""TextGrad as a rewriter: the loss is the teacher's critique of the student's answer against the gold
solution, back-propagated to the question; one TGD step proposes the rewrite."""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import threading
import types
from typing import TYPE_CHECKING, Any

from ..answers import is_right
from ..config import SymbolicConfig
from ..teacher import BudgetExhausted, Teacher, TeacherError
from .grammar import TaggedReply
from .rewriters import Proposal, Refusal, Sample

if TYPE_CHECKING:
    from ..selection.student import Student

log = logging.getLogger(__name__)


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
# Why a proposal was refused, told to the teacher in the next iteration's step (a check's verdict
# as feedback, the way TextGrad feeds back a loss). Worded as what to fix, never with the answer.
REFUSALS = {
    "unchanged": "it repeated the question without any change: add short guidance or clarify its wording",
    "too_short": "it was much shorter than the original: it dropped sentences of the question",
    "too_long": "it was far longer than the original: add at most one or two short sentences",
    "numbers_changed": "it dropped or changed numbers of the original question: keep every number",
    "answer_leaked": "it gave away the final answer",
    "states_an_answer": "it contained an answer line ('#### ...'): it solved the problem instead of rewriting it",
    "numbers_added": "it contained a number the original question does not have (a new quantity or a "
                     "computed result): use only the original's numbers, each as often as there",
    "off_topic": "it was about something other than the original question",
    "answer_changed": "solved as written, it no longer had the original question's answer: it changed the problem",
    "no_improved_variable_tags": "it was not written between <IMPROVED_VARIABLE> and </IMPROVED_VARIABLE>",
}


def refusal_feedback(refused: Refusal) -> str:
    """The constraint that tells the teacher why its previous proposal was refused."""
    why = REFUSALS.get(refused.reason, refused.reason.replace("_", " "))
    shown = f' ("{refused.proposal.strip()}")' if refused.proposal.strip() else ""
    return f"Your previous improved question{shown} was refused because {why}. Write one that fixes this."


SOLVER_PROMPT = ("Solve the problem step by step and end your answer with '#### ' followed by the "
                 "final answer.")
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

        def __init__(self, teacher: Teacher, name: str = "nslora-teacher", grammar: Any = None):
            self.teacher = teacher
            self.model_string = name
            self.grammar = grammar  # a TaggedReply for a TGD step's reply (the teacher applies it where it can)

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            text = prompt if isinstance(prompt, str) else "\n".join(p for p in prompt if isinstance(p, str))
            chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
            return self.teacher.generate(chat + [{"role": "user", "content": text}],
                                         kind=call_kind(system_prompt), grammar=self.grammar)

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


# The 1.5B teacher opens the tagged text with a line about it ("Here is the improved system prompt
# for the student model:"); that line is not part of the prompt or question it introduces.
PREAMBLE = re.compile(r"^\s*(?:here is|here's|below is)\b[^\n]*:[ \t]*\n\s*", re.IGNORECASE)


def strip_preamble(text: str) -> str:
    """`text` without a leading "Here is the improved ...:" line (unchanged if nothing follows it)."""
    stripped = PREAMBLE.sub("", text, count=1)
    return stripped if stripped.strip() else text


def _tgd_step(tgm: Any, variable: Any, engine: Any, constraints: list[str]) -> str | None:
    """One TGD step on `variable`; its new value, or None when the reply lacked the tags."""
    before = variable.value
    optimizer = tgm.tg.TGD([variable], engine=engine, constraints=constraints)
    try:
        optimizer.step()
    except IndexError:
        # TGD.step indexes into reply.split('<IMPROVED_VARIABLE>'); small teachers omit the tags.
        return None
    if not PREAMBLE.match(before):  # a text that itself opens with "Here is ...:" keeps that line
        variable.set_value(strip_preamble(variable.value))
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

    may_add_numbers = False

    def __init__(self, teacher: Teacher, student: Student, cfg: SymbolicConfig):
        self.teacher = teacher
        self.student = student
        self.cfg = cfg
        # The loss, its backward to the answer, the answer's backward to the question, the TGD
        # step; and the teacher solving the rewrite with `verify_answer`.
        self.calls_per_iteration = 4 + int(cfg.verify_answer)

    def verify(self, sample: Sample, question: str) -> str | None:
        """The teacher solves `question`; None when its final answer is the gold one, else
        'answer_changed' (or why the call failed)."""
        try:
            reply = self.teacher.generate([{"role": "system", "content": SOLVER_PROMPT},
                                           {"role": "user", "content": question}], kind="verify")
        except TeacherError as err:
            return _teacher_failure(err)
        return None if is_right(reply, sample.final_answer) else "answer_changed"

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int,
                refused: Refusal | None = None) -> Proposal:
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
            # The step's reply is held to the question's grammar: tags, and the original's numbers.
            step_engine = tgm.TeacherEngine(self.teacher, grammar=TaggedReply.for_question(sample.original_question))
            constraints = QUESTION_CONSTRAINTS + ([refusal_feedback(refused)] if refused else [])
            new_question = _tgd_step(tgm, variable, step_engine, constraints)
        except TeacherError as err:
            return Proposal(None, _teacher_failure(err), critique)
        if new_question is None:
            return Proposal(None, "no_improved_variable_tags", critique)
        return Proposal(new_question, None, critique)

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        from .system_prompt import update_system_prompt  # it builds on this module's TGD step

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

    def propose(self, sample: Sample, question: str, student_output: str, iteration: int,
                refused: Refusal | None = None) -> Proposal:
        return self.rewriter.critique(sample, question, student_output)

    def revise_system_prompt(self, system_prompt: str, feedback: list[str]) -> tuple[str, str]:
        return self.rewriter.revise_system_prompt(system_prompt, feedback)
