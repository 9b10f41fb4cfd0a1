"""``deeplm serve`` as a real process (uvicorn), driven by the official ``openai`` client."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deeplm.chat import format_chat, stop_token_ids
from deeplm.export import load_model
from deeplm.model.generate import generate_text
from tests.finished_run import RUN_NAME, cli_env, micro_run, one_thread

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = micro_run(tmp_path_factory)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deeplm.cli", "serve", "--run-dir", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(),
    )
    lines: list[str] = []
    url = None
    deadline = time.time() + 60
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines))
    drain = threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True)
    drain.start()  # keep reading the access log so the pipe never fills
    client = openai.OpenAI(base_url=url, api_key="dummy", max_retries=0, timeout=60)
    try:
        yield client, url, run_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def local(server):
    """The same model in this process, to compute expected outputs."""
    return load_model(run_dir=server[2], device="cpu")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_models(server) -> None:
    client, url, _ = server
    assert url.startswith("http://127.0.0.1:")  # loopback by default
    models = client.models.list()
    assert [m.id for m in models.data] == [RUN_NAME]
    assert client.models.retrieve(RUN_NAME).id == RUN_NAME


def test_completion_greedy_equals_local_and_stream(server, local) -> None:
    client = server[0]
    prompt = "The President  said"
    r = client.completions.create(model=RUN_NAME, prompt=prompt, max_tokens=12, temperature=0)
    tok = local.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    expected = generate_text(local.model, tok, ids, 12, temperature=0.0)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(expected.token_ids)
    chunks = list(
        client.completions.create(
            model=RUN_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    # a stop string cuts the text before it
    if len(expected.text.strip()) > 4:
        stop = expected.text.strip()[2:4]
        cut = client.completions.create(
            model=RUN_NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == expected.text[: expected.text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_chat_stream_and_not(server, local) -> None:
    client = server[0]
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hello, who are you?"},
    ]
    kw = dict(model=RUN_NAME, messages=messages, max_tokens=10, temperature=0)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    tok = local.tokenizer
    ids = format_chat(tok, messages, None).ids
    expected = generate_text(
        local.model, tok, ids, 10, temperature=0.0, stop_token_ids=stop_token_ids(tok)
    )
    assert msg.content == expected.text
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # n choices with a seed are reproducible
    a = client.chat.completions.create(model=RUN_NAME, messages=messages, max_tokens=6, n=2, seed=5)
    b = client.chat.completions.create(model=RUN_NAME, messages=messages, max_tokens=6, n=2, seed=5)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_concurrent_requests_do_not_interfere(server) -> None:
    client = server[0]

    def request(i: int) -> str:
        if i % 3 == 0:  # streamed chat
            chunks = client.chat.completions.create(
                model=RUN_NAME,
                messages=[{"role": "user", "content": f"Tell me about number {i}."}],
                max_tokens=16,
                seed=i,
                temperature=1.0,
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if i % 3 == 1:  # streamed completion
            chunks = client.completions.create(
                model=RUN_NAME, prompt=f"Story {i}:", max_tokens=16, seed=i, stream=True
            )
            return "".join(c.choices[0].text for c in chunks)
        r = client.completions.create(
            model=RUN_NAME, prompt=f"It was {i} o'clock", max_tokens=16, seed=i, top_p=0.9
        )
        return r.choices[0].text

    alone = [request(i) for i in range(6)]  # one at a time
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(request, range(6)))
    assert together == alone
    assert len(set(alone)) > 1


def test_validation_errors(server, local) -> None:
    client = server[0]
    ctx = local.cfg.max_seq_len

    def status(fn, **kw) -> tuple[int, dict]:
        with pytest.raises(openai.APIStatusError) as info:
            fn(**kw)
        return info.value.status_code, info.value.body

    comp = client.completions.create
    base = dict(model=RUN_NAME, prompt="The", max_tokens=4)
    code, body = status(comp, **(base | {"max_tokens": -1}))
    assert code == 400 and body["param"] == "max_tokens"
    code, body = status(comp, **(base | {"model": "gpt-4"}))
    assert code == 404 and body["code"] == "model_not_found"
    code, body = status(comp, **(base | {"prompt": "the " * (2 * ctx)}))
    assert code == 400 and body["code"] == "context_length_exceeded"
    code, body = status(comp, **(base | {"max_tokens": ctx}))
    assert code == 400 and body["code"] == "context_length_exceeded"
    for bad in (
        {"temperature": 3},
        {"top_p": 0},
        {"n": 100},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"presence_penalty": 1.0},
        {"logprobs": 2},
    ):
        assert status(comp, **(base | bad))[0] == 400, bad
    chat = client.chat.completions.create
    code, body = status(chat, model=RUN_NAME, messages=[{"role": "wizard", "content": "hi"}])
    assert code == 400 and "role" in body["message"]
    assert status(chat, model=RUN_NAME, messages=[])[0] == 400
    # raw HTTP: malformed JSON, unknown route
    host, port = server[1].split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(
        "POST", "/v1/completions", body=b"{not json", headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 400 and "invalid JSON" in json.loads(resp.read())["error"]["message"]
    conn.request("GET", "/v1/nothing")
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    conn.close()
    # the server still answers after all of this
    assert client.completions.create(**base).choices[0].finish_reason in ("stop", "length")


def test_api_key(local) -> None:
    from deeplm.serve import make_server

    srv = make_server(local, port=0, api_key="sekrit", quiet=True)
    srv.start()
    try:
        bad = openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url, api_key="sekrit", max_retries=0)
        assert good.models.list().data[0].id == RUN_NAME
    finally:
        srv.stop()
