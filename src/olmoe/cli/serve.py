"""`olmoe serve MODEL`: the OpenAI-compatible HTTP server (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import os
import signal
import socket

from olmoe.cli.common import (
    add_load_arguments,
    add_model_arguments,
    load_model,
    number,
    wait_passively,
)
from olmoe.errors import UsageError
from olmoe.serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT_S, Limits

API_KEY_ENV = "OLMOE_API_KEY"


def add_commands(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models), with streaming, continuous batching, /health and /metrics.",
    )
    add_model_arguments(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port",
        type=number(int, 0, high=65535, what="a port number in [0, 65535]"),
        default=8000,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument(
        "--served-model-name",
        help="the model name clients send and /v1/models lists (default: MODEL as given)",
    )
    add_load_arguments(serve)
    serve.add_argument(
        "--max-batch-size",
        type=number(int, 1, what="an integer >= 1"),
        default=8,
        help="most sequences decoded together (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queue",
        type=number(int, 1, what="an integer >= 1"),
        default=64,
        help="most requests waiting for a batch row; beyond it requests get 503 "
        "(default: %(default)s)",
    )
    add_limit_arguments(serve)
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route but /health "
        f"(default: ${API_KEY_ENV} when set)",
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a "
        "browser (CORS; repeatable; default: none)",
    )
    serve.set_defaults(run=run_serve)


def add_limit_arguments(serve) -> None:
    """What one request may ask for; a request over a limit gets a 4xx that names the flag."""
    whole = number(int, 1, what="an integer >= 1")
    serve.add_argument(
        "--max-prompt-tokens",
        type=whole,
        help="most tokens a prompt may have (default: the context window less one)",
    )
    serve.add_argument(
        "--max-new-tokens",
        type=whole,
        help="most tokens one choice may generate: a larger max_tokens gets 400, and the default "
        "(chat: the rest of the context window) is cut to it (default: the context window)",
    )
    serve.add_argument(
        "--max-input-chars",
        type=whole,
        help="most characters of text (prompts or messages) one request may have, checked before "
        "tokenizing (default: 32 per allowed prompt token)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=whole,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body; a larger one gets 413 (default: %(default)s, 16 MiB)",
    )
    serve.add_argument(
        "--request-timeout",
        type=number(float, 0, what="a number of seconds >= 0"),
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds from a request's arrival to its last token, queueing included; a request "
        "that takes longer gets 408 (0: no limit; default: %(default)g)",
    )


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        max_input_chars=args.max_input_chars,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout or None,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from olmoe.serve.app import Server, create_app
    from olmoe.serve.engine import Engine

    # OpenMP workers that spin while they wait take the cores the HTTP thread needs
    # (bench/serve_throughput.py shows the difference on a small machine).
    wait_passively("serve")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    # Listen before the (slow) load: a taken port fails at once, and clients that connect while
    # the model loads wait in the backlog instead of being refused.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None

    model, tokenizer, load_seconds = load_model(args)
    model.eval()
    engine = Engine(model, tokenizer, args.max_batch_size, args.max_queue)
    name = args.served_model_name or args.model
    app = create_app(Server(engine, tokenizer, name, api_key, limits_of(args)), args.allowed_origin)
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown: it stops accepting, lets the
    # in-flight responses finish, runs the app's shutdown (which stops the engine), and then
    # re-raises the signal, with the handlers it found restored. Ctrl-C then ends as an interrupt
    # (130); SIGTERM finds the handler below and ends with 0, which process managers read as a
    # clean stop. Set before the startup line, which tells clients (and tests) they may signal.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, _sigterm_handler(server))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"olmoe serve: {name} listening on http://{shown}:{port}/v1 (loaded in "
        f"{load_seconds:.1f} s; batch {args.max_batch_size}, queue {args.max_queue}"
        f"{', API key required' if api_key else ''})",
        flush=True,
    )
    server.run(sockets=[sock])
    return 0


def _sigterm_handler(server):
    def handle(signum, frame) -> None:
        if not server.should_exit:  # it came before uvicorn listens for signals: pass it on
            server.handle_exit(signum, frame)

    return handle
