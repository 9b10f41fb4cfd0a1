"""The server's limits and hostile HTTP, against a real uvicorn server on a loopback port.

Nested JSON, bad or missing ``Content-Length``, oversized bodies, idle connections, a full queue
(429 with ``Retry-After``), and batched decoding equal to unbatched greedy decoding.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deeplm.export import load_model
from deeplm.model.generate import generate_text
from deeplm.serve import Limits, make_server
from tests.finished_run import RUN_NAME, cli_env, micro_run, one_thread

openai = pytest.importorskip("openai")

LIMITS = Limits(
    max_batch=4, queue_size=16, keep_alive_timeout=1.0, max_body_bytes=4096, graceful_timeout=2
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return micro_run(tmp_path_factory)


@pytest.fixture(scope="module")
def local(run_dir):
    return load_model(run_dir=run_dir, device="cpu")


@pytest.fixture(scope="module")
def server(local):
    with one_thread():
        srv = make_server(local, port=0, quiet=True, limits=LIMITS)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def _raw(srv, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        sock.sendall(request)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.startswith(b"HTTP/1.1 4"):
                    break
        except TimeoutError:
            pass
        return out


def _post(srv, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers or {})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_nested_json_is_400(server) -> None:
    code, _, body = _post(server, b"[" * 4000)  # under the body limit, far over the stack
    assert code == 400 and "nested too deeply" in body["error"]["message"]
    code, _, body = _post(server, json.dumps({"model": RUN_NAME, "prompt": float("nan")}).encode())
    assert code == 400 and body["error"]["param"] == "prompt"


def test_negative_and_missing_content_length(server) -> None:
    neg = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert neg.startswith(b"HTTP/1.1 400"), neg[:80]
    missing = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 411"), missing[:80]


def test_oversized_body_is_413_and_hangup_is_harmless(server) -> None:
    code, _, body = _post(server, b"{" + b" " * 5000 + b"}")
    assert code == 413 and "4096 bytes" in body["error"]["message"]
    # announce a big body, read the 413, hang up without sending it
    answer = _raw(
        server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert openai.OpenAI(base_url=server.url, api_key="x").models.list().data[0].id == RUN_NAME


def test_idle_connections_are_closed(server) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    partial = socket.create_connection(("127.0.0.1", server.port))
    partial.sendall(b"GET /health HTTP/1.1\r\n")  # a request head that never ends
    try:
        start = time.monotonic()
        for s in [*socks, partial]:
            s.settimeout(10)
            assert s.recv(1) == b""  # closed by the server
        assert time.monotonic() - start < 5  # keep-alive timeout 1 s
    finally:
        for s in [*socks, partial]:
            s.close()


def test_body_that_never_arrives_is_408(local) -> None:
    limits = Limits(request_timeout=1.0, graceful_timeout=1)
    with one_thread():
        srv = make_server(local, port=0, quiet=True, limits=limits)
        srv.start()
        try:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            start = time.monotonic()
            answer = _raw(srv, head + b'{"model": ')  # then silence
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
            assert time.monotonic() - start < 8
        finally:
            srv.stop()


def test_full_queue_answers_429_with_retry_after(server) -> None:
    # 3 prompts x 8 choices: more sequences than the queue holds
    body = {"model": RUN_NAME, "prompt": ["The", "A", "It"], "max_tokens": 2, "n": 8}
    code, headers, answer = _post(server, json.dumps(body).encode())
    assert code == 429, answer
    assert int(headers["retry-after"]) >= 1
    assert answer["error"]["code"] == "rate_limit_exceeded"


def test_client_hanging_up_mid_stream_frees_its_rows(server) -> None:
    body = {"model": RUN_NAME, "prompt": "The", "max_tokens": 60, "n": 8, "stream": True}
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + data)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # streaming; then hang up
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/health")
        load = json.loads(conn.getresponse().read())
        conn.close()
        if load["active"] == 0 and load["waiting"] == 0:
            break
        assert time.monotonic() < deadline, load
        time.sleep(0.05)


def test_concurrent_greedy_equals_unbatched(server, local) -> None:
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    prompts = [f"It was {i} o'clock and" if i % 2 else f"Story {i}:" for i in range(8)]

    def complete(p: str) -> str:
        r = client.completions.create(model=RUN_NAME, prompt=p, max_tokens=20, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(complete, prompts))
    tok = local.tokenizer
    with one_thread():
        alone = [
            generate_text(local.model, tok, [tok.bos_id] + tok.encode(p), 20, temperature=0.0).text
            for p in prompts
        ]
    assert together == alone
    # streaming through the batch gives the same text
    chunks = client.completions.create(
        model=RUN_NAME, prompt=prompts[1], max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == alone[1]


def test_sigterm_finishes_running_requests_then_exits(run_dir) -> None:
    """Graceful shutdown: a stream in progress at SIGTERM still ends with every choice."""
    cmd = [sys.executable, "-m", "deeplm.cli", "serve", "--run-dir", str(run_dir), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--max-batch", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if m := re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
                break
        assert url, "the server did not start"
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(
            model=RUN_NAME, prompt="The", max_tokens=50, n=8, stream=True, temperature=1.0
        )
        finished, signalled = {}, False
        for chunk in stream:
            if not signalled:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            for choice in chunk.choices:
                if choice.finish_reason:
                    finished[choice.index] = choice.finish_reason
        assert sorted(finished) == list(range(8))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
