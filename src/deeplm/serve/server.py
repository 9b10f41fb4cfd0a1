"""An OpenAI-compatible HTTP API over one deeplm model (standard library only).

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``), and ``GET /health``.

* Binds to ``127.0.0.1`` by default; another host must be asked for explicitly. With
  ``api_key`` set, requests need ``Authorization: Bearer <key>``.
* Requests are validated; errors are OpenAI-style JSON (``{"error": {"message", "type",
  "param", "code"}}``): 400 for bad parameters, prompts over the context window
  (``code: context_length_exceeded``) or malformed JSON, 401 for a wrong key, 404 for an
  unknown model or path, 413 for an oversized body.
* Concurrency: a thread per connection (``ThreadingHTTPServer``). Every request has its own KV
  cache, random generator and stream decoder; the model itself is only ever run by one thread at
  a time (a lock held per decoding step), so concurrent and streaming requests interleave token
  by token without touching each other's state.
* Parameters: ``max_tokens`` (``max_completion_tokens``), ``temperature`` (0 = greedy),
  ``top_p``, ``n``, ``stop`` (string or up to 4 strings), ``seed``, ``stream``,
  ``stream_options.include_usage``, ``echo`` (completions), plus the extensions ``top_k`` and
  ``repetition_penalty``. ``presence_penalty``/``frequency_penalty`` are accepted only as 0,
  ``logprobs`` only when off; ``prompt`` may be a string or a list of strings.
* Context: the prompt plus ``max_tokens`` must fit the model's context (``max_seq_len``); when
  ``max_tokens`` is omitted, completions default to 16 tokens and chat to the room left, both
  capped to fit.
* Chat uses the template of :mod:`deeplm.chat`; the reply ends at ``<|end|>``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from deeplm.chat import ChatError, format_chat, stop_token_ids
from deeplm.export import LoadedModel
from deeplm.model.generate import TextStream

MAX_BODY = 1 << 20  # bytes
MAX_N = 8
DEFAULT_COMPLETION_TOKENS = 16


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ---------------------------------------------------------------------------- validation


def _number(
    body: dict[str, Any], key: str, default: float | None, lo: float, hi: float
) -> float | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise APIError(400, f"'{key}' must be a number, got {v!r}", key)
    if not lo <= v <= hi:
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return float(v)


def _integer(
    body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None
) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{key}' must be an integer, got {v!r}", key)
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{key}' must be {bound}, got {v}", key)
    return v


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stop) > 4:
        raise APIError(400, "'stop' takes at most 4 sequences", "stop")
    return [s for s in stop if s]


class Sampling:
    """Validated sampling parameters of one request."""

    def __init__(self, body: dict[str, Any], chat: bool) -> None:
        for key in ("presence_penalty", "frequency_penalty"):
            if _number(body, key, 0.0, -2.0, 2.0):
                raise APIError(400, f"'{key}' is not supported (use repetition_penalty)", key)
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
            raise APIError(400, "'logprobs' is not supported", "logprobs")
        if body.get("tools") or body.get("functions"):
            raise APIError(400, "tools / function calling are not supported", "tools")
        self.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if self.top_p == 0.0:
            raise APIError(400, "'top_p' must be > 0", "top_p")
        self.top_k = _integer(body, "top_k", None, 0)
        self.repetition_penalty = _number(body, "repetition_penalty", 1.0, 0.01, 10.0)
        self.n = _integer(body, "n", 1, 1, MAX_N)
        self.seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        self.max_tokens_key = key
        self.max_tokens = _integer(body, key, None, 1)
        self.stop = _stops(body)
        self.stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options")
        self.include_usage = bool(opts.get("include_usage", False))


# ---------------------------------------------------------------------------- the service


class ModelService:
    """The model, its tokenizer, and the lock that serialises model steps."""

    def __init__(self, loaded: LoadedModel, model_id: str | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id or loaded.name
        self.context = loaded.cfg.max_seq_len
        self.lock = threading.Lock()
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "deeplm",
            "context_length": self.context,
        }

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", "model")
        if model != self.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist (this server has '{self.model_id}')",
                "model",
                "model_not_found",
            )

    def budget(self, prompt_len: int, s: Sampling, chat: bool) -> int:
        """Tokens to generate for a prompt of ``prompt_len`` tokens (400 when it cannot fit)."""
        room = self.context - prompt_len
        if room <= 0:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens, but the prompt "
                f"has {prompt_len} tokens. Please shorten the prompt.",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        if s.max_tokens is None:
            return room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
        if s.max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {prompt_len + s.max_tokens} tokens ({prompt_len} in the prompt, "
                f"{s.max_tokens} for the completion). Please reduce the prompt or "
                f"'{s.max_tokens_key}'.",
                s.max_tokens_key,
                "context_length_exceeded",
            )
        return s.max_tokens

    def stream(
        self, prompt_ids: list[int], max_new: int, s: Sampling, index: int, chat: bool
    ) -> TextStream:
        gen = torch.Generator(device=self.loaded.device)
        if s.seed is not None:
            gen.manual_seed((s.seed + index) % (2**63))
        else:
            gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        return TextStream(
            self.model,
            self.tokenizer,
            prompt_ids,
            max_new,
            temperature=s.temperature or 0.0,
            top_k=s.top_k or None,
            top_p=s.top_p if s.top_p is not None and s.top_p < 1.0 else None,
            repetition_penalty=s.repetition_penalty or 1.0,
            stop=s.stop,
            stop_token_ids=stop_token_ids(self.tokenizer) if chat else [self.tokenizer.eos_id],
            generator=gen,
            lock=self.lock,
        )

    # -------------------------------------------------------------- request -> prompts

    def completion_prompts(self, body: dict[str, Any]) -> list[tuple[str, list[int]]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise APIError(
                400, "'prompt' must be a string or a non-empty list of strings", "prompt"
            )
        if len(prompts) > MAX_N:
            raise APIError(400, f"at most {MAX_N} prompts per request", "prompt")
        bos = self.tokenizer.bos_id
        return [(p, [bos] + self.tokenizer.encode(p)) for p in prompts]

    def chat_prompt(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        try:
            return format_chat(self.tokenizer, messages, None).ids
        except ChatError as exc:
            raise APIError(400, str(exc), "messages") from None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ---------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection (HTTP/1.1, keep-alive; SSE responses use chunked encoding)."""

    protocol_version = "HTTP/1.1"
    server_version = "deeplm"
    service: ModelService  # set on the subclass made by make_server
    api_key: str | None = None
    quiet: bool = False

    # -------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if not self.quiet:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raise APIError(411, "chunked request bodies are not supported; send Content-Length")
            raise APIError(400, "a JSON body is required")
        try:
            n = int(length)
        except ValueError:
            raise APIError(400, "invalid Content-Length") from None
        if n > MAX_BODY:
            self.close_connection = True
            raise APIError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object")
        return body

    def _authorize(self) -> None:
        if self.api_key is None:
            return
        if self.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            raise APIError(
                401, "invalid API key", code="invalid_api_key", type_="authentication_error"
            )

    _streaming = False

    def _sse_start(self) -> None:
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _sse(self, obj: dict[str, Any] | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):X}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _sse_end(self) -> None:
        self._sse("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -------------------------------------------------------------- routing

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        try:
            self._authorize()
            path = self.path.split("?", 1)[0].rstrip("/")
            svc = self.service
            if path == "/health":
                self._send_json(200, {"status": "ok", "model": svc.model_id})
            elif path == "/v1/models":
                self._send_json(200, {"object": "list", "data": [svc.model_card()]})
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/") :]
                if name != svc.model_id:
                    raise APIError(
                        404, f"The model '{name}' does not exist", "model", "model_not_found"
                    )
                self._send_json(200, svc.model_card())
            else:
                raise APIError(404, f"no route GET {path}", code="not_found")
        except APIError as exc:
            self._send_json(exc.status, exc.body())

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        try:
            self._authorize()
            path = self.path.split("?", 1)[0].rstrip("/")
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise APIError(404, f"no route POST {path}", code="not_found")
            body = self._read_body()
            self.service.check_model(body)
            if path == "/v1/completions":
                self._completions(body)
            else:
                self._chat(body)
        except APIError as exc:
            self._send_json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-stream
        except Exception as exc:  # a bug or a model error: answer 500 if nothing was sent yet
            self.close_connection = True
            if not self._streaming:
                err = APIError(
                    500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"
                )
                self._send_json(500, err.body())
            raise

    # -------------------------------------------------------------- endpoints

    def _completions(self, body: dict[str, Any]) -> None:
        svc = self.service
        s = Sampling(body, chat=False)
        echo = bool(body.get("echo", False))
        prompts = svc.completion_prompts(body)
        jobs = []  # (choice index, prompt text, ids, max_new)
        for p_idx, (text, ids) in enumerate(prompts):
            max_new = svc.budget(len(ids), s, chat=False)
            for j in range(s.n):  # type: ignore[arg-type]
                jobs.append((p_idx * s.n + j, text, ids, max_new))  # type: ignore[operator]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": svc.model_id}
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        if s.stream:
            self._sse_start()
            completion_tokens = 0
            for index, text, ids, max_new in jobs:
                stream = svc.stream(ids, max_new, s, index, chat=False)
                if echo:
                    self._sse(base | {"choices": [_cchoice(index, text, None)]})
                for piece in stream:
                    self._sse(base | {"choices": [_cchoice(index, piece, None)]})
                completion_tokens += len(stream.token_ids)
                self._sse(base | {"choices": [_cchoice(index, "", stream.finish_reason)]})
            if s.include_usage:
                self._sse(base | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            self._sse_end()
            return
        choices = []
        completion_tokens = 0
        for index, text, ids, max_new in jobs:
            stream = svc.stream(ids, max_new, s, index, chat=False)
            out = "".join(stream)
            completion_tokens += len(stream.token_ids)
            choices.append(_cchoice(index, (text if echo else "") + out, stream.finish_reason))
        self._send_json(
            200, base | {"choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}
        )

    def _chat(self, body: dict[str, Any]) -> None:
        svc = self.service
        s = Sampling(body, chat=True)
        ids = svc.chat_prompt(body)
        max_new = svc.budget(len(ids), s, chat=True)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if s.stream else "chat.completion",
            "created": created,
            "model": svc.model_id,
        }
        if s.stream:
            self._sse_start()
            completion_tokens = 0
            for index in range(s.n):  # type: ignore[arg-type]
                stream = svc.stream(ids, max_new, s, index, chat=True)
                role = {"role": "assistant", "content": ""}
                self._sse(base | {"choices": [_dchoice(index, role, None)]})
                for piece in stream:
                    self._sse(base | {"choices": [_dchoice(index, {"content": piece}, None)]})
                completion_tokens += len(stream.token_ids)
                self._sse(base | {"choices": [_dchoice(index, {}, stream.finish_reason)]})
            if s.include_usage:
                usage = _usage(len(ids) * s.n, completion_tokens)  # type: ignore[operator]
                self._sse(base | {"choices": [], "usage": usage})
            self._sse_end()
            return
        choices = []
        completion_tokens = 0
        for index in range(s.n):  # type: ignore[arg-type]
            stream = svc.stream(ids, max_new, s, index, chat=True)
            out = "".join(stream)
            completion_tokens += len(stream.token_ids)
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": out},
                    "finish_reason": stream.finish_reason,
                    "logprobs": None,
                }
            )
        usage = _usage(len(ids) * s.n, completion_tokens)  # type: ignore[operator]
        self._send_json(200, base | {"choices": choices, "usage": usage})


def _cchoice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _dchoice(index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


def make_server(
    loaded: LoadedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    api_key: str | None = None,
    quiet: bool = False,
) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) HTTP server for ``loaded``; ``port=0`` picks a free
    port (read it from ``server.server_address``). Call ``serve_forever()`` to serve."""
    service = ModelService(loaded, model_id)
    handler = type(
        "DeeplmHandler", (Handler,), {"service": service, "api_key": api_key, "quiet": quiet}
    )
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(
    loaded: LoadedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    api_key: str | None = None,
    quiet: bool = False,
    log: Any = print,
) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    server = make_server(loaded, host, port, model_id, api_key, quiet)
    h, p = server.server_address[:2]
    mid = server.RequestHandlerClass.service.model_id  # type: ignore[attr-defined]
    log(f"deeplm serve: model '{mid}' ({loaded.source}) on http://{h}:{p}/v1")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
