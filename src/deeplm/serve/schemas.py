"""The OpenAI request schemas of ``deeplm serve`` (pydantic), their validation, and its errors.

Owns :class:`APIError` (an error answered as OpenAI-style JSON), the request models
(:class:`CompletionRequest`, :class:`ChatRequest`: strict types, NaN and infinity refused, unknown
fields ignored as OpenAI's API does) and :class:`Sampling` (the validated sampling parameters of
one request). A validation error becomes a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 8  # choices per request, and prompts per completion request


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------- request schemas


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields common to completions and chat (unknown fields are ignored, as OpenAI's)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    echo: bool | None = None


class ChatRequest(_GenerationRequest):
    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def validate_request(schema: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "missing":
            raise APIError(400, f"'{param}' is required", param) from None
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"'{where}': {err['msg']}", param) from None


class Sampling:
    """Validated sampling parameters of one request."""

    def __init__(self, req: _GenerationRequest, chat: bool) -> None:
        for key in ("presence_penalty", "frequency_penalty"):
            if getattr(req, key):
                raise APIError(400, f"'{key}' is not supported (use repetition_penalty)", key)
        if req.logprobs not in (None, False, 0) or req.top_logprobs:
            raise APIError(400, "'logprobs' is not supported", "logprobs")
        if req.tools or req.functions:
            raise APIError(400, "tools / function calling are not supported", "tools")
        self.temperature = 1.0 if req.temperature is None else req.temperature
        self.top_p = req.top_p if req.top_p is not None and req.top_p < 1.0 else None
        self.top_k = req.top_k or None
        self.repetition_penalty = req.repetition_penalty or 1.0
        self.n = req.n or 1
        self.seed = req.seed
        self.max_tokens_key = "max_tokens"
        self.max_tokens = req.max_tokens
        if chat and req.max_completion_tokens is not None:  # type: ignore[attr-defined]
            self.max_tokens_key = "max_completion_tokens"
            self.max_tokens = req.max_completion_tokens  # type: ignore[attr-defined]
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        self.stop = [s for s in stop if s]
        self.stream = bool(req.stream)
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
