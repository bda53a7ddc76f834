"""`olmoe serve` as a real process on a loopback port, driven by the official `openai` client.

One server (a tiny random model with OLMoE's vocabulary and the real OLMo tokenizer, float32,
an API key) serves the whole module; the shutdown test starts its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from olmoe import OlmoeForCausalLM
from olmoe.serve.app import sse_data
from olmoe.tokenizer import Tokenizer
from tests.serve.servers import MODEL, QUICK_START_ENV, save_checkpoint, start_server

KEY = "sk-test-key"
ORIGIN = "http://localhost:3000"
CONTEXT = 256
# The module's server sets its own OpenMP wait policy (re-executing itself), which a test checks.
PROCESSES: dict[str, subprocess.Popen] = {}  # the module's server by its URL
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Mixture-of-experts models route each token to a few of many experts, so",
    "Hello",
    "1, 2, 3, 4,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In 1905, Albert Einstein published",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("tiny-vocab"), CONTEXT)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same checkpoint in this process, for what `generate` says."""
    model = OlmoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with open(tmp_path_factory.mktemp("log") / "server.log", "w") as log:
        process, url = start_server(
            checkpoint, log, "--api-key", KEY, "--max-batch-size", "8",
            "--allowed-origin", ORIGIN,
        )  # fmt: skip
        PROCESSES[url] = process
        yield url
        process.terminate()
        process.wait(30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy_text(reference, ids: list[int], new: int) -> str:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def post(server, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60, **kwargs)


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    }


# ---------------------------------------------------------------------------- the API
def test_models_health_and_startup(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # no key needed
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.skipif(
    "OMP_WAIT_POLICY" in os.environ or not Path("/proc/self/environ").exists(),
    reason="the server keeps a wait policy the environment sets; needs Linux's /proc",
)
def test_the_server_waits_passively_for_openmp_work(server):
    environment = Path(f"/proc/{PROCESSES[server].pid}/environ").read_bytes().split(b"\0")
    assert b"OMP_WAIT_POLICY=PASSIVE" in environment


def test_completion_is_generates_greedy_output(client, reference):
    _, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[0])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == greedy_text(reference, ids, 20)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 20)
    assert out.usage.total_tokens == len(ids) + 20
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


def test_chat_uses_the_chat_template(client, reference):
    _, tokenizer = reference
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a mixture of experts?"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy_text(reference, ids, 16)
    assert out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("chat", [False, True])
def test_stream_joins_to_the_non_streamed_text_for_the_same_seed(client, chat):
    kwargs = {"model": MODEL, "max_tokens": 30, "temperature": 0.8, "seed": 42}
    if chat:
        kwargs["messages"] = [{"role": "user", "content": "Tell me a story."}]
        create, text = client.chat.completions.create, lambda c: c.message.content
        piece = lambda c: c.delta.content or ""
    else:
        kwargs["prompt"] = PROMPTS[1]
        create, text = client.completions.create, lambda c: c.text
        piece = lambda c: c.text
    whole = create(**kwargs)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    pieces = [piece(c.choices[0]) for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it did stream
    assert "".join(pieces) == text(whole.choices[0])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    other_seed = create(**{**kwargs, "seed": 43})
    assert text(other_seed.choices[0]) != text(whole.choices[0])


def test_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    lines = [line for line in post(server, "/v1/completions", body).text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_an_event_stays_one_line_for_clients_that_split_on_unicode_line_breaks():
    """httpx's aiter_lines and str.splitlines also break lines at U+0085, U+2028 and U+2029,
    which a model may generate and JSON leaves raw: they are sent escaped."""
    text = "a\u2028b\x85c\u2029d\ne\x1cf"
    event = sse_data({"text": text})
    assert event.endswith("\n\n") and len(event.splitlines()) == 2
    assert json.loads(event.splitlines()[0].removeprefix("data: "))["text"] == text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_text_and_finishes_with_stop(client, reference, stream):
    _, tokenizer = reference
    full = greedy_text(reference, tokenizer.encode(PROMPTS[2]), 40)
    stop = full[12:16]  # somewhere inside the greedy continuation
    assert stop.strip() and full.index(stop) >= 1
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop, "@@never@@"],
        stream=stream,
    )  # fmt: skip
    choices = [c.choices[0] for c in out] if stream else out.choices
    text = "".join(c.text for c in choices)
    assert text == full[: full.index(stop)]
    assert choices[-1].finish_reason == "stop"


def test_n_choices_and_several_prompts(client):
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) == 4
    assert out.usage.completion_tokens == 4 * 8


def test_eight_concurrent_streaming_clients_all_get_their_own_greedy_text(
    server, client, reference
):
    _, tokenizer = reference
    expected = [greedy_text(reference, tokenizer.encode(p), 24) for p in PROMPTS]
    before = metrics(server)
    results: list[str | None] = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        barrier.wait()
        stream = client.completions.create(
            model=MODEL, prompt=PROMPTS[i], max_tokens=24, temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected
    after = metrics(server)
    tokens = after["olmoe_generation_tokens_total"] - before["olmoe_generation_tokens_total"]
    steps = after["olmoe_decode_steps_total"] - before["olmoe_decode_steps_total"]
    assert tokens == 8 * 24
    assert steps < tokens - 8  # sequences shared decode steps


# ---------------------------------------------------------------------------- telemetry
@pytest.mark.parametrize("stream", [False, True])
def test_routing_telemetry(client, reference, stream):
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[3])
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=0, stream=stream,
        extra_body={"olmoe": {"return_routing": True}},
    )  # fmt: skip
    parts = [c.choices[0].model_extra["olmoe"] for c in out] if stream else [
        out.choices[0].model_extra["olmoe"]
    ]  # fmt: skip
    tokens = [t for p in parts for t in p["token_ids"]]
    routing = [r for p in parts for r in p["routing"]]
    assert len(tokens) == len(routing) == 6
    with torch.no_grad():
        router_logits = model(torch.tensor([ids + tokens]), output_router_logits=True).router_logits
    config = model.config
    for i, per_layer in enumerate(routing):  # token i came from position len(ids) - 1 + i
        assert len(per_layer) == config.num_hidden_layers
        for layer, experts in enumerate(per_layer):
            probs = router_logits[layer][len(ids) - 1 + i].softmax(-1)
            assert experts == probs.topk(config.num_experts_per_tok).indices.tolist()


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(client, reference, stream):
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[5])
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0, logprobs=2, stream=stream
    )
    choices = [c.choices[0] for c in out] if stream else out.choices
    tokens = [t for c in choices for t in c.logprobs.tokens]
    logprobs = [lp for c in choices for lp in c.logprobs.token_logprobs]
    tops = [top for c in choices for top in c.logprobs.top_logprobs]
    offsets = [o for c in choices for o in c.logprobs.text_offset]
    text = "".join(c.text for c in choices)
    assert "".join(tokens) == text and len(tokens) == 6
    assert offsets == [len("".join(tokens[:i])) for i in range(6)]
    with torch.no_grad():
        full = model.generate(torch.tensor([ids]), max_new_tokens=6)  # the same greedy tokens
        logits = model(full).logits[0, len(ids) - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1).max(dim=-1).values  # greedy: the top token
    torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=1e-4)
    for token, logprob, top in zip(tokens, logprobs, tops):
        assert len(top) == 2 and top[token] == logprob == max(top.values())


def test_echo_scores_the_prompt(client, reference):
    """What evaluation harnesses send for log-likelihoods: echo, logprobs, max_tokens 0 or 1."""
    model, tokenizer = reference
    ids = tokenizer.encode(PROMPTS[6])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    scored = client.completions.create(
        model=MODEL, prompt=PROMPTS[6], max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = scored.choices[0]
    assert choice.text == PROMPTS[6] and choice.finish_reason == "length"
    assert "".join(choice.logprobs.tokens) == PROMPTS[6] and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), expected)
    assert scored.usage.completion_tokens == 0
    one_more = client.completions.create(
        model=MODEL, prompt=PROMPTS[6], max_tokens=1, echo=True, logprobs=1, temperature=0
    ).choices[0]
    assert one_more.text.startswith(PROMPTS[6]) and len(one_more.logprobs.tokens) == len(ids) + 1
    assert one_more.logprobs.token_logprobs[: len(ids)] == choice.logprobs.token_logprobs
    assert one_more.logprobs.text_offset[-1] == len(PROMPTS[6])


def test_chat_logprobs(server, client):
    messages = [{"role": "user", "content": "Count to three."}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0}
    out = client.chat.completions.create(logprobs=True, top_logprobs=3, **kwargs)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(item.token for item in content) == out.choices[0].message.content
    for item in content:
        assert bytes(item.bytes).decode() == item.token
        assert [a.logprob for a in item.top_logprobs] == sorted(
            (a.logprob for a in item.top_logprobs), reverse=True
        )
        assert item.top_logprobs[0].token == item.token
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].logprobs is None
    bad = post(server, "/v1/chat/completions", {**kwargs, "top_logprobs": 2})
    assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.text


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    response = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = metrics(server)
    for name in (
        "olmoe_prompt_tokens_total",
        "olmoe_generation_tokens_total",
        "olmoe_generation_tokens_per_second",
        "olmoe_queue_depth",
        "olmoe_batch_size",
    ):
        assert name in values
    assert values["olmoe_generation_tokens_total"] >= 4
    assert values['olmoe_http_responses_total{path="/v1/completions",code="200"}'] >= 1
    for histogram in ("olmoe_time_to_first_token_seconds", "olmoe_request_duration_seconds"):
        buckets = [v for k, v in values.items() if k.startswith(f"{histogram}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == values[f"{histogram}_count"] >= 1
    layers = {}
    for name, value in values.items():
        found = re.fullmatch(r'olmoe_expert_tokens_total\{layer="(\d+)",expert="(\d+)"\}', name)
        if found:
            layers[found.group(1)] = layers.get(found.group(1), 0) + value
    assert len(layers) == 2 and len(set(layers.values())) == 1  # every token in every layer
    assert layers["0"] >= 2 * values["olmoe_prompt_tokens_total"]  # top-2 routing


# ---------------------------------------------------------------------------- bad input
LONG_PROMPT = "word " * (CONTEXT + 10)
BAD_BODIES = [
    (b'{"model": "tiny-olmoe", "prompt": "Hi"', 400, "not valid JSON"),
    (b'{"model": "tiny-olmoe", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": 42}, 400, "prompt must be a string, a list of strings"),
    ({"model": MODEL, "prompt": [[1, 2], "mixed"]}, 400, "prompt must be"),
    ({"model": MODEL, "prompt": "Hi", "stop": 5}, 400, "stop must be a string or a list"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 10**9}, 400, "max_tokens=1000000000"),
    ({"model": MODEL, "prompt": LONG_PROMPT}, 400, "context window"),
    ({"model": MODEL, "prompt": [5, 99999999]}, 400, "token ids"),
    ({"model": MODEL, "prompt": "\ud800"}, 400, "UTF-8"),
    ({"model": MODEL, "prompt": "Hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "Hi", "n": 9}, 400, "batch size"),
    ({"model": MODEL, "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "Hi", "echo": True, "stream": True}, 400, "not supported"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 0}, 400, "0 only with echo"),
    ({"model": MODEL, "prompt": "Hi", "suffix": "!"}, 400, "not supported"),
    ({"model": MODEL, "prompt": "Hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "Hi"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "does not exist"),
]
BAD_CHATS = [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"content": "Hi"}]}, 400, "role"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages.0.content must",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "context"),
    ({"model": MODEL, "messages": "Hi"}, 400, "messages"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [("/v1/completions", *case) for case in BAD_BODIES]
    + [("/v1/chat/completions", *case) for case in BAD_CHATS],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    server, client, path, body, status, says
):
    response = post(server, path, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"] and error["type"]
    good = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert good.usage.completion_tokens == 2


def test_null_fields_take_their_defaults(server):
    body = {"model": MODEL, "prompt": "Hi", "n": None, "stream": None, "max_tokens": None,
            "temperature": None, "stop": None, "seed": None}  # fmt: skip
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200
    out = response.json()
    # OpenAI's default max_tokens, unless the (sampled) text ended first
    assert out["usage"]["completion_tokens"] == 16 or out["choices"][0]["finish_reason"] == "stop"
    missing = post(server, "/v1/completions", {**body, "model": None})
    assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=10**9)


def test_api_key_is_enforced_everywhere_but_health(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", body, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert post(server, "/v1/chat/completions", body, key=key).status_code == 401
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200


def test_browser_front_ends_of_allowed_origins_may_call(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    allowed = httpx.options(f"{server}/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        f"{server}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, client):
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": CONTEXT - 10, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body,
        headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
    ) as response:  # fmt: skip
        next(response.iter_lines())  # the first event arrives, then the client hangs up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = metrics(server)
        cancelled = (
            now["olmoe_sequences_cancelled_total"] - before["olmoe_sequences_cancelled_total"]
        )
        if cancelled == 1 and now["olmoe_batch_size"] == 0:
            break
        time.sleep(0.05)
    assert cancelled == 1 and now["olmoe_batch_size"] == 0
    produced = now["olmoe_generation_tokens_total"] - before["olmoe_generation_tokens_total"]
    assert produced < CONTEXT - 10  # it stopped early
    good = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert good.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------- busy, shutdown
def test_full_queue_gets_503_and_sigterm_lets_in_flight_requests_finish(tmp_path):
    # The running request must outlast the steps below on any machine: a long one.
    long_context = 512
    checkpoint = save_checkpoint(tmp_path / "model", long_context)
    with open(tmp_path / "server.log", "w") as log:
        process, url = start_server(
            checkpoint, log, "--max-batch-size", "1", "--max-queue", "1",
            environment=QUICK_START_ENV,
        )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        results = {}

        def run(name: str, max_tokens: int) -> None:
            stream = client.completions.create(
                model=MODEL, prompt="Hi", max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = list(stream)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            results[name] = (finish, chunks[-1].usage.completion_tokens)

        running = threading.Thread(target=run, args=("running", long_context - 10))
        running.start()
        wait_for(lambda: metrics(url)["olmoe_batch_size"] == 1)
        waiting = threading.Thread(target=run, args=("waiting", 5))
        waiting.start()
        wait_for(lambda: metrics(url)["olmoe_queue_depth"] == 1)

        response = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi"}, key=None)
        assert response.status_code == 503
        assert "busy" in response.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=MODEL, prompt="Hi")

        process.send_signal(signal.SIGTERM)
        running.join(120)
        waiting.join(120)
        assert process.wait(60) == 0  # a drained SIGTERM is a clean exit
        assert results == {"running": ("length", long_context - 10), "waiting": ("length", 5)}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        process.kill()


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_an_oversized_body_is_refused_unread(server, client):
    response = post(server, "/v1/completions", b"x" * (17 * 2**20))
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]["message"]
    assert "--max-body-bytes" in response.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).usage.total_tokens


def test_a_taken_port_is_a_one_line_error(server, checkpoint):
    port = server.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "olmoe", "serve", str(checkpoint), "--port", port],
        check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, **QUICK_START_ENV},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"olmoe serve: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr
