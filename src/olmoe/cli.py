"""`olmoe <command>`: a thin command line over the library.

    olmoe generate MODEL "prompt"   stream a continuation to stdout
    olmoe chat MODEL                interactive chat (a terminal, or turns as lines on stdin)
    olmoe quantize MODEL OUTPUT     write an int8 copy of a checkpoint
    olmoe bench [--shape small]     olmoe against transformers and llama.cpp on this CPU
    olmoe info MODEL                config, parameter counts, dtype and size of a checkpoint
    olmoe serve MODEL               OpenAI-compatible HTTP server (streaming, batching)
    olmoe data prepare SRC --out D  tokenise text/JSONL/folders/stdlib into training token files
    olmoe analyze STUDY MODEL       the paper's routing studies: saturation, coactivation, ...
    olmoe train CONFIG              train (configs/*.yaml; --resume DIR; torchrun for N processes)
    olmoe plot RUN_DIR              a training run's curves and expert-load heatmap as PNG
    olmoe eval MODEL --tasks paper  OLMES benchmarks (MMLU, HellaSwag, ARC, ...), perplexity, bpb

MODEL is a checkpoint directory or a hub repo id (`--revision` picks a branch). User mistakes end
with one line on stderr and exit status 1 (2 for bad flags), never a traceback; set OLMOE_DEBUG=1
to see one anyway.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
QUANTIZE_CHOICES = ("int8",)  # olmoe.quantize.QUANTIZE_CHOICES, without importing torch for --help
CHAT_COMMANDS = "/reset clears the history, /exit ends the chat"


class UsageError(Exception):
    """A mistake in how the command was called, found after argument parsing."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------- flag types
def number(kind, low, low_inclusive=True, high=None, what=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or hub repo id")
    parser.add_argument("--revision", help="hub branch, tag or commit (e.g. step10000-tokens41B)")


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


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --device and --quantize, as `load_model` reads them."""
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="weights' dtype in memory (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="quantise the weights at load time (int8: half the memory traffic)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="olmoe", description="Run, inspect and chat with OLMoE models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    chat = commands.add_parser("chat", help="chat interactively (or one turn per stdin line)")
    add_model_arguments(chat)
    chat.add_argument("--system", help="a system message that starts the conversation")
    _add_generation_arguments(chat, temperature=0.7)

    quantize = commands.add_parser(
        "quantize", help="write an int8 copy of a checkpoint (loads faster, decodes faster)"
    )
    add_model_arguments(quantize)
    quantize.add_argument("output", metavar="OUTPUT", help="directory for the int8 checkpoint")
    quantize.add_argument(
        "--method",
        choices=QUANTIZE_CHOICES,
        default="int8",
        help="weight-only int8, one scale per output channel (the default)",
    )
    quantize.add_argument("--max-shard-size", default="5GB", help="(default: %(default)s)")

    bench = commands.add_parser(
        "bench", help="compare olmoe with transformers and llama.cpp on this CPU", add_help=False
    )
    bench.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="bench/cpu_inference.py's options (--shape small, --json FILE, ...)",
    )

    info = commands.add_parser("info", help="describe a checkpoint without loading its weights")
    add_model_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands)
    return parser


# ---------------------------------------------------------------------------- commands
def load_model(args):
    """The model and tokenizer of MODEL (with --revision and `add_load_arguments`' flags), and
    the seconds loading took."""
    import torch

    from olmoe import OlmoeForCausalLM
    from olmoe.tokenizer import Tokenizer

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device!r} is not a torch device ({exc})") from None
    started = time.perf_counter()
    model = OlmoeForCausalLM.from_pretrained(
        args.model,
        revision=args.revision,
        dtype=DTYPES[args.dtype],
        device=device,
        quantize=args.quantize,
    )
    tokenizer = Tokenizer.from_pretrained(args.model, revision=args.revision)
    return model, tokenizer, time.perf_counter() - started


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


def run_quantize(args) -> int:
    from olmoe import OlmoeForCausalLM
    from olmoe.checkpoint import parse_size
    from olmoe.tokenizer import Tokenizer

    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UsageError(f"OUTPUT {output} exists and is not a directory")
    if output.is_dir() and output.resolve() == Path(args.model).expanduser().resolve():
        raise UsageError(
            "OUTPUT must differ from MODEL: quantising in place would lose the original"
        )
    parse_size(args.max_shard_size)  # a bad size fails before minutes of work
    model = OlmoeForCausalLM.from_pretrained(
        args.model, revision=args.revision, quantize=args.method
    )
    model.save_pretrained(output, max_shard_size=args.max_shard_size)
    Tokenizer.from_pretrained(args.model, revision=args.revision).save_pretrained(output)
    print(f"wrote {args.method} checkpoint to {output}", file=sys.stderr)
    return 0


def run_bench(bench_args: list[str]) -> int:
    """The benchmark lives beside the package in a source checkout (it drives peers that are no
    dependency of olmoe); run it in this interpreter with the arguments as given."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "bench" / "cpu_inference.py"
    if not script.is_file():
        raise UsageError(
            "olmoe bench runs bench/cpu_inference.py from a source checkout, which this "
            "installation lacks: clone the repository and pip install -e '.[bench]' there"
        )
    return subprocess.call([sys.executable, str(script), *bench_args])


def run_info(args) -> int:
    from olmoe.checkpoint import summarize_checkpoint

    summary = summarize_checkpoint(args.model, revision=args.revision)
    config = summary.config
    total, active = config.num_parameters(), config.num_parameters(active_only=True)
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(summary.directory),
                    "parameters": total,
                    "active_parameters": active,
                    "dtypes": list(summary.dtypes),
                    "files": summary.num_files,
                    "bytes": summary.total_bytes,
                    "config": config.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    print(f"checkpoint   {summary.directory}")
    print(
        f"parameters   {total:,} total, {active:,} active per token "
        f"({config.num_experts_per_tok} of {config.num_experts} experts)"
    )
    print(f"dtype        {', '.join(summary.dtypes)}")
    print(f"files        {summary.num_files} safetensors, {_size(summary.total_bytes)}")
    print("config")
    for key, value in sorted(config.to_dict().items()):
        print(f"  {key:<26} {json.dumps(value)}")
    return 0


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} B"
    for unit in ("KB", "MB", "GB", "TB"):
        nbytes /= 1000
        if nbytes < 1000 or unit == "TB":
            break
    return f"{nbytes:.2f} {unit}"


COMMANDS = {
    "generate": run_generate,
    "chat": run_chat,
    "quantize": run_quantize,
    "info": run_info,
}

# The commands of the larger parts live beside them: each module's `add_commands(commands)` adds
# its subparsers with `set_defaults(run=function)`, and imports torch only inside `function`, so
# that `olmoe --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "olmoe.data.command",
    "olmoe.serve.command",
    "olmoe.analysis.command",
    "olmoe.train.command",
    "olmoe.eval.command",
)


WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def wait_passively(command: str) -> None:
    """Re-execute `olmoe COMMAND ...` with OpenMP's passive wait policy, unless the user chose a
    policy or this process is not that command. Workers that spin while they wait fight whatever
    else runs on the machine for its cores (the server's HTTP thread, another job); libgomp reads
    the policy once, when torch loads it, hence a new process rather than a setting."""
    if WAIT_POLICY_ENV not in os.environ and sys.argv[1:2] == [command]:
        environment = {**os.environ, WAIT_POLICY_ENV: "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "olmoe", *sys.argv[1:]], environment)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench = argv[:1] == ["bench"]  # its options, --help included, belong to the bench script
    args = build_parser().parse_args(argv[:1] if bench else argv)
    try:
        if bench:
            return run_bench(argv[1:])
        from olmoe.memory import retain_freed_memory

        retain_freed_memory()  # one job per process: reuse freed blocks, no page faults anew
        return args.run(args) if "run" in args else COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `olmoe generate ... | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except (UsageError, ValueError, OSError) as exc:  # OSError covers missing files, the hub
        if os.environ.get("OLMOE_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, all of it
        print(f"olmoe {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
