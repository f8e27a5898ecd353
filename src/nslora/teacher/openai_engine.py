"""`OpenAIEngine`: any OpenAI-compatible chat server (OpenAI, vLLM, Ollama, transformers serve).

    engine = OpenAIEngine("http://127.0.0.1:8000/v1", "my-model", api_key="...", timeout=60)
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import time

from .base import Completion, TeacherCallError, safe_url, token_count


# Keep server error texts short in messages and logs.
_DETAIL_CHARS = 300


def parse_chat_reply(body: str) -> Completion:
    """The reply text and token counts of a /chat/completions JSON body.

    Raises:
        TeacherCallError: retryable 'malformed' for a non-JSON body, no choices, or no/empty content.
    """
    try:
        data = json.loads(body)
    except ValueError:
        raise TeacherCallError("malformed", f"reply is not JSON: {body[:80]!r}", retryable=True) from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TeacherCallError("malformed", "reply has no choices", retryable=True)
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise TeacherCallError("malformed", "reply has no message content", retryable=True)
    if not content:
        raise TeacherCallError("malformed", "reply content is empty", retryable=True)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    # A missing or unbelievable count (non-numeric, negative, huge) is recorded as 0: the reply
    # itself is fine, and token accounting must not end the stage.
    return Completion(content, token_count(usage.get("prompt_tokens")) or 0,
                      token_count(usage.get("completion_tokens")) or 0)


def retry_after_seconds(headers) -> float | None:
    """Seconds from a Retry-After (seconds or HTTP date) or retry-after-ms header, if any."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# The request field each kind of server reads a reply grammar from.
GRAMMAR_FIELDS = {
    "vllm": lambda grammar: {"structured_outputs": {"regex": grammar.regex()}},
    "llama_cpp": lambda grammar: {"grammar": grammar.gbnf()},
}


class OpenAIEngine:
    """Any OpenAI-compatible /chat/completions server (OpenAI, vLLM, Ollama, transformers serve).

    The openai client's own retries are off: `CachedTeacher` retries, counts and backs off.
    """

    kind = "openai"

    def __init__(self, base_url: str, model: str, api_key: str, timeout: float = 60.0, *,
                 api_key_env: str = "OPENAI_API_KEY", structured_outputs: str = "none"):
        """
        Args:
            base_url: the server's base URL, ending in /v1.
            model: the model name the server expects.
            api_key: the key itself (kept in memory only; never logged or written).
            timeout: seconds before one call is abandoned.
            api_key_env: the variable the key came from, named in error messages.
            structured_outputs: how the server takes a grammar for the reply: 'vllm' (its
                `structured_outputs: {regex}` request field), 'llama_cpp' (a GBNF `grammar`), or
                'none' (OpenAI's own API takes JSON schemas only: replies are then only checked).
        """
        if structured_outputs != "none" and structured_outputs not in GRAMMAR_FIELDS:
            raise ValueError(f"teacher.structured_outputs: unknown {structured_outputs!r} "
                             f"(none, {', '.join(GRAMMAR_FIELDS)})")
        self._grammar_field = GRAMMAR_FIELDS.get(structured_outputs)
        self.takes_grammar = self._grammar_field is not None
        import openai

        self.model = model
        self.timeout = timeout
        self.api_key_env = api_key_env
        self._url = safe_url(base_url)
        # Part of the cache key: an opaque id of the server (no URL, no credentials on disk).
        self.endpoint = hashlib.sha256(self._url.encode("utf-8")).hexdigest()[:16]
        self._key = api_key
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                     max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIEngine({self._url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 seed: int = 0, grammar=None) -> Completion:
        """One chat completion.

        Args:
            messages: chat messages.
            max_tokens: reply length limit.
            temperature: sampling temperature.
            seed: unused: servers differ in whether they accept one; the cache makes reruns repeat.
            grammar: a `TaggedReply`, sent in the server's field (`structured_outputs`).

        Returns:
            The reply and the server's token counts (0 where it reports no usage).

        Raises:
            TeacherCallError: retryable for timeouts, connection errors, 408, 429, 5xx and
                malformed replies; not retryable for other 4xx (the message names the param to fix).
        """
        import openai

        try:
            # The raw response: its body is parsed here, so a malformed reply is classified rather
            # than turning into a half-built object or a bare string.
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                **({"extra_body": self._grammar_field(grammar)}
                   if grammar is not None and self.takes_grammar else {}))
        except openai.APITimeoutError:
            raise TeacherCallError("timeout", f"no reply from {self._url} within {self.timeout}s "
                                   "(teacher.timeout)", retryable=True) from None
        except openai.APIConnectionError as err:
            raise TeacherCallError("connection", f"cannot reach {self._url}: {self._scrub(err)}",
                                   retryable=True) from None
        except openai.APIStatusError as err:
            raise self._status_error(err) from None
        return parse_chat_reply(raw.text)

    def _scrub(self, err: Exception) -> str:
        text = str(err)
        if self._key:
            text = text.replace(self._key, "***")
        return text[:_DETAIL_CHARS]

    def _status_error(self, err) -> TeacherCallError:
        status = err.status_code
        detail = f"HTTP {status} from {self._url}: {self._scrub(err)}"
        if status == 429:
            return TeacherCallError("rate_limited", detail, retryable=True,
                                    retry_after=retry_after_seconds(err.response.headers))
        if status >= 500 or status == 408:
            # 503 (overloaded, in maintenance) often says when to come back, like 429 does.
            return TeacherCallError(f"http_{status}", detail, retryable=True,
                                    retry_after=retry_after_seconds(err.response.headers))
        if status in (401, 403):
            fix = (f"teacher.api_key_env: the server rejected the key in ${self.api_key_env}; set "
                   "that variable to a valid key or point teacher.api_key_env at the right one")
        elif status == 404:
            fix = (f"teacher.model={self.model!r} / teacher.base_url={self._url!r}: the server knows "
                   "no such model or path; use the name GET <base_url>/models lists, and a base_url "
                   "ending in /v1")
        else:
            fix = (f"teacher.model={self.model!r}: the server rejected the request; check "
                   "teacher.model, teacher.max_tokens and teacher.temperature for this server")
        return TeacherCallError(f"http_{status}", f"{fix} ({detail})", retryable=False)
