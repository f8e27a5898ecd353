"""`CachedTeacher`: an engine behind a content-addressed disk cache, retries with backoff, a per-epoch
call budget (reserved per piece of work) and counters.

Every completed call is written to the cache at once, so a killed stage loses nothing and a rerun
repeats no completed call. The cache never holds the API key or the server URL (only an opaque id
of the endpoint, so replies of one server are never served for another).
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
from pathlib import Path
from typing import Any

from .base import BudgetExhausted, Completion, Engine, TeacherCallError, TeacherError, token_count

log = logging.getLogger(__name__)


def cache_key(request: dict) -> str:
    """sha256 of the canonical JSON of a request (sorted keys, no whitespace)."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Allowance:
    """Budget reserved for one piece of work (one sample's rewrite), in calls: every `generate`
    inside it costs one, whether the reply comes from the engine or the cache, so the work an
    allowance buys is the same in a fresh run, a resumed run and a forced re-run. (Retries are
    paid from the shared budget.)"""

    def __init__(self, requests: int | None, label: str = ""):
        self.left = requests  # None = unlimited
        self.label = label

    def charge(self) -> None:
        """One call of this work: take it from what is left, or refuse it."""
        if self.left is not None:
            if self.left < 1:
                raise BudgetExhausted(
                    f"teacher budget spent: the calls reserved for {self.label or 'this work'} are "
                    "used up (teacher.max_calls_per_epoch); its question is kept")
            self.left -= 1


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
        return Completion(entry["text"], token_count(entry.get("prompt_tokens")) or 0,
                          token_count(entry.get("completion_tokens")) or 0)

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
    """A `Teacher` over an `Engine`: disk cache, retries with backoff, request budget, counters.

    Thread-safe: callers run `teacher.concurrency` samples at once. Two threads asking the same
    request at the same time make one engine call; the second gets the cached reply.

    Budget: every request that reaches the engine costs one unit, retries included. Work that must
    not depend on thread timing reserves its calls up front, in a fixed order (`reserve`), and draws
    on them (`drawing_from`); such an allowance is charged for cached replies too, so a resumed or
    forced re-run does exactly the work of an uninterrupted run. Retries are paid from what is not
    reserved (`retry_reserve` units are kept out of every reservation for them) and, when that is
    spent, from the allowance of the work they belong to: a 429 never strands a sample whose
    allowance still has calls.
    """

    def __init__(self, engine: Engine, cache_dir: Path | str, *, max_retries: int = 4,
                 max_calls: int | None = None, max_tokens: int = 512, temperature: float = 0.0,
                 max_tokens_by_kind: dict[str, int] | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, max_retry_after: float = 120.0, retry_reserve: int = 0,
                 grammar: bool = True):
        """
        Args:
            engine: the model backend (`OpenAIEngine`, `LocalEngine`, or any `Engine`).
            cache_dir: directory of the reply cache (inside the project, e.g. .nslora/teacher_cache).
            max_retries: retries of one call after retryable failures before giving up.
            max_calls: budget of requests that reach the engine, retries included (cache hits
                outside an allowance are free); None = no limit.
            max_tokens: default reply length when `generate` is not given one.
            temperature: default temperature when `generate` is not given one.
            max_tokens_by_kind: reply length per kind of call (e.g. {'critique': 192}), used
                before `max_tokens` when `generate` is given a kind but no max_tokens.
            backoff_base: first retry waits about this long (jittered); each retry doubles it.
            backoff_max: cap of one backoff wait.
            max_retry_after: cap on a server's Retry-After, so a bogus header cannot stall a stage.
            retry_reserve: budget units `reserve` never hands out, left for retries.
            grammar: apply the grammars callers give (`generate(grammar=...)`) where the engine
                takes them; False ignores them (teacher.grammar).
        """
        self.engine = engine
        self.cache = ReplyCache(cache_dir)
        self.max_retries = max_retries
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.max_tokens_by_kind = dict(max_tokens_by_kind or {})
        self.temperature = temperature
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.retry_reserve = retry_reserve
        self.grammar = grammar
        self._lock = threading.Lock()
        self._inflight: dict[str, list] = {}  # key -> [lock, number of threads holding or waiting]
        self._rng = random.Random()
        self._unreserved = max_calls  # budget neither spent nor reserved; None = unlimited
        self._local = threading.local()  # .allowance: the Allowance this thread draws on
        self._counts: Counter = Counter()
        self._seconds = 0.0
        self._failures_by_reason: Counter = Counter()
        self._retries_by_reason: Counter = Counter()
        self._call_log: list[dict] = []
        self._seq: Counter = Counter()

    @property
    def takes_grammar(self) -> bool:
        """Whether the engine constrains replies by a grammar (`generate(grammar=...)`)."""
        return self.grammar and bool(getattr(self.engine, "takes_grammar", False))

    def generate(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                 temperature: float | None = None, kind: str = "other", grammar: Any = None) -> str:
        """The assistant's reply to `messages`, from the cache or the engine.

        Args:
            messages: chat messages [{"role": ..., "content": ...}, ...].
            max_tokens: reply length limit (default: the teacher's for this kind of call).
            temperature: sampling temperature (default: the teacher's). Replies at temperature > 0
                are cached too, so a rerun sees the same reply.
            kind: the kind of call, recorded with its token counts in `call_log`.
            grammar: the language the reply must be in (`nslora.symbolic.grammar.TaggedReply`),
                applied where the engine `takes_grammar` and ignored elsewhere (the caller checks
                the reply either way); part of the cache key when applied.

        Returns:
            The reply text.

        Raises:
            BudgetExhausted: the call would reach the engine and the budget (or this thread's
                allowance) is spent.
            TeacherError: the engine failed for good (non-retryable, or after `max_retries`).
            ValueError: `messages` is not a list of {"role": str, "content": str}.
        """
        _check_messages(messages)
        if max_tokens is None:
            max_tokens = self.max_tokens_by_kind.get(kind, self.max_tokens)
        max_tokens = int(max_tokens)
        temperature = self.temperature if temperature is None else float(temperature)
        request = {"engine": self.engine.kind, "model": self.engine.model, "messages": messages,
                   "max_tokens": max_tokens, "temperature": float(temperature)}
        if grammar is not None and self.takes_grammar:
            request["grammar"] = grammar.regex()
            with self._lock:
                self._counts["constrained"] += 1
        else:
            grammar = None
        endpoint = getattr(self.engine, "endpoint", None)
        if endpoint:
            # Another server answering to the same model name (a test server, a different
            # deployment) is another teacher: its replies must not be served for this one.
            request["endpoint"] = endpoint
        key = cache_key(request)
        allowance = getattr(self._local, "allowance", None)
        with self._one_call_per_key(key):
            if allowance is not None:
                with self._lock:
                    self._charge_allowance(allowance)
            cached = self.cache.get(key, request)
            if cached is not None:
                self._record(kind, cached, 0, 0.0, cached=True)
                return cached.text
            # The seed comes from the request, so sampling engines give the same reply on a rerun.
            completion, seconds, requests = self._call(messages, max_tokens, temperature,
                                                       seed=int(key[:8], 16),
                                                       funded=allowance is not None, grammar=grammar)
            self.cache.put(key, request, completion, seconds)
            self._record(kind, completion, requests, seconds, cached=False)
            return completion.text

    def reserve(self, requests: int, label: str = "") -> Allowance | None:
        """Set aside `requests` units of the budget for one piece of work, or None when fewer are
        left. Call it in a fixed order (e.g. sample ids) before the work starts, so which work is
        funded never depends on thread timing."""
        with self._lock:
            if self._unreserved is None:
                return Allowance(None, label)
            if requests > self._unreserved - self.retry_reserve:
                return None
            self._unreserved -= requests
            return Allowance(requests, label)

    @contextlib.contextmanager
    def drawing_from(self, allowance: Allowance, release: bool = True) -> Iterator[Allowance]:
        """Calls made by this thread inside the block are charged to `allowance`; what is left of
        it goes back to the budget at the end, unless `release` is off (work that draws on one
        allowance in several blocks, possibly on different threads, then calls `release`)."""
        self._local.allowance = allowance
        try:
            yield allowance
        finally:
            self._local.allowance = None
            if release:
                self.release(allowance)

    def release(self, allowance: Allowance) -> None:
        """Return what is left of `allowance` to the budget."""
        with self._lock:
            if self._unreserved is not None and allowance.left:
                self._unreserved += allowance.left
            allowance.left = 0

    def stats(self) -> dict:
        """Counters since this teacher was made.

        Returns:
            calls (generate calls that reached the engine), requests (what reached the engine,
            retries included; the budget's unit), cache_hits, retries (extra attempts), failures
            (calls that raised TeacherError after reaching the engine), budget_exhausted (calls
            refused by the budget), constrained (generate calls whose reply was held to a grammar,
            cached or not), prompt_tokens, completion_tokens (of engine replies), seconds
            (engine wall time summed over threads), failures_by_reason (keyed by the reason of
            their last attempt), retries_by_reason, and by_kind: calls, cache hits and tokens per
            kind of call.
        """
        with self._lock:
            stats = {name: self._counts[name] for name in
                     ("calls", "requests", "cache_hits", "retries", "failures", "budget_exhausted",
                      "constrained", "prompt_tokens", "completion_tokens")}
            stats["seconds"] = round(self._seconds, 3)
            stats["failures_by_reason"] = dict(self._failures_by_reason)
            stats["retries_by_reason"] = dict(self._retries_by_reason)
            by_kind: dict[str, Counter] = {}
            for entry in self._call_log:
                counts = by_kind.setdefault(entry["kind"], Counter())
                counts["cache_hits" if entry["cached"] else "calls"] += 1
                counts["prompt_tokens"] += entry["prompt_tokens"]
                counts["completion_tokens"] += entry["completion_tokens"]
            stats["by_kind"] = {k: {n: v[n] for n in ("calls", "cache_hits", "prompt_tokens",
                                                      "completion_tokens")}
                                for k, v in sorted(by_kind.items())}
        return stats

    def call_log(self) -> list[dict]:
        """One entry per generate call that returned: label (of the allowance it was charged to),
        seq (its order within that label), kind, cached, requests, prompt_tokens,
        completion_tokens, seconds; sorted by label and seq, so it reads the same at any
        concurrency."""
        with self._lock:
            return sorted((dict(e) for e in self._call_log), key=lambda e: (e["label"], e["seq"]))

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

    def _record(self, kind: str, completion: Completion, requests: int, seconds: float,
                cached: bool) -> None:
        allowance = getattr(self._local, "allowance", None)
        label = allowance.label if allowance is not None else ""
        with self._lock:
            self._counts["cache_hits" if cached else "calls"] += 1
            self._call_log.append({
                "label": label, "seq": self._seq[label], "kind": kind, "cached": cached,
                "requests": requests, "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens, "seconds": round(seconds, 3)})
            self._seq[label] += 1

    def _charge_allowance(self, allowance: Allowance) -> None:
        try:
            allowance.charge()
        except BudgetExhausted:
            self._counts["budget_exhausted"] += 1
            raise

    def _take_request(self, funded: bool) -> None:
        """One request is about to reach the engine: pay for it (unless an allowance already
        paid for this call's first request), or refuse it."""
        allowance = getattr(self._local, "allowance", None)
        with self._lock:
            if not funded and self._unreserved is not None:
                if self._unreserved >= 1:
                    self._unreserved -= 1
                elif allowance is not None and allowance.left:
                    allowance.left -= 1  # a retry of this work, paid by it: the shared budget is spent
                else:
                    self._counts["budget_exhausted"] += 1
                    raise BudgetExhausted(
                        f"teacher budget spent: {self.max_calls} requests this epoch "
                        "(teacher.max_calls_per_epoch); remaining samples keep their questions")
            self._counts["requests"] += 1

    def _call(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
              seed: int, funded: bool = False, grammar: Any = None) -> tuple[Completion, float, int]:
        # Engines without grammars keep the four-argument `complete` of the Engine protocol.
        constrained = {"grammar": grammar} if grammar is not None else {}
        attempt = 0
        while True:
            self._take_request(funded and attempt == 0)
            start = time.monotonic()
            try:
                completion = self.engine.complete(messages, max_tokens, temperature, seed, **constrained)
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
            return completion, seconds, attempt + 1

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
