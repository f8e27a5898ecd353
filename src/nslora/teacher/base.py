"""What every part of the teacher shares: the `Teacher` and `Engine` protocols, `Completion`, the
errors, token counts and URL helpers. Engines import only this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Local servers (transformers serve, vLLM, Ollama) ignore the key, but the openai client insists on one.
PLACEHOLDER_KEY = "no-key-needed-for-local-server"


class TeacherError(RuntimeError):
    """A teacher call that failed for good (after retries); the message says why."""


class BudgetExhausted(TeacherError):
    """The per-epoch budget of teacher calls is spent; callers stop cleanly and keep what they have."""


class TeacherCallError(TeacherError):
    """One failed engine call, classified so `CachedTeacher` knows whether to try again.

    Attributes:
        reason: a short code for counters: 'timeout', 'connection', 'rate_limited', 'http_503',
            'malformed', 'http_401', ...
        retryable: whether the same request may succeed later.
        retry_after: seconds the server asked us to wait (Retry-After), if it said.
    """

    def __init__(self, reason: str, detail: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class Teacher(Protocol):
    def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                 temperature: float | None = None, kind: str = "other", grammar=None) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]); `kind` names
        the kind of call ('critique', 'feedback', 'rewrite', ...) in the per-call accounting;
        `grammar` (a `TaggedReply`) constrains the reply where the engine can."""
        ...


@dataclass(frozen=True)
class Completion:
    """What an engine returns for one call."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    """The one method a model backend implements. `kind`, `model` and, where the engine has one,
    `endpoint` (an opaque id of the server, never the URL itself) go into the cache key."""

    kind: str
    model: str

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 seed: int) -> Completion:
        """One reply; raises `TeacherCallError` for failures (retryable or not). An engine with
        `takes_grammar = True` also takes `grammar=` (a `TaggedReply`) and keeps its reply in
        that language."""
        ...


# Token counts above this are not believed (a server or cache file bug, not a real reply).
MAX_TOKEN_COUNT = 10**8


def token_count(value: object) -> int | None:
    """A reported token count as a non-negative int, or None when it is missing or not believable
    (non-numeric, negative, fractional, huge): usage is metadata and must never end a stage."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        return None
    return number if 0 <= number <= MAX_TOKEN_COUNT else None


def safe_url(url: str | None) -> str:
    """`url` without user:password or query string, fit for messages and logs."""
    if not url:
        return DEFAULT_BASE_URL
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def is_local_url(url: str | None) -> bool:
    return bool(url) and urlsplit(url).hostname in LOCAL_HOSTS
