"""OpenAI's request bodies as pydantic models, its error body, and the small parts of responses
(ids, timestamps, usage) both endpoints share.

Types are strict (a string is no number, a number no string), as OpenAI's API is, so a client
bug shows up as a 400 that names the field instead of a silent conversion; `null` means the
default. Unknown fields are ignored (clients send vendor extras); OpenAI fields this server does
not implement are accepted only at their "off" value, and otherwise rejected with a message that
says so.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from olmoe.errors import InputError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API


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
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema makes most fields nullable, and clients do send `"n": null`.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class OlmoeOptions(_Strict):
    """olmoe's own request extension, under the key "olmoe"."""

    return_routing: bool = False


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields shared by both endpoints."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    user: str | None = None
    # Common extensions (vLLM accepts them too).
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    olmoe: OlmoeOptions = Field(default_factory=OlmoeOptions)
    # OpenAI fields without an implementation here: only their "off" values pass.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise InputError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

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
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
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
