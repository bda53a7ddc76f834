"""The limits a server sets on what one request may ask (`olmoe serve --max-prompt-tokens`,
`--max-new-tokens`, `--max-input-chars`, `--max-body-bytes`, `--request-timeout`), the bodies no
parser should choke on, and the OpenAPI schema: the HTTP layer in-process, over a stand-in
engine (the real one is driven in test_app.py, test_fuzz.py and test_soak.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from olmoe.cli import build_parser
from olmoe.cli.serve import limits_of
from olmoe.serve.app import Server, create_app
from olmoe.serve.limits import DEFAULT_MAX_BODY_BYTES, INPUT_CHARS_PER_TOKEN, Limits
from olmoe.tokenizer import Tokenizer
from tests.serve.servers import MODEL, FakeEngine

COMPLETION = {"model": MODEL, "prompt": "Hi"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.olmo()


def call(server: Server, path: str, body=None, content=None, headers=None) -> httpx.Response:
    """One request to the app in-process; `content` (bytes or an async iterator) instead of a
    JSON body."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://olmoe") as client:
            if body is None and content is None:
                return await client.get(path)
            data = json.dumps(body).encode() if content is None else content
            return await client.post(path, content=data, headers=headers)

    return asyncio.run(send())


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def make(tokenizer, engine=None, **limits) -> Server:
    return Server(engine or FakeEngine(), tokenizer, MODEL, limits=Limits(**limits))


# ---------------------------------------------------------------------------- the limits
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/completions", {**COMPLETION, "prompt": "word " * 20}),
     ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 20}]})],
)  # fmt: skip
def test_a_prompt_over_max_prompt_tokens_gets_400(tokenizer, path, body):
    error = error_of(call(make(tokenizer, max_prompt_tokens=8), path, body), 400)
    assert "--max-prompt-tokens" in error["message"] and error["code"] == "prompt_too_long"


def test_max_new_tokens_refuses_more_and_cuts_the_default(tokenizer):
    engine = FakeEngine()
    server = make(tokenizer, engine, max_new_tokens=5)
    error = error_of(call(server, "/v1/completions", {**COMPLETION, "max_tokens": 6}), 400)
    assert "--max-new-tokens" in error["message"] and error["param"] == "max_tokens"
    chat = call(server, "/v1/chat/completions", CHAT)  # asks for the rest of the window
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 5
    assert [r.max_tokens for r in engine.requests] == [5]


def test_text_over_max_input_chars_is_refused_before_tokenizing(tokenizer, monkeypatch):
    server = make(tokenizer, max_input_chars=100)
    monkeypatch.setattr(server, "encode", lambda *_: pytest.fail("tokenized an oversized input"))
    for path, body in [
        ("/v1/completions", {**COMPLETION, "prompt": "x" * 101}),
        ("/v1/completions", {**COMPLETION, "prompt": ["x" * 60, "y" * 60]}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 101}]}),
    ]:
        error = error_of(call(server, path, body), 400)
        assert "--max-input-chars" in error["message"] and error["code"] == "input_too_long"


def test_the_tokenizer_bound_follows_the_prompt_bound():
    assert Limits().input_chars(256) == INPUT_CHARS_PER_TOKEN * 256
    assert Limits(max_prompt_tokens=10).input_chars(256) == INPUT_CHARS_PER_TOKEN * 10
    assert Limits(max_input_chars=7).input_chars(256) == 7


def test_a_body_over_max_body_bytes_gets_413_declared_or_not(tokenizer):
    server = make(tokenizer, max_body_bytes=1000)
    body = json.dumps({**COMPLETION, "prompt": "x" * 2000}).encode()

    async def chunked():  # no Content-Length: the server counts what arrives
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    for content in (body, chunked()):
        error = error_of(call(server, "/v1/completions", content=content), 413)
        assert "--max-body-bytes" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_timeout_gets_408_and_leaves_the_engine(tokenizer, stream):
    engine = FakeEngine(silent=True)  # nothing ever comes back
    response = call(
        make(tokenizer, engine, request_timeout=0.2),
        "/v1/completions",
        {**COMPLETION, "stream": stream},
    )
    if stream:  # the stream has started (200): the error comes in-band, then the end
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert response.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        error = error_of(response, 408)
    assert "--request-timeout" in error["message"] and error["code"] == "request_timeout"
    assert engine.requests[0].cancelled


def test_a_body_that_arrives_too_slowly_gets_408(tokenizer):
    async def slow():
        yield b'{"model": '
        await asyncio.sleep(1)
        yield b'"tiny-olmoe", "prompt": "Hi"}'

    response = call(make(tokenizer, request_timeout=0.2), "/v1/completions", content=slow())
    assert error_of(response, 408)["code"] == "request_timeout"


def test_more_prompts_than_the_queue_holds_is_a_400_not_busy(tokenizer):
    server = make(tokenizer, FakeEngine(max_queue=4))
    error = error_of(call(server, "/v1/completions", {**COMPLETION, "prompt": ["a"] * 5}), 400)
    assert "--max-queue" in error["message"]
    assert call(server, "/v1/completions", {**COMPLETION, "prompt": ["a"] * 4}).status_code == 200


def test_serve_flags_set_the_limits_with_documented_defaults():
    parse = build_parser().parse_args
    assert limits_of(parse(["serve", "m"])) == Limits(
        max_body_bytes=DEFAULT_MAX_BODY_BYTES, request_timeout=600.0
    )
    flags = ["--max-prompt-tokens", "10", "--max-new-tokens", "20", "--max-input-chars", "30",
             "--max-body-bytes", "40", "--request-timeout", "0"]  # fmt: skip
    assert limits_of(parse(["serve", "m", *flags])) == Limits(10, 20, 30, 40, None)


# ---------------------------------------------------------------------------- odd bodies
NESTED = b'{"model": "tiny-olmoe", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (NESTED, "nests"),
        # Python reads at most 4300 digits (3.10 before 3.10.7 reads them, and the range says no)
        (b'{"model": "tiny-olmoe", "prompt": "Hi", "seed": ' + b"9" * 5000 + b"}", "digits|seed"),
        (b'{"model": "tiny-olmoe", "prompt": "Hi", "temperature": NaN}', "temperature"),
        (b'{"model": "tiny-olmoe", "prompt": "Hi", "temperature": 1e999}', "temperature"),
        (b'{"model": "tiny-olmoe", "prompt": "Hi", "logit_bias": {"\\ud800": "x"}}', "logit_bias"),
        (b'{"model": "tiny-olmoe", "prompt": "Hi", "stop": ["\\udfff"]}', "surrogate"),
        (b'{"model": "tiny-olmoe", "prompt": "Hi", "repetition_penalty": 1e-300}', "repetition"),
        (b'{"model": "\\ud800", "prompt": "Hi"}', "does not exist"),
    ],
)
def test_odd_bodies_get_a_4xx_in_valid_utf8(tokenizer, content, says):
    response = call(make(tokenizer), "/v1/completions", content=content)
    assert 400 <= response.status_code < 500
    response.content.decode("utf-8")  # no unpaired surrogate made it into the answer
    message = response.json()["error"]["message"]
    assert any(part in message for part in says.split("|")), message


def test_a_vanishing_temperature_means_greedy(tokenizer):
    engine = FakeEngine()
    body = {**COMPLETION, "temperature": 5e-324, "max_tokens": 2}
    assert call(make(tokenizer, engine), "/v1/completions", body).status_code == 200
    assert not engine.requests[0].params.do_sample


# ---------------------------------------------------------------------------- the schema
def test_openapi_schema_declares_request_and_response_bodies(tokenizer):
    schema = call(make(tokenizer), "/openapi.json").json()
    assert schema["info"]["title"] == "olmoe"
    components = schema["components"]["schemas"]
    for path, request, response in [
        ("/v1/completions", "CompletionRequest", "Completion"),
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion"),
    ]:
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{request}"}
        ok = operation["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{response}"}
        assert "text/event-stream" in ok
        assert {"400", "408", "413", "503"} <= set(operation["responses"])
        assert components[request]["properties"]["model"] == {"enum": [MODEL]}
    # null means the default, and the schema says so
    n = components["CompletionRequest"]["properties"]["n"]
    assert {"type": "null"} in n["anyOf"]
    for path in ("/v1/models", "/health", "/metrics"):
        assert "get" in schema["paths"][path]
    text = json.dumps(schema)
    for name in (ref.split("/")[-1] for ref in _refs(schema)):
        assert name in components, f"{name} is referenced but not defined"
    assert "Message" in components and "ErrorResponse" in text


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)
