"""The teacher: one narrow `generate` over chat messages, whatever model answers.

(Skeleton: the interface and its errors. Engines, cache, retries and budget are being added.)
"""

from __future__ import annotations

from typing import Protocol


class TeacherError(RuntimeError):
    """A teacher call that failed for good (after retries); the message says why."""


class BudgetExhausted(TeacherError):
    """The per-epoch budget of teacher calls is spent; callers stop cleanly and keep what they have."""


class Teacher(Protocol):
    def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        ...
