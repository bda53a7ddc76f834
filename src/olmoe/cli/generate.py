"""`olmoe generate MODEL PROMPT` and `olmoe chat MODEL`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from olmoe.cli.common import add_load_arguments, add_model_arguments, load_model, number
from olmoe.errors import UsageError

CHAT_COMMANDS = "/reset clears the history, /exit ends the chat"


def add_commands(commands) -> None:
    gen = commands.add_parser("generate", help="continue a prompt, streaming the text")
    add_model_arguments(gen)
    gen.add_argument("prompt", metavar="PROMPT", help='the text to continue; "-" reads stdin')
    _add_generation_arguments(gen, temperature=0.0)
    gen.add_argument(
        "--no-stream", action="store_true", help="print the text once generation has finished"
    )
    gen.add_argument(
        "--stats", action="store_true", help="print load time and tokens per second to stderr"
    )
    gen.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="chat interactively (or one turn per stdin line)")
    add_model_arguments(chat)
    chat.add_argument("--system", help="a system message that starts the conversation")
    _add_generation_arguments(chat, temperature=0.7)
    chat.set_defaults(run=run_chat)


def _add_generation_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=number(int, 1, what="an integer >= 1"),
        default=256,
        help="most tokens to generate (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=number(float, 0.0, what="a number >= 0"),
        default=temperature,
        help="sampling temperature; 0 is greedy (default: %(default)s)",
    )
    parser.add_argument(
        "--top-p",
        type=number(float, 0.0, False, 1.0, "a number in (0, 1]"),
        help="nucleus sampling: keep the most probable tokens up to this mass",
    )
    parser.add_argument(
        "--top-k",
        type=number(int, 1, what="an integer >= 1"),
        help="sample among the k most probable tokens",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=number(float, 0.0, False, what="a number > 0"),
        default=1.0,
        help="> 1 discourages repeating tokens (default: 1, off)",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable); it is not printed",
    )
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    add_load_arguments(parser)


def _sampling(args):
    import torch

    from olmoe.generation import SamplingParams

    params = SamplingParams(
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    if generator is None and params.do_sample:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return params, generator


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args) -> int:
    from olmoe.streaming import TextStream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("the prompt is empty: pass some text (or pipe it in with PROMPT -)")
    model, tokenizer, load_seconds = load_model(args)
    params, generator = _sampling(args)
    ids = tokenizer.encode(prompt)
    stream = TextStream(
        model, tokenizer, ids, args.max_new_tokens, params, args.stop, generator=generator
    )
    started = time.perf_counter()
    if args.no_stream:
        _write("".join(stream))
    else:
        for piece in stream:
            _write(piece)
    _write("\n")
    if args.stats:
        seconds = time.perf_counter() - started
        print(
            f"loaded in {load_seconds:.1f} s; {len(ids)} prompt tokens, {stream.new_tokens} new "
            f"in {seconds:.2f} s ({stream.new_tokens / seconds:.1f} tok/s incl. prefill); "
            f"finish: {stream.finish_reason}",
            file=sys.stderr,
        )
    return 0


def run_chat(args) -> int:
    from olmoe.streaming import TextStream

    model, tokenizer, _ = load_model(args)
    params, generator = _sampling(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"Chatting with {args.model}. {CHAT_COMMANDS}.", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    while True:
        line = _read_turn(interactive)
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {CHAT_COMMANDS}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = _fit_history(model, tokenizer, history, len(start))
        if ids is None:
            history.pop()
            print(
                "olmoe chat: that message alone fills the context window; send a shorter one",
                file=sys.stderr,
            )
            continue
        stream = TextStream(
            model, tokenizer, ids, args.max_new_tokens, params, args.stop, generator=generator
        )
        reply = []
        for piece in stream:
            reply.append(piece)
            _write(piece)
        _write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _read_turn(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line if line else None


def _fit_history(model, tokenizer, history: list[dict], keep: int) -> list[int] | None:
    """The prompt for `history`, dropping the oldest exchanges (never the system message) until
    a reply has room; None when even the newest message alone does not fit."""
    window = model.config.max_position_embeddings
    reply_room = min(256, window // 4)
    while True:
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        if len(ids) + reply_room <= window:
            return ids
        if len(history) - keep <= 1:
            return None
        del history[keep : keep + 2]  # the oldest user message and its reply
        print("(oldest turn dropped to fit the context window)", file=sys.stderr)
