"""A small, real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (stdlib only).

Serves POST /v1/chat/completions and GET /v1/models with deterministic replies, an optional fixed
latency, fault injection for the next N requests, and request counters (and `local_server`, which
runs another server process, such as vllm serve, for a block):

    with OpenAIServer(reply=lambda request: "42", latency=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        server.fail_next(3, status=500)            # or status=429, retry_after=1
        server.malform_next(1, kind="not_json")    # or "no_choices", "empty_content"
        server.stall_next(1, seconds=5)            # longer than the client's timeout
        server.count, server.counts_by_status, server.requests

`reply` is a function of the request body, a list of replies (used in turn, cycling) or a string;
the default echoes the last user message as "reply to: <message>". Each request runs in its own
thread, so latency does not serialise concurrent clients.

Run by hand (Ctrl-C stops it):

    python tests/openai_server.py --port 8000 --latency 0.5 --model test-model [--textgrad]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Reply = Callable[[dict], str] | list[str] | str | None
MALFORMED_KINDS = ("not_json", "no_choices", "empty_content", "bad_usage")


def echo_reply(request: dict) -> str:
    """The default reply: computed from the last user message, so answers can be checked."""
    users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
    return f"reply to: {users[-1] if users else ''}"


def textgrad_teacher_reply(request: dict) -> str:
    """A deterministic stand-in for a capable teacher answering TextGrad's three prompt kinds: the
    loss (a critique), the backward pass (feedback on the question) and the TGD update (the question
    with a guiding sentence appended, inside <IMPROVED_VARIABLE> tags, keeping every number)."""
    import re

    messages = request.get("messages", [])
    system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
    user = messages[-1].get("content", "") if messages else ""
    if "<IMPROVED_VARIABLE>" in system:
        current = re.search(r"<VARIABLE>(.*?)</VARIABLE>", user, re.S)
        text = current.group(1).strip() if current else ""
        return f"<IMPROVED_VARIABLE>{text} Work out each group first, then add them.</IMPROVED_VARIABLE>"
    if "<OBJECTIVE_FUNCTION>" in user:
        return "The question should ask for the count of each group before the total."
    return "The answer is wrong: it does not add the legs of every animal."


@dataclass
class _Fault:
    status: int = 200
    retry_after: float | None = None
    malformed: str | None = None
    stall: float = 0.0


class OpenAIServer:
    """The server, started on `start()` / `with` in a background thread; `base_url` ends in /v1."""

    def __init__(self, reply: Reply = None, *, model: str | None = "test-model", latency: float = 0.0,
                 api_key: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 verbose: bool = False):
        """
        Args:
            reply: function of the request body, list of replies, a fixed string, or None (echo).
            model: the only model name accepted (others get 404); None accepts any.
            latency: seconds every chat request waits before answering.
            api_key: when set, requests without "Authorization: Bearer <api_key>" get 401.
            host, port: where to listen; port 0 picks a free port.
            verbose: log each request to stderr.
        """
        self.reply = reply
        self.model = model
        self.latency = latency
        self.api_key = api_key
        self.verbose = verbose
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._replies_used = 0
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self.count = 0  # chat completion requests received, whatever the outcome
        self.counts_by_status: Counter = Counter()
        self.requests: list[dict] = []  # request bodies, in arrival order
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- fault injection: each applies to the next n chat requests, in the order queued --
    def fail_next(self, n: int, status: int = 500, *, retry_after: float | None = None) -> None:
        """Answer the next `n` requests with HTTP `status` (an OpenAI-style error body), adding a
        Retry-After header when `retry_after` is given."""
        self._queue(n, _Fault(status=status, retry_after=retry_after))

    def malform_next(self, n: int, kind: str = "not_json") -> None:
        """Answer the next `n` requests 200 with a broken body: 'not_json', 'no_choices',
        'empty_content' or 'bad_usage' (a good reply, unbelievable token counts)."""
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"kind must be one of {MALFORMED_KINDS}")
        self._queue(n, _Fault(malformed=kind))

    def stall_next(self, n: int, seconds: float) -> None:
        """Delay the next `n` replies by `seconds` (on top of the latency), e.g. past a client timeout."""
        self._queue(n, _Fault(stall=seconds))

    def _queue(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    def clear_faults(self) -> None:
        """Drop the faults still queued."""
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.count = 0
            self.counts_by_status.clear()
            self.requests.clear()

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"openai-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in latency or a stall
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        # Close kept-alive connections too, or their handler threads would go on serving them.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling (called from handler threads) --
    def _chat(self, body: dict, authorization: str | None) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.count += 1
            self.requests.append(body)
            fault = self._faults.popleft() if self._faults else _Fault()
        wait = self.latency + fault.stall
        if wait > 0:
            self._stop.wait(wait)
        if fault.status != 200:
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return fault.status, headers, _error(f"injected HTTP {fault.status}", "server_error")
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return 401, {}, _error("Incorrect API key provided.", "invalid_api_key")
        if self.model is not None and body.get("model") != self.model:
            return 404, {}, _error(f"The model `{body.get('model')}` does not exist.", "model_not_found")
        if fault.malformed == "not_json":
            return 200, {}, b"<html>upstream proxy error</html>"
        text = "" if fault.malformed == "empty_content" else self._reply_text(body)
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        choices = [] if fault.malformed == "no_choices" else [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                 "created": int(time.time()), "model": body.get("model"), "choices": choices,
                 "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(text.split()),
                           "total_tokens": prompt_words + len(text.split())}}
        if fault.malformed == "bad_usage":  # a fine reply with token counts no one can believe
            reply["usage"] = {"prompt_tokens": "many", "completion_tokens": 10**30}
        return 200, {}, json.dumps(reply).encode()

    def _reply_text(self, body: dict) -> str:
        if self.reply is None:
            return echo_reply(body)
        if isinstance(self.reply, str):
            return self.reply
        if isinstance(self.reply, list):
            with self._lock:
                text = self.reply[self._replies_used % len(self.reply)]
                self._replies_used += 1
            return text
        return self.reply(body)

    def _models(self) -> bytes:
        names = [self.model or "any"]
        return json.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tests"} for name in names]}).encode()


def _error(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, app: OpenAIServer):
        self.app = app
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.app._lock:
            self.app._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.app._lock:
            self.app._connections.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers and the openai client expect
    server: _HTTPServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {}, _error(f"no route {self.path}", "not_found"), count=False)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(400, {}, _error("body is not JSON", "invalid_json"), count=False)
        status, headers, payload = self.server.app._chat(body, self.headers.get("Authorization"))
        self._send(status, headers, payload)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, {}, self.server.app._models(), count=False)
        self._send(404, {}, _error(f"no route {self.path}", "not_found"), count=False)

    def _send(self, status: int, headers: dict[str, str], payload: bytes, count: bool = True) -> None:
        if count:
            with self.server.app._lock:
                self.server.app.counts_by_status[status] += 1
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during a stall)

    def log_message(self, format: str, *args) -> None:
        if self.server.app.verbose:
            super().log_message(format, *args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(command: list[str], env: dict, log_path: Path, startup_seconds: float):
    """Run another server process, `command` with '{port}' replaced by a free port, until its
    /health answers (vllm serve, transformers serve); yields the port, and stops the server after
    the block. Raises RuntimeError with the log's tail if it dies or does not answer within
    `startup_seconds`."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([part.replace("{port}", str(port)) for part in command],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start:\n{log_path.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible test server (echo replies).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    parser.add_argument("--model", default=None, help="only accept this model name (default: any)")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument("--textgrad", action="store_true", help="answer like a TextGrad teacher")
    args = parser.parse_args()
    server = OpenAIServer(reply=textgrad_teacher_reply if args.textgrad else None, model=args.model, latency=args.latency, api_key=args.api_key,
                          host=args.host, port=args.port, verbose=True).start()
    print(f"serving on {server.base_url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
