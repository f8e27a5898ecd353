"""Grammars for the teacher's rewrite replies: valid by construction instead of checked afterwards.

A TGD step's reply must be the improved variable between TextGrad's tags. For a question the
grammar also fixes its numbers: exactly the numbers of the original question, in their order, each
standing alone (no digit may touch it, so 48 cannot become 480 or 48.5), and no '#' (no '#### '
answer line). A new quantity, a computed intermediate result and the gold answer (unless the
original states it) are then impossible to write. The rewrite checks still run: they verify what
the grammar guarantees and judge what it cannot (length, an unchanged question).

The same grammar goes to every engine in the form it takes: a regex for llguidance in the local
engine and for vLLM's `structured_outputs`, GBNF for a llama.cpp server.

    grammar = TaggedReply.for_question("Natalia sold clips to 48 of her friends in April ...")
    grammar.regex()   # '<IMPROVED_VARIABLE>[^0-9#<]*48[^0-9#<]*</IMPROVED_VARIABLE>'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checks import NUMBER

OPEN, CLOSE = "<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>"
TEXT = "[^0-9#<]"      # prose: no digit, no '#', no '<' (the closing tag ends it unambiguously)
SEPARATOR = "[^0-9#<.,]"  # what ends the text between two numbers ('48,24' or '48.24' would be one)


@dataclass(frozen=True)
class TaggedReply:
    """`<IMPROVED_VARIABLE>` text `</IMPROVED_VARIABLE>`, the text holding exactly `numbers` in
    order (as written in the original), or any text without '<' when `numbers` is None."""

    numbers: tuple[str, ...] | None

    @classmethod
    def for_question(cls, original: str) -> "TaggedReply":
        return cls(tuple(NUMBER.findall(original)))

    @classmethod
    def any_text(cls) -> "TaggedReply":
        """For a system prompt: only the tags are fixed."""
        return cls(None)

    def regex(self) -> str:
        """In the syntax shared by Rust's regex crate (llguidance) and Python's `re`."""
        if self.numbers is None:
            body = "[^<]*"
        else:
            parts = [f"{TEXT}*"]
            for index, number in enumerate(self.numbers):
                parts.append(re.escape(number))
                parts.append(f"{TEXT}*{SEPARATOR}" if index < len(self.numbers) - 1 else f"{TEXT}*")
            body = "".join(parts)
        return OPEN + body + CLOSE

    def gbnf(self) -> str:
        """The same language as a llama.cpp GBNF grammar."""
        def literal(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        if self.numbers is None:
            return f"root ::= {literal(OPEN)} [^<]* {literal(CLOSE)}\n"
        items = ["text"]
        for index, number in enumerate(self.numbers):
            items += [literal(number), "between" if index < len(self.numbers) - 1 else "text"]
        return (f"root ::= {literal(OPEN)} {' '.join(items)} {literal(CLOSE)}\n"
                f"text ::= {TEXT}*\n"
                f"between ::= {TEXT}* {SEPARATOR}\n")

    def matches(self, reply: str) -> bool:
        """Whether `reply` (surrounding whitespace aside) is in the language."""
        return re.fullmatch(self.regex(), reply.strip(), flags=re.DOTALL) is not None
