"""OpenAI's request bodies as pydantic models, its error body, the small parts of responses (ids,
timestamps, usage) both endpoints share, and the response bodies' shapes for the OpenAPI schema.

Types are strict (a string is no number, a number no string), as OpenAI's API is, so a client
bug shows up as a 400 that names the field instead of a silent conversion; `null` means the
default. Unknown fields are ignored (clients send vendor extras); OpenAI fields this server does
not implement are accepted only at their "off" value, and otherwise rejected with a message that
says so.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from olmoe.errors import InputError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API
# Below it, dividing a logit by the penalty can overflow float32 to inf, and sampling then fails.
MIN_REPETITION_PENALTY = 0.01


class APIError(Exception):
    """An error with its HTTP status and OpenAI error body fields."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    # Messages and params quote what the client sent, which may hold unpaired surrogates (JSON's
    # "\ud800" escapes), and a response body must be valid UTF-8.
    param = None if param is None else _utf8_safe(param)
    return {"error": {"message": _utf8_safe(message), "type": kind, "param": param, "code": code}}


def _utf8_safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def valid_utf8(text: str) -> bool:
    """False for a string with unpaired surrogates, which no tokenizer or response can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _whole(value: Any) -> Any:
    # JSON does not tell 2 from 2.0, nor does JSON Schema's "integer": a number without a
    # fraction is an integer, whichever way the client wrote it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _integer(**bounds: int) -> Any:
    """The type of an integer field with pydantic's `bounds` (ge, lt, ...), written 2 or 2.0."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


Integer = _integer()
# For the schema of a field OpenAI defines that this server takes only "off": empty, whatever
# its type.
EMPTY = {"maxLength": 0, "maxItems": 0, "maxProperties": 0}


class _Strict(BaseModel):
    # NaN and Infinity are not JSON, though Python's reader takes them: refuse them here rather
    # than hand them to sampling.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema makes most fields nullable, and clients do send `"n": null`.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        # The published schema says what `_null_means_default` accepts: null for every optional
        # field.
        schema = handler.resolve_ref_schema(handler(core_schema))
        required = set(schema.get("required", ()))
        properties = schema.get("properties", {})
        for name, field in properties.items():
            if name not in required and not _accepts_null(field):
                properties[name] = {"anyOf": [field, {"type": "null"}]}
        return schema


def _accepts_null(field: dict[str, Any]) -> bool:
    return field.get("type") == "null" or any(_accepts_null(f) for f in field.get("anyOf", ()))


class OlmoeOptions(_Strict):
    """olmoe's own request extension, under the key "olmoe"."""

    return_routing: bool = False


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields shared by both endpoints."""

    model: str
    max_tokens: _integer(ge=1) | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: _integer(ge=1) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        default=None, json_schema_extra={"minLength": 1, "maxItems": MAX_STOP_STRINGS}
    )
    seed: _integer(ge=-(2**63), lt=2**64) | None = None
    user: str | None = None
    # Common extensions (vLLM accepts them too).
    top_k: _integer(ge=0) | None = None
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY)
    olmoe: OlmoeOptions = Field(default_factory=OlmoeOptions)
    # OpenAI fields without an implementation here: only their "off" values pass.
    presence_penalty: float | None = Field(default=None, json_schema_extra={"enum": [0, None]})
    frequency_penalty: float | None = Field(default=None, json_schema_extra={"enum": [0, None]})
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=EMPTY)

    @model_validator(mode="after")
    def _check(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise InputError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        if not all(valid_utf8(stop) for stop in stops):
            raise InputError("stop strings must be valid UTF-8 (one has an unpaired surrogate)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InputError(f"{name} is not supported by this server; use repetition_penalty")
        if self.logit_bias:
            raise InputError("logit_bias is not supported by this server")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Integer] | list[list[Integer]] = Field(
        json_schema_extra={"minLength": 1, "minItems": 1}
    )
    max_tokens: _integer(ge=0) | None = None  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: _integer(ge=0, le=MAX_LOGPROBS) | None = None
    best_of: Integer | None = None
    suffix: str | None = Field(default=None, json_schema_extra=EMPTY)

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise InputError("suffix is not supported by this server")
        if self.echo and self.stream:
            raise InputError("echo is not supported with stream by this server")
        if self.max_tokens == 0 and not self.echo:
            raise InputError("max_tokens must be >= 1 (0 only with echo, to score the prompt)")
        if self.best_of not in (None, 1, self.n):
            raise InputError("best_of is not supported by this server (only best_of == n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InputError("prompt is an empty list")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: _integer(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: _integer(ge=0, le=MAX_LOGPROBS) | None = None
    tools: list[Any] | None = Field(default=None, json_schema_extra=EMPTY)
    response_format: dict[str, Any] | None = None

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("top_logprobs needs logprobs: true")
        if self.tools:
            raise InputError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type") != "text":
            raise InputError("response_format other than text is not supported by this server")
        return self

    def conversation(self) -> list[dict[str, str]]:
        # OpenAI's "developer" role is the newer name of "system".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


# Fields that take one of several shapes: pydantic reports a failure per shape, which reads
# badly ("prompt.str: Input should be a valid string (and 4 more problems)").
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """Validate a decoded JSON body; an APIError (400) naming the first bad field otherwise."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"]
        for i, part in enumerate(loc[:-1]):
            if part in UNION_FIELDS and isinstance(loc[i + 1], str):  # then a shape's name
                where = ".".join(str(p) for p in loc[: i + 1])
                message = f"invalid request: {where} must be {UNION_FIELDS[part]}"
                raise APIError(400, message, param=where) from None
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        detail = f"{where}: {message}" if where else message
        more = exc.error_count() - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
        raise APIError(400, f"invalid request: {detail}{suffix}", param=where or None) from None


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------- response shapes
# What the routes send, for the OpenAPI schema at /openapi.json. The handlers build plain dicts;
# tests/serve/test_fuzz.py checks every response against these.
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RoutingTelemetry(BaseModel):
    """A choice's "olmoe" field, with `"olmoe": {"return_routing": true}` in the request."""

    token_ids: list[int]
    routing: list[list[list[int]]] = Field(
        description="per token, per layer: the experts chosen, most probable first"
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]
    olmoe: RoutingTelemetry | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]
    olmoe: RoutingTelemetry | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    olmoe: RoutingTelemetry | None = None


class CompletionChunk(BaseModel):
    """One event of a completions stream; with stream_options.include_usage, `usage` is null
    but on the last one, which has no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    olmoe: RoutingTelemetry | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a chat stream (the first opens each choice with the role); `usage` as in
    CompletionChunk."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
