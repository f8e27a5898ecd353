"""The teacher: one narrow `generate` over chat messages, whatever model answers.

Callers (the symbolic update, TextGrad adapters) see only the `Teacher` protocol. `make_teacher`
builds the real one from the `teacher` params section: an engine (an OpenAI-compatible server or a
transformers model in this process, see `local_engine` and `openai_engine`) behind a content-addressed disk
cache, retries with backoff, a per-epoch call budget and counters:

    teacher = make_teacher(params.teacher, Path(".nslora/teacher_cache"), local_model_dir=...)
    reply = teacher.generate([{"role": "user", "content": "Critique this answer ..."}])
    teacher.stats()  # {"calls": 1, "cache_hits": 0, "retries": 0, ...}

Every completed call is written to the cache at once, so a killed stage loses nothing and a rerun
repeats no completed call. The cache never holds the API key or the server URL (only an opaque id
of the endpoint, so replies of one server are never served for another).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .base import (DEFAULT_BASE_URL, PLACEHOLDER_KEY, BudgetExhausted, Completion, Engine, Teacher, TeacherCallError,
                   TeacherError, is_local_url, safe_url, token_count)
from .cache import Allowance, CachedTeacher, cache_key

if TYPE_CHECKING:
    from ..config import TeacherConfig

__all__ = ["Allowance", "BudgetExhausted", "CachedTeacher", "Completion", "Engine", "Teacher", "TeacherCallError",
           "TeacherError", "cache_key", "is_local_url", "make_teacher", "resolve_api_key", "safe_url",
           "token_count"]


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
    from .local_engine import LocalEngine  # torch and transformers: only when asked for
    from .openai_engine import OpenAIEngine

    if config.engine == "hint":
        raise ValueError("teacher.engine='hint' is not a chat teacher: it derives hints from the gold "
                         "solution without calls; use the hint rewriter, not make_teacher")
    if config.engine == "openai":
        engine: Engine = OpenAIEngine(config.base_url or DEFAULT_BASE_URL, config.model,
                                      resolve_api_key(config), config.timeout,
                                      api_key_env=config.api_key_env,
                                      structured_outputs=config.structured_outputs)
    elif config.engine == "local":
        if local_model_dir is None:
            raise ValueError("teacher.engine='local' needs local_model_dir: the HF directory "
                             f"materialised from teacher.model={config.model!r}")
        # A batch as wide as the samples in flight: TextGrad's calls arrive in step.
        engine = LocalEngine(local_model_dir, precision, name=config.model,
                             max_batch=max(1, config.concurrency))
    else:
        raise ValueError(f"teacher.engine: unknown engine {config.engine!r} (local, openai, hint)")
    return CachedTeacher(engine, cache_dir, max_retries=config.max_retries,
                         max_calls=config.max_calls_per_epoch if max_calls is None else max_calls,
                         retry_reserve=config.retry_reserve, grammar=config.grammar,
                         max_tokens=config.max_tokens, temperature=config.temperature,
                         max_tokens_by_kind={"critique": config.critique_max_tokens,
                                             "feedback": config.feedback_max_tokens,
                                             "rewrite": config.rewrite_max_tokens})
