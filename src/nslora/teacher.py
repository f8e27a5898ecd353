"""The teacher: one narrow `generate` over chat messages, whatever model answers.

Callers (the symbolic update, TextGrad adapters) see only the `Teacher` protocol. `make_teacher`
builds the real one from the `teacher` params section: an engine (an OpenAI-compatible server or a
transformers model in this process, see `nslora.teacher_engines`) behind a content-addressed disk
cache, retries with backoff, a per-epoch call budget and counters:

    teacher = make_teacher(params.teacher, Path(".nslora/teacher_cache"), local_model_dir=...)
    reply = teacher.generate([{"role": "user", "content": "Critique this answer ..."}])
    teacher.stats()  # {"calls": 1, "cache_hits": 0, "retries": 0, ...}

Every completed call is written to the cache at once, so a killed stage loses nothing and a rerun
repeats no completed call. The cache never holds the API key or the server URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .config import TeacherConfig

log = logging.getLogger(__name__)

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
                 temperature: float | None = None) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        ...


@dataclass(frozen=True)
class Completion:
    """What an engine returns for one call."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    """The one method a model backend implements. `kind` and `model` go into the cache key."""

    kind: str
    model: str

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 seed: int) -> Completion:
        """One reply; raises `TeacherCallError` for failures (retryable or not)."""
        ...


def cache_key(request: dict) -> str:
    """sha256 of the canonical JSON of a request (sorted keys, no whitespace)."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ReplyCache:
    """One small JSON file per completed call at `root/ab/abcdef....json`, written atomically."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, request: dict) -> Completion | None:
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("teacher cache: unreadable entry %s (%s); calling again", path, err)
            return None
        # The request is stored next to the reply, so a hand-edited or foreign file is not trusted.
        if (not isinstance(entry, dict) or entry.get("request") != request
                or not isinstance(entry.get("text"), str)):
            log.warning("teacher cache: entry %s does not match its request; calling again", path)
            return None
        return Completion(entry["text"], int(entry.get("prompt_tokens", 0)),
                          int(entry.get("completion_tokens", 0)))

    def put(self, key: str, request: dict, completion: Completion, seconds: float) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "request": request, "text": completion.text,
                 "prompt_tokens": completion.prompt_tokens,
                 "completion_tokens": completion.completion_tokens,
                 "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # tmp + os.replace: a run killed mid-write leaves a stray .tmp file, never a torn entry.
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=".",
                                         suffix=".tmp", delete=False) as tmp:
            json.dump(entry, tmp, ensure_ascii=False, indent=1)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)


class CachedTeacher:
    """A `Teacher` over an `Engine`: disk cache, retries with backoff, call budget, counters.

    Thread-safe: callers run `teacher.concurrency` samples at once. Two threads asking the same
    request at the same time make one engine call; the second gets the cached reply.
    """

    def __init__(self, engine: Engine, cache_dir: Path | str, *, max_retries: int = 4,
                 max_calls: int | None = None, max_tokens: int = 512, temperature: float = 0.0,
                 backoff_base: float = 0.5, backoff_max: float = 30.0, max_retry_after: float = 120.0):
        """
        Args:
            engine: the model backend (`OpenAIEngine`, `LocalEngine`, or any `Engine`).
            cache_dir: directory of the reply cache (inside the project, e.g. .nslora/teacher_cache).
            max_retries: retries of one call after retryable failures before giving up.
            max_calls: budget of calls that reach the engine (cache hits are free); None = no limit.
            max_tokens: default reply length when `generate` is not given one.
            temperature: default temperature when `generate` is not given one.
            backoff_base: first retry waits about this long (jittered); each retry doubles it.
            backoff_max: cap of one backoff wait.
            max_retry_after: cap on a server's Retry-After, so a bogus header cannot stall a stage.
        """
        self.engine = engine
        self.cache = ReplyCache(cache_dir)
        self.max_retries = max_retries
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self._lock = threading.Lock()
        self._inflight: dict[str, list] = {}  # key -> [lock, number of threads holding or waiting]
        self._rng = random.Random()
        self._counts: Counter = Counter()
        self._seconds = 0.0
        self._failures_by_reason: Counter = Counter()
        self._retries_by_reason: Counter = Counter()

    def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> str:
        """The assistant's reply to `messages`, from the cache or the engine.

        Args:
            messages: chat messages [{"role": ..., "content": ...}, ...].
            max_tokens: reply length limit (default: the teacher's).
            temperature: sampling temperature (default: the teacher's). Replies at temperature > 0
                are cached too, so a rerun sees the same reply.

        Returns:
            The reply text.

        Raises:
            BudgetExhausted: the call would reach the engine and the budget is spent.
            TeacherError: the engine failed for good (non-retryable, or after `max_retries`).
            ValueError: `messages` is not a list of {"role": str, "content": str}.
        """
        _check_messages(messages)
        max_tokens = self.max_tokens if max_tokens is None else int(max_tokens)
        temperature = self.temperature if temperature is None else float(temperature)
        request = {"engine": self.engine.kind, "model": self.engine.model, "messages": messages,
                   "max_tokens": max_tokens, "temperature": float(temperature)}
        key = cache_key(request)
        with self._one_call_per_key(key):
            cached = self.cache.get(key, request)
            if cached is not None:
                with self._lock:
                    self._counts["cache_hits"] += 1
                return cached.text
            self._take_budget()
            # The seed comes from the request, so sampling engines give the same reply on a rerun.
            completion, seconds = self._call(messages, max_tokens, temperature, seed=int(key[:8], 16))
            self.cache.put(key, request, completion, seconds)
            return completion.text

    def stats(self) -> dict:
        """Counters since this teacher was made.

        Returns:
            calls (generate calls that reached the engine; each took one unit of budget),
            cache_hits, retries (extra attempts), failures (calls that raised TeacherError after
            reaching the engine), budget_exhausted (calls refused by the budget), prompt_tokens,
            completion_tokens, seconds (engine wall time summed over threads), failures_by_reason
            (failures keyed by the reason of their last attempt) and retries_by_reason.
        """
        with self._lock:
            stats = {name: self._counts[name] for name in
                     ("calls", "cache_hits", "retries", "failures", "budget_exhausted",
                      "prompt_tokens", "completion_tokens")}
            stats["seconds"] = round(self._seconds, 3)
            stats["failures_by_reason"] = dict(self._failures_by_reason)
            stats["retries_by_reason"] = dict(self._retries_by_reason)
        return stats

    def close(self) -> None:
        """Release the engine's connections (if it holds any)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> CachedTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CachedTeacher({self.engine!r}, cache={str(self.cache.root)!r})"

    @contextlib.contextmanager
    def _one_call_per_key(self, key: str) -> Iterator[None]:
        with self._lock:
            slot = self._inflight.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._inflight[key]

    def _take_budget(self) -> None:
        with self._lock:
            if self.max_calls is not None and self._counts["calls"] >= self.max_calls:
                self._counts["budget_exhausted"] += 1
                raise BudgetExhausted(
                    f"teacher budget spent: {self.max_calls} calls this epoch "
                    "(teacher.max_calls_per_epoch); remaining samples keep their questions")
            self._counts["calls"] += 1

    def _call(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
              seed: int) -> tuple[Completion, float]:
        attempt = 0
        while True:
            start = time.monotonic()
            try:
                completion = self.engine.complete(messages, max_tokens, temperature, seed)
            except TeacherCallError as err:
                with self._lock:
                    self._seconds += time.monotonic() - start
                if not err.retryable or attempt >= self.max_retries:
                    with self._lock:
                        self._counts["failures"] += 1
                        self._failures_by_reason[err.reason] += 1
                    tries = f"after {attempt + 1} attempts" if attempt else "(not retried)"
                    raise TeacherError(f"teacher call failed {tries}: {err}") from err
                wait = self._backoff(attempt, err.retry_after)
                with self._lock:
                    self._counts["retries"] += 1
                    self._retries_by_reason[err.reason] += 1
                log.info("teacher call failed (%s); retry %d/%d in %.2fs", err, attempt + 1,
                         self.max_retries, wait)
                time.sleep(wait)
                attempt += 1
                continue
            seconds = time.monotonic() - start
            with self._lock:
                self._seconds += seconds
                self._counts["prompt_tokens"] += completion.prompt_tokens
                self._counts["completion_tokens"] += completion.completion_tokens
            return completion, seconds

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # Jitter spreads the retries of parallel threads that failed together (e.g. one 429 burst).
        delay = min(self.backoff_max, self.backoff_base * 2 ** attempt)
        delay *= 0.5 + 0.5 * self._rng.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("teacher messages: expected a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"teacher messages: each must be {{'role': str, 'content': str}}, got {m!r}")


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


def resolve_api_key(config: TeacherConfig) -> str:
    """The API key from `os.environ[config.api_key_env]`.

    Returns:
        The key, or a placeholder when it is unset and `base_url` is on this machine.

    Raises:
        TeacherError: unset for a remote server; names the variable to set.
    """
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    if is_local_url(config.base_url):
        return PLACEHOLDER_KEY
    raise TeacherError(
        f"teacher.api_key_env: set the environment variable {config.api_key_env} to the API key "
        f"for {safe_url(config.base_url)} (the key itself never goes in params.yaml), or point "
        "teacher.api_key_env at the variable that holds it")


def make_teacher(config: TeacherConfig, cache_dir: Path, local_model_dir: Path | None = None,
                 max_calls: int | None = None, *, precision: str = "auto") -> CachedTeacher:
    """The teacher described by the `teacher` params section.

    Args:
        config: the `teacher` section.
        cache_dir: reply cache directory inside the project (e.g. .nslora/teacher_cache).
        local_model_dir: engine 'local': the materialised HF directory of `config.model`.
        max_calls: budget of engine calls; None = `config.max_calls_per_epoch`.
        precision: engine 'local': 'auto', 'bf16' or 'fp32' (as `model.precision`).

    Returns:
        A thread-safe `CachedTeacher`.

    Raises:
        ValueError: engine 'hint' (not a chat teacher), or 'local' without `local_model_dir`.
        TeacherError: engine 'openai' with no API key for a remote server.
    """
    from .teacher_engines import LocalEngine, OpenAIEngine

    if config.engine == "hint":
        raise ValueError("teacher.engine='hint' is not a chat teacher: it derives hints from the gold "
                         "solution without calls; use the hint rewriter, not make_teacher")
    if config.engine == "openai":
        engine: Engine = OpenAIEngine(config.base_url or DEFAULT_BASE_URL, config.model,
                                      resolve_api_key(config), config.timeout,
                                      api_key_env=config.api_key_env)
    elif config.engine == "local":
        if local_model_dir is None:
            raise ValueError("teacher.engine='local' needs local_model_dir: the HF directory "
                             f"materialised from teacher.model={config.model!r}")
        engine = LocalEngine(local_model_dir, precision, name=config.model)
    else:
        raise ValueError(f"teacher.engine: unknown engine {config.engine!r} (local, openai, hint)")
    return CachedTeacher(engine, cache_dir, max_retries=config.max_retries,
                         max_calls=config.max_calls_per_epoch if max_calls is None else max_calls,
                         max_tokens=config.max_tokens, temperature=config.temperature)
