"""Rewrite replies valid by construction: the grammar's language, the local engine decoding in it
(llguidance), the server fields it is sent in, and refused proposals fed back to the teacher."""

from __future__ import annotations

import dataclasses
import threading

import llguidance
import llguidance.hf
import pytest

from conftest import make_examples
from nslora.config import SymbolicConfig
from nslora.symbolic import TextGradRewriter, rewrite_epoch
from nslora.symbolic.checks import check_rewrite
from nslora.symbolic.grammar import CLOSE, OPEN, TaggedReply
from nslora.teacher import CachedTeacher, Completion
from nslora.teacher.openai_engine import OpenAIEngine
from openai_server import OpenAIServer, textgrad_teacher_reply

QUESTION = "Natalia sold clips to 48 of her friends in April, and then 1,000.5 more in May. How many?"
GRAMMAR = TaggedReply.for_question(QUESTION)
CFG = SymbolicConfig(max_iters=2, student_max_new_tokens=8)


def tagged(text: str) -> str:
    return OPEN + text + CLOSE


@pytest.mark.parametrize("reply, allowed", [
    (tagged("Natalia sold clips to 48 friends, then 1,000.5 more in May. How many in all?"), True),
    (tagged("\nFirst 48 clips; later 1,000.5 clips. Count them all."), True),
    (tagged("Natalia sold 48 clips. How many?"), False),                 # a number dropped
    (tagged("Natalia sold 48 and 24 clips, then 1,000.5 more."), False),  # a number added
    (tagged("Natalia sold 480 clips, then 1,000.5 more."), False),        # a digit touching 48
    (tagged("Natalia sold 48.1,000.5 clips."), False),                    # two numbers made one
    (tagged("1,000.5 more after 48 in April."), False),                   # reordered
    (tagged("48 clips, then 1,000.5 more. #### 1048.5"), False),          # an answer line
    ("Natalia sold 48 clips, then 1,000.5 more.", False),                 # no tags
])
def test_the_language_holds_exactly_the_original_numbers_in_order(reply, allowed):
    assert GRAMMAR.matches(reply) == allowed


def test_every_reply_in_the_language_passes_the_number_checks():
    for text in ("Natalia sold clips to 48 of her friends in April, and then 1,000.5 more in May. "
                 "How many did she sell? Add the two months.",
                 "In April she sold clips to 48 friends. In May she sold 1,000.5 more. How many in total?"):
        assert GRAMMAR.matches(tagged(text))
        assert check_rewrite(QUESTION, text, "1048.5", CFG) is None


def test_llguidance_and_gbnf_accept_the_grammars():
    for grammar in (GRAMMAR, TaggedReply.for_question("no numbers here"), TaggedReply.any_text()):
        for form, text in (("regex", grammar.regex()), ("gbnf", grammar.gbnf())):
            assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from(form, text)) == "", (form, text)


def test_the_local_engine_decodes_inside_the_grammar_row_by_row(tiny_model_dir):
    from nslora.teacher.local_engine import LocalEngine

    engine = LocalEngine(tiny_model_dir, "fp32", max_batch=4, gather_seconds=0.5)
    grammar = TaggedReply.for_question("How many legs do 3 chickens and 2 dogs have?")
    replies: dict[int, Completion] = {}

    def call(index: int) -> None:
        replies[index] = engine.complete([{"role": "user", "content": f"Rewrite question {index}"}], 40, 0.0,
                                         grammar=grammar if index % 2 == 0 else None)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.batch_sizes == [4]  # constrained and free rows in one batch
    free = engine.complete([{"role": "user", "content": "Rewrite question 1"}], 40, 0.0)
    assert replies[1].text == free.text and not free.text.startswith(OPEN)
    # The random tiny model never closes the tag within 40 tokens, so each constrained reply is a
    # prefix of the language: llguidance's matcher accepts every one of its tokens.
    tokenizer = llguidance.hf.from_tokenizer(engine.tokenizer, n_vocab=engine.lm.config.vocab_size)
    for index in (0, 2):
        assert replies[index].text.startswith(OPEN)
        matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("regex", grammar.regex()))
        ids = engine.tokenizer(replies[index].text, add_special_tokens=False)["input_ids"]
        assert matcher.consume_tokens(ids) and not matcher.is_error(), replies[index].text
    engine.close()


class RecordingEngine:
    kind, model = "recording", "recording-model"

    def __init__(self, takes_grammar: bool):
        self.takes_grammar = takes_grammar
        self.calls: list[dict] = []

    def complete(self, messages, max_tokens, temperature, seed, **kwargs):
        self.calls.append(kwargs)
        return Completion(tagged("x"), 1, 1)


@pytest.mark.parametrize("takes, enabled, applied", [(True, True, True), (True, False, False), (False, True, False)])
def test_the_teacher_applies_a_grammar_only_where_the_engine_takes_it(tmp_path, takes, enabled, applied):
    engine = RecordingEngine(takes)
    teacher = CachedTeacher(engine, tmp_path / "cache", grammar=enabled)
    messages = [{"role": "user", "content": "rewrite"}]
    teacher.generate(messages, kind="rewrite", grammar=GRAMMAR)
    teacher.generate(messages, kind="rewrite")
    # With the grammar applied, the constrained and the free call are two cache entries.
    assert engine.calls == ([{"grammar": GRAMMAR}, {}] if applied else [{}])
    assert teacher.stats()["constrained"] == int(applied)


@pytest.mark.parametrize("field, expected", [
    ("vllm", {"structured_outputs": {"regex": GRAMMAR.regex()}}),
    ("llama_cpp", {"grammar": GRAMMAR.gbnf()}),
    ("none", {}),
])
def test_the_openai_engine_sends_the_grammar_in_the_servers_field(field, expected):
    with OpenAIServer(reply=tagged("ok")) as server:
        engine = OpenAIEngine(server.base_url, "test-model", "key", structured_outputs=field)
        assert engine.takes_grammar == (field != "none")
        engine.complete([{"role": "user", "content": "rewrite"}], 16, 0.0, grammar=GRAMMAR)
        body = server.requests[-1]
        engine.close()
    for key in ("structured_outputs", "grammar"):
        assert body.get(key) == expected.get(key)


class FixesWhenTold:
    """TextGrad's prompts answered like a teacher that first computes a result into the question,
    then, told why that was refused, writes a valid rewrite."""

    def __init__(self):
        self.step_prompts: list[str] = []
        self.lock = threading.Lock()

    def generate(self, messages, *, max_tokens=None, temperature=None, kind=None, grammar=None):
        request = {"messages": messages}
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        if "<IMPROVED_VARIABLE>" not in system:
            return textgrad_teacher_reply(request)
        prompt = messages[-1]["content"]
        with self.lock:
            self.step_prompts.append(prompt)
        if "was refused because" in prompt:
            return textgrad_teacher_reply(request)
        return tagged("How many legs do 3 chickens and 3 dogs have? That is 7 legs.")


def test_a_refused_proposal_is_the_next_iterations_feedback(student):
    train = make_examples(3)
    teacher = FixesWhenTold()
    selected = train.iloc[[2]].assign(student_output="#### 5", correct=False)
    result = rewrite_epoch(train, selected, TextGradRewriter(teacher, student, CFG), student, 1, CFG, 1,
                           "scripted", progress=False)
    row = result.log.iloc[0]
    assert (row.iterations, bool(row.accepted)) == (2, True)
    assert result.metrics["proposals"]["made"] == 2 and result.metrics["proposals"]["passed_checks"] == 1
    assert "was refused because it contained a number the original question does not have" in teacher.step_prompts[1]
    assert "That is 7 legs." in teacher.step_prompts[1]  # the refused text is shown to the teacher
    # With one iteration there is nothing to feed back into: the refusal is the outcome.
    once = rewrite_epoch(train, selected, TextGradRewriter(FixesWhenTold(), student, CFG), student, 1,
                         dataclasses.replace(CFG, max_iters=1), 1, "scripted", progress=False)
    assert once.log.iloc[0].reason == "numbers_added" and not once.log.iloc[0].accepted


class SolvesTo:
    """A teacher whose TGD step keeps the question and adds guidance, and who solves any question
    to `answer` (the answer-invariance verifier's call)."""

    def __init__(self, answer: str):
        self.answer = answer
        self.kinds: list[str] = []

    def generate(self, messages, *, max_tokens=None, temperature=None, kind=None, grammar=None):
        self.kinds.append(kind)
        if kind == "verify":
            return f"Adding up the legs. #### {self.answer}"
        return textgrad_teacher_reply({"messages": messages})


@pytest.mark.parametrize("answer, accepted", [("18", True), ("17", False)])
def test_the_verifier_keeps_a_rewrite_only_if_its_answer_is_the_gold_one(student, answer, accepted):
    train = make_examples(3)  # sample 2: 3 chickens and 3 dogs, 18 legs
    cfg = dataclasses.replace(CFG, max_iters=1, verify_answer=True)
    teacher = SolvesTo(answer)
    rewriter = TextGradRewriter(teacher, student, cfg)
    assert rewriter.calls_per_iteration == 5  # its call is funded with the others
    result = rewrite_epoch(train, train.iloc[[2]].assign(student_output="#### 5", correct=False), rewriter,
                           student, 1, cfg, 1, "scripted", progress=False)
    assert teacher.kinds.count("verify") == 1
    assert bool(result.log.iloc[0].accepted) == accepted
    assert result.log.iloc[0].reason == ("max_iters" if accepted else "answer_changed")
