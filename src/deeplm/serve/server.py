"""An OpenAI-compatible HTTP API over one deeplm model, on FastAPI + uvicorn.

Owns the routes, reading request bodies, the limits, and starting/stopping the uvicorn server
(request schemas: :mod:`deeplm.serve.schemas`; generation: :mod:`deeplm.serve.scheduler`).
Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), and ``GET /health``.

* Binds to ``127.0.0.1`` by default; another host must be asked for explicitly. With
  ``api_key`` set, requests need ``Authorization: Bearer <key>``.
* Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for
  bad parameters, malformed or too deeply nested JSON and prompts over the context window
  (``code: context_length_exceeded``), 401 for a wrong key, 404 for an unknown model or path,
  408 for a body not sent within ``request_timeout``, 411 for a body without a length, 413
  for a body over ``max_body_bytes``, 429 with ``Retry-After`` when the generation queue is
  full, 503 when a request waited in the queue past ``request_timeout``. Malformed HTTP (e.g.
  ``Content-Length: -1``) gets uvicorn's 400.
* Limits (:class:`Limits`, each a ``deeplm serve`` flag): ``max_batch`` sequences are decoded
  at a time, together in one batch, and ``queue_size`` more may wait
  (:mod:`deeplm.serve.scheduler`); ``request_timeout`` bounds a request's time in the queue and
  in generation (a generation cut by it ends with ``finish_reason: "length"``); connections idle
  for ``keep_alive_timeout`` seconds are closed, including ones that never send a request;
  ``max_connections`` bounds open connections (503 beyond). Ctrl-C / SIGTERM stop gracefully:
  no new connections, running requests get ``graceful_timeout`` seconds to finish.
* Parameters: ``max_tokens`` (``max_completion_tokens``), ``temperature`` (0 = greedy),
  ``top_p``, ``n``, ``stop`` (string or up to 4 strings), ``seed``, ``stream``,
  ``stream_options.include_usage``, ``echo`` (completions), plus the extensions ``top_k`` and
  ``repetition_penalty``. ``presence_penalty``/``frequency_penalty`` are accepted only as 0,
  ``logprobs`` only when off; ``prompt`` may be a string or a list of strings. With ``n`` > 1 (or
  several prompts) the streamed chunks of the choices interleave; each carries its ``index``.
* Context: the prompt plus ``max_tokens`` must fit the model's context (``max_seq_len``); when
  ``max_tokens`` is omitted, completions default to 16 tokens and chat to the room left.
* Chat uses the template of :mod:`deeplm.chat`; the reply ends at ``<|end|>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from deeplm.chat import ChatError, format_chat, stop_token_ids
from deeplm.export import LoadedModel
from deeplm.model.generate import TextAssembler
from deeplm.serve.scheduler import Job, QueueFull, Scheduler
from deeplm.serve.schemas import (
    MAX_N,
    APIError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    validate_request,
)

DEFAULT_COMPLETION_TOKENS = 16


@dataclass
class Limits:
    """The server's limits (see the module docstring)."""

    max_batch: int = 8
    queue_size: int = 64
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    keep_alive_timeout: float = 5.0
    max_connections: int = 256
    graceful_timeout: float = 10.0

    def check(self) -> None:
        """Raise ValueError naming the first limit out of range."""
        for name in ("max_batch", "queue_size", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout", "keep_alive_timeout", "graceful_timeout"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                msg = f"{_flag(name)} must be a positive number of seconds, got {value}"
                raise ValueError(msg)


def _flag(name: str) -> str:
    """A limit's name with its ``deeplm serve`` flag, e.g. ``max_batch (--max-batch)``."""
    if name == "graceful_timeout":  # not a flag
        return name
    return f"{name} (--{name.replace('_', '-')})"


# ---------------------------------------------------------------------------- the service


class ModelService:
    """The model, its tokenizer, and the scheduler that runs every generation."""

    def __init__(self, loaded: LoadedModel, model_id: str | None, limits: Limits) -> None:
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id or loaded.name
        self.context = loaded.cfg.max_seq_len
        self.limits = limits
        self.scheduler = Scheduler(self.model, limits.max_batch, limits.queue_size)
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "deeplm",
            "context_length": self.context,
        }

    def check_model(self, model: str) -> None:
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

    def completion_prompts(self, prompt: str | list[str]) -> list[tuple[str, list[int]]]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(prompts) > MAX_N:
            raise APIError(400, f"at most {MAX_N} prompts per request", "prompt")
        bos = self.tokenizer.bos_id
        return [(p, [bos] + self.tokenizer.encode(p)) for p in prompts]

    def chat_prompt(self, messages: list[Any]) -> list[int]:
        try:
            return format_chat(self.tokenizer, messages, None).ids
        except ChatError as exc:
            raise APIError(400, str(exc), "messages") from None

    def job(
        self, ids: list[int], max_new: int, s: Sampling, index: int, chat: bool, emit: Callable
    ) -> Job:
        gen = torch.Generator(device=self.loaded.device)
        if s.seed is not None:
            gen.manual_seed((s.seed + index) % (2**63))
        else:
            gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        stops = stop_token_ids(self.tokenizer) if chat else [self.tokenizer.eos_id]
        return Job(
            prompt=ids,
            max_new=max_new,
            assembler=TextAssembler(self.tokenizer, s.stop, stops),
            emit=emit,
            deadline=time.monotonic() + self.limits.request_timeout,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            generator=gen,
            stream=s.stream,
        )

    def submit(self, specs: list[tuple[int, list[int], int]], s: Sampling, chat: bool) -> Run:
        """Queue ``(index, prompt ids, max_new)`` sequences; 429 when the queue is full."""
        run = Run()
        jobs = [
            self.job(ids, max_new, s, index, chat, run.emitter(index))
            for index, ids, max_new in specs
        ]
        run.jobs = jobs
        try:
            self.scheduler.submit(jobs)
        except QueueFull as exc:
            raise APIError(
                429,
                str(exc),
                code="rate_limit_exceeded",
                type_="server_busy",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        return run


class Run:
    """The events of one request's sequences, delivered to its event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.jobs: list[Job] = []
        self.pending = 0

    def emitter(self, index: int) -> Callable[[tuple[Any, ...]], None]:
        self.pending += 1

        def emit(event: tuple[Any, ...]) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, *event))

        return emit

    async def events(self) -> AsyncIterator[tuple[Any, ...]]:
        """``(index, kind, ...)`` until every sequence is done; an error raises APIError."""
        try:
            while self.pending:
                event = await self.queue.get()
                if event[1] in ("done", "error"):
                    self.pending -= 1
                if event[1] == "error":
                    raise APIError(event[2], event[3], type_="server_error")
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _cchoice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _dchoice(index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


async def _stream_response(run: Run, chunks: AsyncIterator[str]) -> StreamingResponse:
    """Wait for the first chunk (so queue errors still get their status code), then stream.
    A client that hangs up cancels its sequences."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        run.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except APIError as exc:  # after the 200: tell the client in the stream
            yield _sse(exc.body())
        finally:
            run.cancel()

    headers = {"Cache-Control": "no-cache"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


# ---------------------------------------------------------------------------- HTTP


async def _read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request's JSON object; 411/413/400 for a missing length, a big or a bad body, 408
    for a body that does not arrive within ``request_timeout``."""
    try:
        return await asyncio.wait_for(
            _read_json_body(request, limits.max_body_bytes), limits.request_timeout
        )
    except TimeoutError:
        msg = f"the request body did not arrive within {limits.request_timeout:g} s"
        raise APIError(408, msg, headers={"Connection": "close"}) from None


async def _read_json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        raise APIError(411, "a JSON body with a Content-Length is required")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise APIError(413, f"request body over {max_bytes} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise APIError(413, f"request body over {max_bytes} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        msg = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise APIError(400, f"invalid JSON body: {msg}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object")
    return body


def build_app(svc: ModelService, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``svc`` (the scheduler runs while the app is up)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(svc.scheduler.stop)

    app = FastAPI(
        title="deeplm",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        msg = f"no route {request.method} {request.url.path}" if code else str(exc.detail)
        return APIError(exc.status_code, msg, code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        msg = f"internal error: {type(exc).__name__}: {exc}"
        return APIError(500, msg, type_="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": svc.model_id} | svc.scheduler.load()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != svc.model_id:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return svc.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _read_json(request, svc.limits)
        return await _completions(svc, validate_request(CompletionRequest, body))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await _read_json(request, svc.limits)
        return await _chat(svc, validate_request(ChatRequest, body))

    return app


# ---------------------------------------------------------------------------- endpoints


async def _completions(svc: ModelService, req: CompletionRequest) -> Any:
    svc.check_model(req.model)
    s = Sampling(req, chat=False)
    prompts = svc.completion_prompts(req.prompt)
    specs, texts = [], {}
    for p_idx, (text, ids) in enumerate(prompts):
        max_new = svc.budget(len(ids), s, chat=False)
        for j in range(s.n):
            specs.append((p_idx * s.n + j, ids, max_new))
            texts[p_idx * s.n + j] = text
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": svc.model_id,
    }
    run = svc.submit(specs, s, chat=False)
    echo = bool(req.echo)
    if s.stream:
        return await _stream_response(
            run, _completion_chunks(run, base, texts, echo, s, prompt_tokens)
        )
    out = {i: texts[i] if echo else "" for i in texts}
    finish, completion_tokens = {}, 0
    async for event in run.events():
        if event[1] == "done":  # not streamed: the whole text comes with "done"
            out[event[0]] += event[4]
            finish[event[0]] = event[2]
            completion_tokens += event[3]
    choices = [_cchoice(i, out[i], finish[i]) for i in sorted(out)]
    return base | {"choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


async def _completion_chunks(
    run: Run, base: dict, texts: dict[int, str], echo: bool, s: Sampling, prompt_tokens: int
) -> AsyncIterator[str]:
    if echo:
        for i in sorted(texts):
            yield _sse(base | {"choices": [_cchoice(i, texts[i], None)]})
    completion_tokens = 0
    async for event in run.events():
        if event[1] == "piece":
            yield _sse(base | {"choices": [_cchoice(event[0], event[2], None)]})
        else:
            completion_tokens += event[3]
            yield _sse(base | {"choices": [_cchoice(event[0], "", event[2])]})
    if s.include_usage:
        yield _sse(base | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")


async def _chat(svc: ModelService, req: ChatRequest) -> Any:
    svc.check_model(req.model)
    s = Sampling(req, chat=True)
    ids = svc.chat_prompt(req.messages)
    max_new = svc.budget(len(ids), s, chat=True)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if s.stream else "chat.completion",
        "created": int(time.time()),
        "model": svc.model_id,
    }
    run = svc.submit([(i, ids, max_new) for i in range(s.n)], s, chat=True)
    if s.stream:
        return await _stream_response(run, _chat_chunks(run, base, s, len(ids) * s.n))
    out = {i: "" for i in range(s.n)}
    finish, completion_tokens = {}, 0
    async for event in run.events():
        if event[1] == "done":  # not streamed: the whole text comes with "done"
            out[event[0]] = event[4]
            finish[event[0]] = event[2]
            completion_tokens += event[3]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": out[i]},
            "finish_reason": finish[i],
            "logprobs": None,
        }
        for i in range(s.n)
    ]
    return base | {"choices": choices, "usage": _usage(len(ids) * s.n, completion_tokens)}


async def _chat_chunks(run: Run, base: dict, s: Sampling, prompt_tokens: int) -> AsyncIterator[str]:
    for i in range(s.n):
        yield _sse(base | {"choices": [_dchoice(i, {"role": "assistant", "content": ""}, None)]})
    completion_tokens = 0
    async for event in run.events():
        if event[1] == "piece":
            yield _sse(base | {"choices": [_dchoice(event[0], {"content": event[2]}, None)]})
        else:
            completion_tokens += event[3]
            yield _sse(base | {"choices": [_dchoice(event[0], {}, event[2])]})
    if s.include_usage:
        yield _sse(base | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")


# ---------------------------------------------------------------------------- uvicorn


class BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <api_key>`` (401)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(
                    401, "invalid API key", code="invalid_api_key", type_="authentication_error"
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class IdleTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection that has not sent a complete request head
    within the keep-alive timeout is closed (uvicorn's own timer starts only after a first
    response, and bytes of a partial request head cancel it)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        # the timer keeps running until a complete request head arrives (handle_events stops it)
        self.conn.receive_data(data)
        self.handle_events()


class _UvicornServer(uvicorn.Server):
    """uvicorn's server; after a graceful stop on Ctrl-C / SIGTERM the process exits normally
    (uvicorn would raise the signal again once shut down)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if hasattr(self, "_captured_signals"):
            self._captured_signals.clear()


class DeeplmServer:
    """A bound uvicorn server for one model: :meth:`run` (blocking, stops on Ctrl-C/SIGTERM)
    or :meth:`start` / :meth:`stop` (in a background thread, for tests and benchmarks)."""

    def __init__(
        self, app: FastAPI, service: ModelService, host: str, port: int, quiet: bool = True
    ) -> None:
        self.service = service
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except (OSError, OverflowError) as exc:  # OverflowError: a port over 65535
            self.sock.close()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise RuntimeError(f"cannot listen on {host}:{port}: {reason}") from None
        self.sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        self.host, self.port = self.sock.getsockname()[:2]
        limits = service.limits
        config = uvicorn.Config(
            app,
            http=IdleTimeoutProtocol,
            lifespan="on",
            log_level="error" if quiet else "info",
            access_log=not quiet,
            timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]
            limit_concurrency=limits.max_connections,
            timeout_graceful_shutdown=limits.graceful_timeout,  # type: ignore[arg-type]
        )
        self.server = _UvicornServer(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def run(self) -> None:
        """Serve until Ctrl-C / SIGTERM (uvicorn's graceful shutdown)."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> None:
        """Serve in a daemon thread; return once it accepts connections."""
        self._thread = threading.Thread(target=self.run, name="deeplm-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a server started with :meth:`start` (graceful)."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


def make_server(
    loaded: LoadedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    api_key: str | None = None,
    quiet: bool = False,
    limits: Limits | None = None,
) -> DeeplmServer:
    """A bound, not yet serving, server for ``loaded``; ``port=0`` picks a free port (read it
    from ``server.port``)."""
    limits = limits or Limits()
    limits.check()
    service = ModelService(loaded, model_id, limits)
    return DeeplmServer(build_app(service, api_key), service, host, port, quiet)


def serve(
    loaded: LoadedModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    api_key: str | None = None,
    quiet: bool = False,
    log: Any = print,
    limits: Limits | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then shut down gracefully."""
    server = make_server(loaded, host, port, model_id, api_key, quiet, limits)
    lim = server.service.limits
    log(f"deeplm serve: model '{server.service.model_id}' ({loaded.source}) on {server.url}")
    log(
        f"limits: {lim.max_batch} generations at a time, {lim.queue_size} queued, "
        f"request timeout {lim.request_timeout:g} s, body {lim.max_body_bytes} bytes, "
        f"idle connections closed after {lim.keep_alive_timeout:g} s"
    )
    server.run()
