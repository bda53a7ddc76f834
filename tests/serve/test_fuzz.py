"""Property-based fuzzing of the HTTP API.

schemathesis generates requests from the server's own OpenAPI schema (/openapi.json), valid
ones and ones that break it, sends them to `olmoe serve` and checks each answer: never a 5xx,
and status, content type and body as the schema declares. hypothesis then sends what no schema
describes (any bytes, any JSON, deep nesting, huge numbers, unpaired surrogates, control
characters) to the request parser and the HTTP layer, and any text to the tokenizer. Case
counts: API_CASES per operation here, LONG_API_CASES in the slow run; `pytest -s` prints them.
"""

from __future__ import annotations

import collections
import json
import unicodedata

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from olmoe.serve.app import Server, create_app
from olmoe.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse,
    valid_utf8,
)
from olmoe.streaming import IncrementalDecoder
from olmoe.tokenizer import Tokenizer
from tests.serve.servers import MODEL, QUICK_START_ENV, FakeEngine, save_checkpoint, start_server

API_CASES = 60
LONG_API_CASES = 1000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
POSTS = ("/v1/completions", "/v1/chat/completions")
GETS = ("/v1/models", "/health", "/metrics")
# Requests sent, by operation, mode and status.
CASES: collections.Counter[tuple[str, str, int]] = collections.Counter()
VOCAB = 50304
# The same cases on every run, no example database left in the working tree, and no deadline
# or health check that a slow shared machine would trip.
FUZZ = settings(
    derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A server whose limits keep generated requests cheap: a few rows, a short queue, at most 16
    new tokens."""
    directory = tmp_path_factory.mktemp("fuzz")
    checkpoint = save_checkpoint(directory / "model", 256)
    with open(directory / "server.log", "w") as log:
        process, url = start_server(
            checkpoint, log, "--max-batch-size", "4", "--max-queue", "8",
            "--max-new-tokens", "16", environment=QUICK_START_ENV,
        )  # fmt: skip
    yield url
    process.terminate()
    process.wait(30)
    for (label, mode, status), count in sorted(CASES.items()):
        print(f"schemathesis: {label} ({mode}): {count} answered {status}")


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


def fuzz(api_schema, method: str, path: str, mode: GenerationMode, cases: int) -> None:
    """Send `cases` requests that schemathesis generates for one operation, in one mode (valid
    bodies, or bodies that break the schema), and check each answer against the schema."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(FUZZ, max_examples=cases)
    def send(case) -> None:
        response = case.call(timeout=60)
        CASES[operation.label, mode.value, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    send()


# Every operation, in both modes where it takes a body (a GET has nothing to break).
FUZZED = [
    *(("POST", path, mode) for path in POSTS for mode in GenerationMode),
    *(("GET", path, GenerationMode.POSITIVE) for path in GETS),
]


def test_every_operation_of_the_schema_is_fuzzed(api_schema):
    operations = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert operations == {(method, path) for method, path, _ in FUZZED}


@pytest.mark.parametrize(("method", "path", "mode"), FUZZED)
def test_generated_requests_get_answers_their_schema_allows(api_schema, method, path, mode):
    fuzz(api_schema, method, path, mode, API_CASES)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), FUZZED)
def test_many_generated_requests_get_answers_their_schema_allows(api_schema, method, path, mode):
    fuzz(api_schema, method, path, mode, LONG_API_CASES)


# What random generation rarely reaches: streams (whose events are checked one by one), log
# probabilities, echo, routing telemetry, several choices.
MESSAGES = [{"role": "user", "content": "Hi"}]
RICH = [
    ("/v1/completions", {"prompt": "Hi", "stream": True, "logprobs": 2, "n": 2,
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": ["Hi", "Ho"], "echo": True, "logprobs": 1,
                         "olmoe": {"return_routing": True}}),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "logprobs": True,
                              "top_logprobs": 2, "olmoe": {"return_routing": True},
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 3}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), RICH)
def test_rich_answers_match_their_schema(api_schema, path, body):
    case = api_schema[path]["POST"].Case(body={"model": MODEL, "max_tokens": 4, **body})
    response = case.call(timeout=60)
    assert response.status_code == 200, response.text
    case.validate_response(response, checks=CHECKS)


# ---------------------------------------------------------------------------- beyond the schema
# Any character, unpaired surrogates and control characters included.
TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELDS = [*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields]


def near_valid(base: dict):
    """A valid body with some of its fields (any field either endpoint knows) set to anything."""
    extra = st.fixed_dictionaries({}, optional={name: JSON for name in FIELDS})
    return extra.map(lambda fields: {**base, **fields})


COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BODIES = JSON | near_valid(COMPLETION) | near_valid(CHAT)


def sendable(error: APIError) -> None:
    assert 400 <= error.status < 500
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")  # no unpaired surrogate


@given(data=BODIES)
@settings(FUZZ, max_examples=500)
def test_the_parser_answers_any_json_with_a_request_or_a_4xx(data):
    for model in (CompletionRequest, ChatCompletionRequest):
        try:
            parse(model, data)
        except APIError as error:
            sendable(error)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.olmo()


@pytest.fixture(scope="module")
def app(tokenizer):
    """The HTTP layer in-process over a stand-in engine that answers at once."""
    server = Server(FakeEngine(), tokenizer, MODEL)
    return TestClient(create_app(server), raise_server_exceptions=False)


def as_bytes(value) -> bytes:
    return json.dumps(value).encode()  # \ud800 escapes, NaN, Infinity: all as Python writes


@given(content=st.binary(max_size=200) | BODIES.map(as_bytes))
@example(content=b"[" * 100_000 + b"]" * 100_000)
@example(content=b'{"model": "tiny-olmoe", "prompt": "Hi", "n": 1' + b"0" * 5000 + b"}")
@example(content=b'{"model": "tiny-olmoe", "prompt": "Hi", "top_p": 1e-320, "temperature": 1e-320}')
@example(content=b'{"model": "tiny-olmoe", "prompt": "Hi", "stop": "\\udc80"}')
@example(content='{"model": "tiny-olmoe", "prompt": "\x00\x1b[31m\u202e\ufeff"}'.encode())
@settings(FUZZ, max_examples=300)
def test_any_body_gets_an_answer_and_never_a_server_error(app, content):
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = app.post(path, content=content)
        assert response.status_code < 500, response.text
        response.content.decode("utf-8")
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and "Traceback" not in error["message"]


@given(text=TEXT | st.text(st.characters(exclude_categories=()), max_size=300))
@example(text="\x00\x01\x1f\x7f\x85\u2028\u2029")
@example(text="e\u0301 \ufb01 \u212b Å")  # combining marks, ligatures, compatibility forms
@example(text="\ud83d")  # half of an emoji's surrogate pair
@settings(FUZZ, max_examples=300)
def test_the_tokenizer_takes_any_text_or_names_the_problem(tokenizer, text):
    server = Server(FakeEngine(), tokenizer, MODEL)
    try:
        ids = server.encode(text, "prompt")
    except APIError as error:
        sendable(error)
        assert not valid_utf8(text) and error.param == "prompt"
        return
    assert all(0 <= i < VOCAB for i in ids)
    # The OLMo tokenizer normalizes to NFC first (GPT-NeoX's does too): "e" and a combining
    # accent come back as "é".
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=30))
@settings(FUZZ, max_examples=300)
def test_streamed_text_of_any_tokens_joins_up_and_can_be_sent(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer, True)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    for piece in pieces:
        assert valid_utf8(piece)
