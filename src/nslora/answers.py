"""Final-answer extraction and comparison, shared by evaluation and the student's self-check.

Mirrors lm-eval's `gsm8k_cot_zeroshot` filters: `flexible-extract` takes the last number in the
output; `strict-match` takes the number after '#### ' (the GSM8K solution format the pipeline trains
on). Non-numeric answers (bAbI, CliniFact) compare the text after '#### ' or the last word.
"""

from __future__ import annotations

import re

FLEXIBLE_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
STRICT_NUMBER = re.compile(r"#### (\-?[0-9\.\,]+)")
STRICT_TEXT = re.compile(r"####\s*([^\n]+)")
LAST_WORD = re.compile(r"([A-Za-z0-9_\-]+)\W*$")


def is_numeric(answer: str) -> bool:
    return bool(re.fullmatch(r"-?[0-9][0-9,]*(\.[0-9]+)?", answer.strip()))


def squash_spaces(text: object) -> str:
    """The text with every run of whitespace made one space: how rewrites are compared and shown."""
    return " ".join(str(text).split())


def normalize(text: str) -> str:
    """lm-eval's exact_match preprocessing for GSM8K: drop ',', '$', a trailing '.', lowercase."""
    text = re.sub(r"(?s).*#### ", "", text)
    text = text.replace(",", "").replace("$", "").strip()
    text = re.sub(r"\.$", "", text)
    if is_numeric(text) and "." in text:
        text = text.rstrip("0").rstrip(".")
    return text.lower()


def flexible_extract(output: str, numeric: bool = True) -> str:
    if numeric:
        matches = FLEXIBLE_NUMBER.findall(output)
        if not matches:
            return "[invalid]"
        return next(g for g in matches[-1] if g)
    strict = STRICT_TEXT.findall(output)
    if strict:
        return strict[-1].strip()
    last = LAST_WORD.search(output.strip())
    return last.group(1) if last else "[invalid]"


def strict_match(output: str, numeric: bool = True) -> str:
    found = (STRICT_NUMBER if numeric else STRICT_TEXT).findall(output)
    return found[0].strip() if found else "[invalid]"


def is_correct(extracted: str, final_answer: str) -> bool:
    return extracted != "[invalid]" and normalize(extracted) == normalize(final_answer)


def is_right(output: str, final_answer: str) -> bool:
    """Whether a model's whole output answers `final_answer` (flexible-extract, as evaluated)."""
    return is_correct(flexible_extract(output, is_numeric(final_answer)), final_answer)
