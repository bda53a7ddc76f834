"""The HTTP layer: OpenAI's routes over the engine, server-sent events, errors in OpenAI's shape.

    POST /v1/completions        prompt (text, texts, token ids) -> text_completion
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models             the one model served
    GET  /health                200 while the server runs (no API key needed)
    GET  /metrics               Prometheus text format (see metrics.py)
    GET  /openapi.json          the OpenAPI schema of the above, request and response bodies

Bodies are read and validated here rather than by FastAPI, so that every bad body — not UTF-8,
not JSON, a wrong type — gets OpenAI's error object with a message that names the problem. The
routes declare their bodies for the OpenAPI schema only. What a request may ask for is bounded
by `Limits` (limits.py): a request over one gets a 4xx whose message names the flag.
Text comes from `olmoe.streaming.IncrementalDecoder` per choice: pieces never split a character
and never show any part of a stop string.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from olmoe import __version__
from olmoe.errors import OlmoeError
from olmoe.generation import SamplingParams
from olmoe.serve import engine as engine_module
from olmoe.serve import metrics
from olmoe.serve.limits import Limits
from olmoe.serve.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    error_body,
    new_id,
    now,
    parse,
    usage,
    valid_utf8,
)
from olmoe.streaming import IncrementalDecoder

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 1.0
# OpenAI's default for /v1/completions; chat defaults to the room left in the context window.
DEFAULT_COMPLETION_TOKENS = 16
# A smaller temperature is greedy in effect, and a far smaller one overflows the scaled logits to
# inf, which sampling cannot draw from: as vLLM does, such a temperature means greedy.
MIN_SAMPLING_TEMPERATURE = 1e-5
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/openapi.json",
)


@dataclass
class _Choice:
    index: int
    decoder: IncrementalDecoder
    tokens: list[int] = field(default_factory=list)
    experts: list[Any] = field(default_factory=list)
    # (token text, its offset in the completion, logprob, [(text, logprob) of the top tokens])
    logprobs: list[tuple[str, int, float, list]] = field(default_factory=list)
    sent: int = 0  # tokens already reported in a stream chunk
    finish_reason: str | None = None
    echo: str = ""  # the prompt's text, when the request asked for it back

    def text(self) -> str:
        return self.echo + self.decoder.emitted

    def telemetry(self, start: int = 0) -> dict[str, Any]:
        return {"token_ids": self.tokens[start:], "routing": self.experts[start:]}


class _Job:
    """One HTTP request's prompts in the engine: `n` choices per prompt, indexed as OpenAI does
    (prompt i's choices are i*n ... i*n + n - 1)."""

    def __init__(
        self,
        server: Server,
        prompts: list[list[int]],
        body,
        max_tokens: list[int],
        deadline: float | None,
    ):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.server = server
        self.arrived = time.monotonic()
        self.deadline = deadline
        self.first_token_seen = False
        self.n = body.n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.return_routing = body.olmoe.return_routing
        self.logprobs = body.logprob_count
        echo = getattr(body, "echo", False)
        stops = body.stop_strings
        temperature = 1.0 if body.temperature is None else body.temperature
        sample = temperature >= MIN_SAMPLING_TEMPERATURE
        params = SamplingParams(
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0,
        )
        self.choices = [
            _Choice(
                i,
                IncrementalDecoder(server.tokenizer, True, stops),
                echo=server.tokenizer.decode(prompts[i // self.n]) if echo else "",
            )
            for i in range(len(prompts) * self.n)
        ]
        self.requests = [
            engine_module.Request(
                prompt,
                limit,
                self._sink(i),
                params,
                stops,
                None if body.seed is None else body.seed + i * self.n,
                self.n,
                self.return_routing,
                self.logprobs,
                prompt_logprobs=echo and self.logprobs is not None,
            )
            for i, (prompt, limit) in enumerate(zip(prompts, max_tokens))
        ]

    def _sink(self, prompt_index: int):
        def sink(output: engine_module.Output) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt_index, output))

        return sink

    def submit(self) -> None:
        try:
            for request in self.requests:
                self.server.engine.submit(request)
        except engine_module.QueueFull as exc:
            self.cancel()
            raise APIError(
                503,
                f"the server is busy ({exc}; --max-queue {self.server.engine.max_queue}): retry later",
                "server_error",
                code="server_busy",
            ) from None

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    async def updates(self, disconnected=None) -> AsyncIterator[tuple[_Choice, str]]:
        """(choice, new text) as tokens arrive, until every choice has finished. Every
        DISCONNECT_POLL_S seconds `disconnected()` (if given) is asked whether the client has
        gone, which ends the job (streams learn it from the server instead). Past the deadline
        it raises the request timeout's error."""
        remaining = len(self.choices)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while remaining:
            if disconnected is not None and time.monotonic() >= next_check:
                if await disconnected():
                    raise APIError(499, "the client closed the connection")
                next_check = time.monotonic() + DISCONNECT_POLL_S
            wait = DISCONNECT_POLL_S
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    raise self.server.timed_out()
            try:
                prompt_index, out = await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:  # Python 3.10's is not the built-in TimeoutError
                continue
            choice = self.choices[prompt_index * self.n + out.index]
            if out.error is not None:
                raise APIError(500, f"generation failed: {out.error}", "server_error")
            piece = ""
            if out.prompt_logprobs is not None:
                self._add_prompt_logprobs(choice, self.requests[prompt_index].prompt, out)
            if out.token is not None:
                if not self.first_token_seen:
                    self.first_token_seen = True
                    self.server.first_token.observe(time.monotonic() - self.arrived)
                choice.tokens.append(out.token)
                if out.experts is not None:
                    choice.experts.append(out.experts)
                if out.logprob is not None:
                    self._add_logprobs(choice, out)
                piece = choice.decoder.push(out.token)
            if out.finish_reason is not None:
                piece += choice.decoder.flush()
                choice.finish_reason = out.finish_reason
                remaining -= 1
                if not remaining:
                    self.server.duration.observe(time.monotonic() - self.arrived)
            yield choice, piece

    def _add_logprobs(self, choice: _Choice, out: engine_module.Output) -> None:
        self._add_entry(choice, out.token, out.logprob, out.top_logprobs)

    def _add_prompt_logprobs(self, choice: _Choice, prompt, out: engine_module.Output) -> None:
        for token, (logprob, top) in zip(prompt, out.prompt_logprobs):
            self._add_entry(choice, token, logprob, top if logprob is not None else None)

    def _add_entry(self, choice: _Choice, token: int, logprob, top) -> None:
        """One logprobs entry: the token's text, where it starts in the choice's text, its
        log-probability and the top alternatives (None for a prompt's first token)."""
        decode = self.server.tokenizer.decode
        previous = choice.logprobs[-1] if choice.logprobs else ("", 0)
        offset = previous[1] + len(previous[0])
        alternatives = None if top is None else [(decode([t]), lp) for t, lp in top]
        choice.logprobs.append((decode([token]), offset, logprob, alternatives))


class Server:
    def __init__(
        self,
        engine,
        tokenizer,
        model_name: str,
        api_key: str | None = None,
        limits: Limits = Limits(),
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits
        self.max_input_chars = limits.input_chars(engine.context_window)
        self.created = now()
        self.responses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.first_token = metrics.Histogram(
            "olmoe_time_to_first_token_seconds",
            "From a request's arrival to its first generated token (queueing and prefill).",
        )
        self.duration = metrics.Histogram(
            "olmoe_request_duration_seconds",
            "From a request's arrival to its last generated token.",
        )

    def count(self, request: Request, status: int) -> None:
        # Unknown paths share one label, so that probing clients cannot grow /metrics forever.
        path = request.url.path if request.url.path in ROUTES else "other"
        self.responses[(path, status)] += 1

    # ------------------------------------------------------------------------ request checks
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>' "
                "with the key the server was started with",
                code="invalid_api_key",
            )

    def deadline(self) -> float | None:
        """When a request arriving now times out (None: never)."""
        timeout = self.limits.request_timeout
        return None if timeout is None else time.monotonic() + timeout

    def timed_out(self) -> APIError:
        return APIError(
            408,
            f"the request took longer than this server allows ({self.limits.request_timeout:g} s, "
            "--request-timeout): ask for fewer tokens, or retry when the server is less busy",
            code="request_timeout",
        )

    async def read(self, request: Request, model, deadline: float | None):
        raw = await self._body(request, deadline)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise APIError(400, f"the request body is not valid UTF-8 ({exc.reason} at byte "
                           f"{exc.start})") from None  # fmt: skip
        body = parse(model, _json(text))
        if body.model != self.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist here: this server serves "
                f"{self.model_name!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.n > self.engine.max_batch_size:
            raise APIError(
                400,
                f"n={body.n} exceeds this server's batch size ({self.engine.max_batch_size})",
                param="n",
            )
        return body

    async def _body(self, request: Request, deadline: float | None) -> bytes:
        """The body, read as it arrives: a body over the limit is refused as soon as it is, so
        a client without a Content-Length cannot make the server hold more."""
        limit = self.limits.max_body_bytes
        too_large = APIError(
            413, f"the request body exceeds {limit} bytes (--max-body-bytes)", code="body_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large

        async def receive() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
            return b"".join(chunks)

        try:  # a client that sends its body slowly holds a connection: the timeout bounds it
            return await asyncio.wait_for(
                receive(), None if deadline is None else deadline - time.monotonic()
            )
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    def encode(self, text: str, where: str) -> list[int]:
        if not valid_utf8(text):  # JSON's \ud800 escapes decode to unpaired surrogates
            raise APIError(400, f"{where} is not valid UTF-8 (an unpaired surrogate)", param=where)
        return self.tokenizer.encode(text)

    def check_input_size(self, texts: Sequence[str], where: str) -> None:
        """Refuse text over the tokenizer's bound before tokenizing it: tokenizing runs on the
        event loop, where every stream waits for it."""
        size = sum(len(text) for text in texts)
        if size > self.max_input_chars:
            raise APIError(
                400,
                f"{where} holds {size} characters, more than this server reads per request "
                f"({self.max_input_chars}, --max-input-chars)",
                param=where,
                code="input_too_long",
            )

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            self.check_input_size([prompt], "prompt")
            return [self.encode(prompt, "prompt")]
        if all(isinstance(p, int) for p in prompt):
            return [self._check_ids(prompt, "prompt")]
        if len(prompt) > self.engine.max_queue:  # it could never be queued whole: not busy, too big
            raise APIError(
                400,
                f"prompt holds {len(prompt)} prompts, more than this server queues at once "
                f"({self.engine.max_queue}, --max-queue)",
                param="prompt",
            )
        self.check_input_size([p for p in prompt if isinstance(p, str)], "prompt")
        return [
            self.encode(p, f"prompt.{i}")
            if isinstance(p, str)
            else self._check_ids(p, f"prompt.{i}")
            for i, p in enumerate(prompt)
        ]

    def _check_ids(self, ids: list[int], where: str) -> list[int]:
        vocab = self.engine.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"{where}: token ids must lie in [0, {vocab})", param=where)
        return list(ids)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        conversation = body.conversation()
        self.check_input_size([message["content"] for message in conversation], "messages")
        for i, message in enumerate(conversation):
            self.encode(message["content"], f"messages.{i}.content")
        try:
            return list(
                self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
            )
        except OlmoeError as exc:  # the conversation or the checkpoint's chat template
            raise APIError(400, f"messages: {exc}", param="messages") from None

    def budgets(self, prompts: list[list[int]], asked: int | None, default: int | None):
        """Tokens to generate per prompt: what was asked, which must fit the context window and
        --max-new-tokens, or the default clipped to both."""
        window = self.engine.context_window
        most = self.limits.max_new_tokens
        if asked is not None and most is not None and asked > most:
            raise APIError(
                400,
                f"max_tokens={asked} exceeds this server's limit of {most} new tokens "
                "(--max-new-tokens)",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        budgets = []
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            self._check_prompt_tokens(ids)
            room = window - len(ids)
            if room <= 0:
                raise APIError(
                    400,
                    f"the prompt has {len(ids)} tokens but the model's context window is "
                    f"{window}: shorten it",
                    param="prompt",
                    code="context_length_exceeded",
                )
            if asked is not None and asked > room:
                raise APIError(
                    400,
                    f"max_tokens={asked} does not fit: the prompt has {len(ids)} tokens and the "
                    f"context window is {window}, so at most {room} can be generated",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            budget = asked if asked is not None else min(default or room, room)
            budgets.append(budget if most is None else min(budget, most))
        return budgets

    def _check_prompt_tokens(self, ids: list[int]) -> None:
        most = self.limits.max_prompt_tokens
        if most is not None and len(ids) > most:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, more than this server accepts ({most}, "
                "--max-prompt-tokens): shorten it",
                param="prompt",
                code="prompt_too_long",
            )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except ValueError:  # Python reads integers of at most 4300 digits
        raise APIError(400, "the request body holds a number with too many digits") from None
    except RecursionError:
        raise APIError(400, "the request body nests arrays or objects too deeply") from None


def create_app(server: Server, allowed_origins: Sequence[str] = ()) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        # uvicorn has waited for the in-flight responses; the engine has nothing left to do.
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(
        title="olmoe",
        version=__version__,
        description="OLMoE behind OpenAI's HTTP API (docs/serving.md).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.openapi = lambda: _openapi(app, server)
    if allowed_origins:  # browser front ends on other origins (CORS preflight needs no key)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        server.count(request, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        server.count(request, exc.status_code)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        server.count(request, 500)
        message = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health():
        if not server.engine.alive:  # for load balancers: this process can no longer generate
            return JSONResponse({"status": "the engine has stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", responses=_responses(ModelList, 401))
    async def models(request: Request):
        server.authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "olmoe",
                    "max_model_len": server.engine.context_window,
                }
            ],
        }

    @app.get("/metrics", response_class=PlainTextResponse, responses=_responses(None, 401))
    async def prometheus(request: Request):
        server.authorize(request)
        return PlainTextResponse(
            metrics.render(server.engine, server.responses, (server.first_token, server.duration)),
            media_type=metrics.CONTENT_TYPE,
        )

    @app.post(
        "/v1/completions",
        responses=_responses(Completion, *GENERATION_ERRORS, stream=CompletionChunk),
        openapi_extra=_request_body(CompletionRequest),
    )
    async def completions(request: Request):
        deadline = server.deadline()
        server.authorize(request)
        body = await server.read(request, CompletionRequest, deadline)
        prompts = server.prompts(body)
        budgets = server.budgets(prompts, body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        job = _Job(server, prompts, body, budgets, deadline)
        return await _respond(server, request, body, job, _CompletionFormat())

    @app.post(
        "/v1/chat/completions",
        responses=_responses(ChatCompletion, *GENERATION_ERRORS, stream=ChatCompletionChunk),
        openapi_extra=_request_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request):
        deadline = server.deadline()
        server.authorize(request)
        body = await server.read(request, ChatCompletionRequest, deadline)
        prompt = server.chat_prompt(body)
        asked = body.max_completion_tokens or body.max_tokens
        budgets = server.budgets([prompt], asked, None)
        job = _Job(server, [prompt], body, budgets, deadline)
        return await _respond(server, request, body, job, _ChatFormat())

    return app


# ---------------------------------------------------------------------------- the OpenAPI schema
ERROR_MEANINGS = {
    400: "a malformed or unsupported request, or one over a limit: the message says which",
    401: "a missing or wrong API key (when the server has one)",
    404: "another model's name",
    408: "the request outlasted --request-timeout",
    413: "a body over --max-body-bytes",
    500: "a failure inside the server (a bug)",
    503: "the queue is full (--max-queue) or the server is shutting down: retry later",
}
GENERATION_ERRORS = (400, 401, 404, 408, 413, 500, 503)
SCHEMA_REF = "#/components/schemas/{model}"
# Models the schema names that no route declares to FastAPI: the request bodies, which the
# handlers read themselves, and the events of a stream.
EXTRA_MODELS = (CompletionRequest, ChatCompletionRequest, CompletionChunk, ChatCompletionChunk)
HEALTH_RESPONSES = {
    200: {"model": Health, "description": "the server runs"},
    503: {"model": Health, "description": "the engine thread has stopped: no more generation"},
}


def _responses(model, *errors: int, stream=None) -> dict:
    """A route's responses for the OpenAPI schema: `model` on 200 (with `stream`: also the
    server-sent events of that chunk model) and OpenAI's error body on each of `errors`."""
    ok: dict[str, Any] = {"description": "success"}
    if model is not None:
        ok["model"] = model
    if stream is not None:
        ok["description"] = (
            f"a {model.__name__}; with stream: true, server-sent events of {stream.__name__}s, "
            "then `data: [DONE]`"
        )
        ok["content"] = {"text/event-stream": {"schema": _event(stream)}}
    described = {
        status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in errors
    }
    return {200: ok, **described}


def _event(chunk) -> dict:
    """One server-sent event of a stream (OpenAPI 3.1: the schema of an event-stream is that of
    each event): a chunk, an error once the stream has started, or the closing [DONE]."""
    payload = {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _request_body(model) -> dict:
    content = {"application/json": {"schema": _ref(model)}}
    return {"requestBody": {"required": True, "content": content}}


def _ref(model) -> dict:
    return {"$ref": SCHEMA_REF.format(model=model.__name__)}


def _openapi(app: FastAPI, server: Server) -> dict[str, Any]:
    """FastAPI's schema of the routes plus EXTRA_MODELS."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _, extra = models_json_schema(
            [(model, "validation") for model in EXTRA_MODELS], ref_template=SCHEMA_REF
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(extra["$defs"])
        # What only this server knows: the model's name (any other gets a 404) and its vocabulary.
        for name in (CompletionRequest.__name__, ChatCompletionRequest.__name__):
            components[name]["properties"]["model"] = {"enum": [server.model_name]}
        _bound_integers(components["CompletionRequest"]["properties"]["prompt"], server)
        app.openapi_schema = schema
    return app.openapi_schema


def _bound_integers(node: dict[str, Any], server: Server) -> None:
    """Bound the token ids in a prompt's schema by the vocabulary."""
    if node.get("type") == "integer":
        node.update(minimum=0, maximum=server.engine.config.vocab_size - 1)
    for inner in [*node.get("anyOf", ()), *([node["items"]] if "items" in node else [])]:
        _bound_integers(inner, server)


# ---------------------------------------------------------------------------- response shapes
class _CompletionFormat:
    prefix, obj, chunk_obj = "cmpl", "text_completion", "text_completion"

    def choice(self, choice: _Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": choice.text(),
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def delta(self, choice: _Choice, piece: str) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": piece,
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }

    def logprobs(self, entries: list) -> dict[str, Any]:
        """OpenAI's completion logprobs; text offsets count from the start of the completion."""
        return {
            "tokens": [text for text, _, _, _ in entries],
            "token_logprobs": [logprob for _, _, logprob, _ in entries],
            "top_logprobs": [None if top is None else dict(top) for _, _, _, top in entries],
            "text_offset": [offset for _, offset, _, _ in entries],
        }


class _ChatFormat:
    prefix, obj, chunk_obj = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, choice: _Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text()},
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }

    def opening(self, index: int) -> dict[str, Any] | None:
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def logprobs(self, entries: list) -> dict[str, Any]:
        """OpenAI's chat logprobs. `bytes` are the UTF-8 of the token's own text, so a token
        holding part of a character shows U+FFFD's bytes, not its raw ones."""

        def item(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            {**item(text, logprob), "top_logprobs": [item(*alternative) for alternative in top]}
            for text, _, logprob, top in entries
        ]
        return {"content": content, "refusal": None}

    def delta(self, choice: _Choice, piece: str) -> dict[str, Any]:
        delta = {"content": piece} if piece else {}
        return {
            "index": choice.index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": choice.finish_reason,
        }


async def _respond(server: Server, request: Request, body, job: _Job, shape):
    job.submit()
    head = {"id": new_id(shape.prefix), "created": now(), "model": server.model_name}
    if body.stream:
        server.count(request, 200)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(job, head, shape, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        async for _ in job.updates(request.is_disconnected):
            pass
    finally:
        job.cancel()  # a no-op once every choice has finished
    server.count(request, 200)
    choices = []
    for choice in job.choices:
        entry = shape.choice(choice)
        if job.logprobs is not None:
            entry["logprobs"] = shape.logprobs(choice.logprobs)
        if job.return_routing:
            entry["olmoe"] = choice.telemetry()
        choices.append(entry)
    return {
        **head,
        "object": shape.obj,
        "choices": choices,
        "usage": usage(job.prompt_tokens, job.completion_tokens),
    }


# Characters that JSON leaves raw but that many clients' line readers (str.splitlines, httpx's
# aiter_lines) take for line breaks, splitting an event in two. Inside JSON they can only stand in
# strings, where their escapes mean the same text.
_LINE_BREAKS_TO_ESCAPE = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def sse_data(payload: Any) -> str:
    """One server-sent event carrying `payload` as JSON, on a line no client splits."""
    text = json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS_TO_ESCAPE)
    return f"data: {text}\n\n"


async def _stream(job: _Job, head: dict, shape, include_usage: bool) -> AsyncIterator[str]:
    def event(choices: list, **extra) -> str:
        chunk = {**head, "object": shape.chunk_obj, "choices": choices, **extra}
        if include_usage:
            chunk.setdefault("usage", None)
        return sse_data(chunk)

    try:
        for choice in job.choices:
            opening = shape.opening(choice.index)
            if opening is not None:
                yield event([opening])
        try:
            async for choice, piece in job.updates():
                if not piece and choice.finish_reason is None:
                    continue  # text held back (a partial character or stop string)
                entry = shape.delta(choice, piece)
                if job.logprobs is not None:
                    entry["logprobs"] = shape.logprobs(choice.logprobs[choice.sent :])
                if job.return_routing:
                    entry["olmoe"] = choice.telemetry(choice.sent)
                choice.sent = len(choice.tokens)
                yield event([entry])
        except APIError as exc:  # the stream has started: the error goes in-band
            yield sse_data(exc.body())
        else:
            if include_usage:
                yield event([], usage=usage(job.prompt_tokens, job.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or all is done: then a no-op)
