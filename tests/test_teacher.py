"""The teacher against real servers: the stdlib OpenAI-compatible test server (faults injected),
`transformers serve` on the tiny model, and the in-process LocalEngine.

    python -m pytest tests/test_teacher.py -q
"""

from __future__ import annotations

import email.utils
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nslora.config import TeacherConfig
from nslora.teacher import (BudgetExhausted, CachedTeacher, TeacherError, cache_key, is_local_url,
                            make_teacher, safe_url)
from nslora.teacher.local_engine import Int8DecodeLinear, LocalEngine, int8_decode_available
from nslora.teacher.openai_engine import OpenAIEngine, retry_after_seconds
from openai_server import OpenAIServer

SECRET = "sk-test-DO-NOT-STORE-4f9c2a"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a teacher."}, {"role": "user", "content": text}]


@pytest.fixture
def server():
    with OpenAIServer(model="test-model") as srv:
        yield srv


@pytest.fixture
def make(server, tmp_path):
    """A CachedTeacher on `server` with fast backoff; `cache` defaults to one dir per test."""
    made = []

    def _make(cache: Path | None = None, timeout: float = 5.0, **kwargs) -> CachedTeacher:
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("max_retries", 3)
        engine = OpenAIEngine(server.base_url, "test-model", SECRET, timeout=timeout)
        teacher = CachedTeacher(engine, cache or tmp_path / "cache", **kwargs)
        made.append(teacher)
        return teacher

    yield _make
    for teacher in made:
        teacher.close()


def test_reply_then_cache_hit(server, make, tmp_path):
    teacher = make()
    assert teacher.generate(ask("2+2?")) == "reply to: 2+2?"
    assert teacher.generate(ask("2+2?")) == "reply to: 2+2?"
    assert server.count == 1
    stats = teacher.stats()
    assert (stats["calls"], stats["cache_hits"], stats["retries"], stats["failures"]) == (1, 1, 0, 0)
    assert stats["prompt_tokens"] == 5 and stats["completion_tokens"] == 3  # the server counts words
    # Request parameters are part of the key: another max_tokens or temperature is another call.
    teacher.generate(ask("2+2?"), max_tokens=7)
    teacher.generate(ask("2+2?"), temperature=0.7)
    assert server.count == 3
    assert server.requests[1]["max_tokens"] == 7 and server.requests[2]["temperature"] == 0.7


def test_cache_survives_a_rerun(server, make, tmp_path):
    first = make()
    replies = [first.generate(ask(f"q{i}")) for i in range(3)]
    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    request = {"engine": "openai", "model": "test-model", "messages": ask("q0"), "max_tokens": 512,
               "temperature": 0.0, "endpoint": first.engine.endpoint}
    key = cache_key(request)
    assert tmp_path / "cache" / key[:2] / f"{key}.json" in files

    rerun = make()  # a new process would build exactly this
    assert [rerun.generate(ask(f"q{i}")) for i in range(3)] == replies
    assert server.count == 3
    assert rerun.stats()["calls"] == 0 and rerun.stats()["cache_hits"] == 3


def test_server_error_is_retried(server, make):
    teacher = make()
    server.fail_next(2, status=500)
    assert teacher.generate(ask("x")) == "reply to: x"
    assert server.count == 3 and server.counts_by_status == {500: 2, 200: 1}
    stats = teacher.stats()
    assert stats["calls"] == 1 and stats["retries"] == 2 and stats["retries_by_reason"] == {"http_500": 2}


def test_rate_limit_waits_for_retry_after(server, make):
    teacher = make(backoff_base=0.01)
    server.fail_next(1, status=429, retry_after=1)
    start = time.monotonic()
    assert teacher.generate(ask("x")) == "reply to: x"
    assert time.monotonic() - start >= 1.0  # backoff alone would wait ~0.01 s
    assert server.counts_by_status == {429: 1, 200: 1}
    assert teacher.stats()["retries_by_reason"] == {"rate_limited": 1}


@pytest.mark.parametrize("kind", ["not_json", "no_choices", "empty_content"])
def test_malformed_reply_is_retried(server, make, kind):
    teacher = make()
    server.malform_next(1, kind)
    assert teacher.generate(ask("x")) == "reply to: x"
    assert teacher.stats()["retries_by_reason"] == {"malformed": 1}


def test_malformed_replies_give_up_after_max_retries(server, make, tmp_path):
    teacher = make(max_retries=2)
    server.malform_next(5, "not_json")
    with pytest.raises(TeacherError, match="after 3 attempts: malformed: reply is not JSON"):
        teacher.generate(ask("x"))
    assert server.count == 3
    stats = teacher.stats()
    assert stats["failures"] == 1 and stats["failures_by_reason"] == {"malformed": 1}
    assert stats["retries"] == 2
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached


def test_too_slow_times_out_then_retries_or_fails(server, make):
    teacher = make(timeout=0.5, max_retries=1)
    server.stall_next(1, seconds=3)
    start = time.monotonic()
    assert teacher.generate(ask("slow")) == "reply to: slow"
    assert time.monotonic() - start < 2.5
    assert teacher.stats()["retries_by_reason"] == {"timeout": 1}

    server.stall_next(2, seconds=3)
    with pytest.raises(TeacherError, match="timeout: no reply .* within 0.5s"):
        teacher.generate(ask("slower"))
    assert teacher.stats()["failures_by_reason"] == {"timeout": 1}


def test_cache_key_names_the_endpoint_not_only_the_model(server, make, tmp_path):
    first = make()
    assert first.generate(ask("q")) == "reply to: q"
    with OpenAIServer(model="test-model", reply="another server's reply") as other:
        engine = OpenAIEngine(other.base_url, "test-model", SECRET, timeout=5)
        with CachedTeacher(engine, tmp_path / "cache") as second:  # the same cache directory
            assert second.generate(ask("q")) == "another server's reply"
            assert other.count == 1
    text = "".join(f.read_text() for f in (tmp_path / "cache").rglob("*.json"))
    assert server.base_url not in text and "127.0.0.1" not in text  # an opaque id, not the URL


def test_503_waits_for_retry_after(server, make):
    teacher = make(backoff_base=0.01)
    server.fail_next(1, status=503, retry_after=1)
    start = time.monotonic()
    assert teacher.generate(ask("x")) == "reply to: x"
    assert time.monotonic() - start >= 1.0
    assert server.counts_by_status == {503: 1, 200: 1}


def test_unbelievable_usage_is_recorded_as_zero_not_a_crash(server, make, tmp_path):
    teacher = make()
    server.malform_next(1, "bad_usage")
    assert teacher.generate(ask("x")) == "reply to: x"
    stats = teacher.stats()
    assert (stats["calls"], stats["prompt_tokens"], stats["completion_tokens"]) == (1, 0, 0)
    # The same from a cache file edited by hand: the reply is served, the counts are dropped.
    entry = next((tmp_path / "cache").rglob("*.json"))
    data = json.loads(entry.read_text())
    data.update(prompt_tokens="lots", completion_tokens=1e300)
    entry.write_text(json.dumps(data))
    rerun = make()
    assert rerun.generate(ask("x")) == "reply to: x" and server.count == 1
    assert rerun.call_log()[0]["prompt_tokens"] == 0


def test_budget_counts_every_request_retries_included(server, make):
    teacher = make(max_calls=3)
    server.fail_next(2, status=500)
    assert teacher.generate(ask("a")) == "reply to: a"  # three requests: the budget is spent
    with pytest.raises(BudgetExhausted):
        teacher.generate(ask("b"))
    assert server.count == 3
    server.malform_next(5, "not_json")
    fresh = make(max_calls=2, max_retries=4)
    with pytest.raises(BudgetExhausted):
        fresh.generate(ask("c"))  # malformed replies are billed requests too: 2, then refused
    assert server.count == 5 and fresh.stats()["requests"] == 2
    server.clear_faults()


def test_a_retry_after_a_429_is_paid_by_its_samples_allowance(server, make):
    """Budget 12, three samples reserving 4 calls each: the whole budget is reserved. A 429 on a
    sample's first call is retried from that sample's own unused calls instead of being refused
    (which would strand the sample while its allowance still had calls)."""
    teacher = make(max_calls=12)
    allowances = [teacher.reserve(4, label=f"s{i}") for i in range(3)]
    assert all(allowances) and teacher.reserve(1) is None
    server.fail_next(1, status=429, retry_after=0)
    for i, allowance in enumerate(allowances):
        with teacher.drawing_from(allowance):
            assert [teacher.generate(ask(f"s{i} call {c}")) for c in range(3)] == [
                f"reply to: s{i} call {c}" for c in range(3)]
    stats = teacher.stats()
    assert stats["budget_exhausted"] == 0 and stats["retries"] == 1 and stats["requests"] == 10
    assert server.counts_by_status == {429: 1, 200: 9}


def test_retry_reserve_is_kept_out_of_reservations(server, make):
    teacher = make(max_calls=12, retry_reserve=4)
    assert teacher.reserve(4) and teacher.reserve(4) and teacher.reserve(4) is None
    server.fail_next(2, status=500)
    assert teacher.generate(ask("unreserved work")) == "reply to: unreserved work"  # 3 of the 4 kept
    assert teacher.stats()["requests"] == 3


def test_budget_exhausted(server, make):
    teacher = make(max_calls=2)
    teacher.generate(ask("a"))
    teacher.generate(ask("b"))
    with pytest.raises(BudgetExhausted, match="teacher.max_calls_per_epoch"):
        teacher.generate(ask("c"))
    assert teacher.generate(ask("a")) == "reply to: a"  # cache hits stay free
    assert server.count == 2
    stats = teacher.stats()
    assert (stats["calls"], stats["cache_hits"], stats["budget_exhausted"]) == (2, 1, 1)


def test_concurrent_threads_get_their_own_answers(tmp_path):
    # Latency makes calls overlap; duplicates across threads must cost one call each.
    with OpenAIServer(model="test-model", latency=0.05) as srv:
        teacher = CachedTeacher(OpenAIEngine(srv.base_url, "test-model", SECRET, timeout=5),
                                tmp_path / "cache")
        results: dict[tuple[int, int], str] = {}
        errors: list[Exception] = []

        def work(t: int) -> None:
            try:
                for i in range(6):
                    results[t, i] = teacher.generate(ask(f"question {(t * 6 + i) % 24}"))
            except Exception as err:  # surfaced below; a thread's exception is otherwise lost
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        teacher.close()
        assert not errors
        assert all(reply == f"reply to: question {(t * 6 + i) % 24}" for (t, i), reply in results.items())
        assert len(results) == 48 and srv.count == 24
        assert teacher.stats()["calls"] == 24 and teacher.stats()["cache_hits"] == 24


def test_client_errors_fail_at_once_naming_the_param(tmp_path):
    with OpenAIServer(model="test-model", api_key=SECRET) as srv:
        wrong_key = CachedTeacher(OpenAIEngine(srv.base_url, "test-model", "sk-wrong", timeout=5,
                                               api_key_env="MY_KEY"), tmp_path / "a")
        with pytest.raises(TeacherError, match=r"not retried.*teacher.api_key_env.*\$MY_KEY"):
            wrong_key.generate(ask("x"))
        wrong_model = CachedTeacher(OpenAIEngine(srv.base_url, "gpt-nope", SECRET, timeout=5), tmp_path / "b")
        with pytest.raises(TeacherError, match="not retried.*teacher.model='gpt-nope'"):
            wrong_model.generate(ask("x"))
        assert srv.counts_by_status == {401: 1, 404: 1}
        assert wrong_key.stats()["failures_by_reason"] == {"http_401": 1}


def test_api_key_is_never_written_or_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NSLORA_TEST_TEACHER_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    with OpenAIServer(model="test-model", api_key=SECRET) as srv:
        config = TeacherConfig(engine="openai", model="test-model", base_url=srv.base_url,
                               api_key_env="NSLORA_TEST_TEACHER_KEY", max_retries=2)
        teacher = make_teacher(config, tmp_path / "cache")
        teacher.backoff_base = 0.01
        srv.fail_next(1, status=503)
        assert teacher.generate(ask("x")) == "reply to: x"  # the server checked the key
        teacher.close()
        base_url = srv.base_url
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and base_url.encode() not in data, path
    assert SECRET not in caplog.text and SECRET not in repr(teacher)


def test_missing_key_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("NSLORA_UNSET_KEY", raising=False)
    remote = TeacherConfig(engine="openai", model="gpt-4o", base_url="https://api.example.com/v1",
                           api_key_env="NSLORA_UNSET_KEY")
    with pytest.raises(TeacherError, match="set the environment variable NSLORA_UNSET_KEY"):
        make_teacher(remote, tmp_path)
    default_url = TeacherConfig(engine="openai", model="gpt-4o", api_key_env="NSLORA_UNSET_KEY")
    with pytest.raises(TeacherError, match="NSLORA_UNSET_KEY.*api.openai.com"):
        make_teacher(default_url, tmp_path)
    # A server on this machine needs no key.
    with OpenAIServer(model="test-model") as srv:
        local = TeacherConfig(engine="openai", model="test-model", base_url=srv.base_url,
                              api_key_env="NSLORA_UNSET_KEY")
        with make_teacher(local, tmp_path) as teacher:
            assert teacher.generate(ask("x")) == "reply to: x"


def test_make_teacher_rejects_hint_and_local_without_model(tmp_path):
    with pytest.raises(ValueError, match="not a chat teacher"):
        make_teacher(TeacherConfig(engine="hint"), tmp_path)
    with pytest.raises(ValueError, match="needs local_model_dir"):
        make_teacher(TeacherConfig(engine="local"), tmp_path)


def test_local_engine_is_deterministic_and_counts_tokens(tiny_model_dir, tmp_path):
    config = TeacherConfig(engine="local", model="tiny-llama", max_tokens=12)
    teacher = make_teacher(config, tmp_path / "a", local_model_dir=tiny_model_dir, precision="fp32")
    engine = teacher.engine
    greedy = teacher.generate(ask("How many legs do 3 chickens have?"))
    # A fresh cache forces a second generation: greedy decoding gives the same text.
    again = CachedTeacher(engine, tmp_path / "b", max_tokens=12)
    assert again.generate(ask("How many legs do 3 chickens have?")) == greedy
    stats = teacher.stats()
    prompt_ids = engine.tokenizer(engine.prompt(ask("How many legs do 3 chickens have?")),
                                  add_special_tokens=False)["input_ids"]
    assert stats["prompt_tokens"] == len(prompt_ids)
    assert 1 <= stats["completion_tokens"] <= 12

    # Sampling: seeded from the request, so a rerun reproduces it, without touching global RNG.
    torch.manual_seed(123)
    expected_rng = torch.rand(3)
    torch.manual_seed(123)
    sampled = [CachedTeacher(engine, tmp_path / f"s{i}", max_tokens=12).generate(
        ask("Count the legs."), temperature=1.0) for i in range(2)]
    assert torch.equal(torch.rand(3), expected_rng)
    assert sampled[0] == sampled[1]
    fresh = CachedTeacher(engine, tmp_path / "t", max_tokens=12)
    others = {fresh.generate(ask(f"Count {i}"), temperature=1.0) for i in range(4)}
    assert len(others) > 1  # different requests, different seeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decode_linear_approximates_the_linear_in_its_dtype(dtype):
    if not int8_decode_available(dtype, torch.device("cpu")):
        pytest.skip("this torch build has no int8 weight-only matmul on the CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    wrapped = Int8DecodeLinear(linear, max_rows=4)
    decode, prefill = torch.randn(1, 3, 64, dtype=dtype), torch.randn(2, 3, 64, dtype=dtype)
    with torch.no_grad():
        exact, approx = linear(decode), wrapped(decode)
        # Decoding rows (<= max_rows) take the int8 path: the model's dtype, ~1% rounding.
        assert approx.dtype == dtype and approx.shape == exact.shape and not torch.equal(approx, exact)
        assert ((approx - exact).norm() / exact.norm()).item() < 0.02
        # More rows (prefill) use the model's own weight, exactly.
        assert torch.equal(wrapped(prefill), linear(prefill))


def test_batched_and_prefix_cached_replies_equal_one_at_a_time(tiny_model_dir):
    # Prompts sharing a long system prompt, as TextGrad's calls of one kind do.
    system = "You are a careful teacher who explains arithmetic. " * 6
    requests = [[{"role": "system", "content": system},
                 {"role": "user", "content": f"What is {i} + {3 * i}?" + " Explain." * i}] for i in range(4)]
    # int8_decode off: its rounding would hide what this test compares.
    alone = LocalEngine(tiny_model_dir, "fp32", max_batch=1, prefix_cache_tokens=0, int8_decode=False)
    expected = [alone.complete(r, 10, 0.0) for r in requests]
    # max_batch calls arrive within gather_seconds: one batch of 4, whatever the thread timing.
    batched = LocalEngine(tiny_model_dir, "fp32", max_batch=4, gather_seconds=30, int8_decode=False)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda r: batched.complete(r, 10, 0.0), requests))
    batched.close()
    assert batched.batch_sizes == [4]
    assert [(c.text, c.prompt_tokens, c.completion_tokens) for c in got] == \
        [(c.text, c.prompt_tokens, c.completion_tokens) for c in expected]
    # Every prompt after the first reused the shared system prompt's cache.
    ids = [batched.tokenizer(batched.prompt(r), add_special_tokens=False)["input_ids"] for r in requests]
    shared = min(next(n for n, (a, b) in enumerate(zip(ids[0], other)) if a != b) for other in ids[1:])
    assert shared > 40 and batched.prefill_tokens["cached"] >= 3 * shared
    assert batched.prefill_tokens["cached"] + batched.prefill_tokens["computed"] == \
        sum(c.prompt_tokens - 1 for c in got)

    # The tiny model's greedy replies barely depend on the prompt, so also compare next-token
    # logits: from the reused, left-padded caches they equal a plain forward of each prompt.
    width = max(map(len, ids))
    cache = batched._padded_cache([batched._prefill(i[:-1]) for i in ids], width - 1)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        step = batched.lm(input_ids=torch.tensor([[i[-1]] for i in ids]), attention_mask=mask,
                          position_ids=torch.tensor([[len(i) - 1] for i in ids]),
                          **{batched._cache_argument: cache}).logits[:, -1]
        plain = torch.stack([batched.lm(input_ids=torch.tensor([i])).logits[0, -1] for i in ids])
    torch.testing.assert_close(step, plain, atol=1e-5, rtol=1e-4)


def test_urls_and_retry_after_parsing():
    with_secrets = "https://user:pw@proxy.example.com:8443/v1?api-key=abc"
    assert safe_url(with_secrets) == "https://proxy.example.com:8443/v1"
    assert safe_url(None) == "https://api.openai.com/v1"
    assert is_local_url("http://localhost:8000/v1") and not is_local_url("https://api.example.com/v1")
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_seconds({"retry-after": in_30s}) <= 30
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None


@pytest.mark.integration
def test_transformers_serve_end_to_end(transformers_serve, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NSLORA_TEST_UNSET", raising=False)
    # The server only answers to the model name exactly as on its command line.
    config = TeacherConfig(engine="openai", model=str(tiny_model_dir), base_url=transformers_serve,
                           api_key_env="NSLORA_TEST_UNSET", max_tokens=8, timeout=30)
    with make_teacher(config, tmp_path / "cache") as teacher:
        reply = teacher.generate(ask("How many legs do 3 chickens have?"))
        assert teacher.generate(ask("How many legs do 3 chickens have?")) == reply
        stats = teacher.stats()
    assert stats["calls"] == 1 and stats["cache_hits"] == 1 and stats["failures"] == 0
    assert stats["prompt_tokens"] > 0 and 0 < stats["completion_tokens"] <= 8
    # Same weights, same template, greedy: the in-process engine writes the same reply.
    local = LocalEngine(tiny_model_dir, "fp32").complete(ask("How many legs do 3 chickens have?"), 8, 0.0)
    assert local.text == reply
    assert local.prompt_tokens == stats["prompt_tokens"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
