"""`olmoe <command>`: a thin command line over the library.

    olmoe generate MODEL "prompt"   stream a continuation to stdout
    olmoe chat MODEL                interactive chat (a terminal, or turns as lines on stdin)
    olmoe quantize MODEL OUTPUT     write an int8 or int4 copy of a checkpoint
    olmoe info MODEL                config, parameter counts, dtype and size of a checkpoint
    olmoe revisions MODEL           a run's intermediate checkpoints, a hub repo's branches
    olmoe bench [--shape small]     olmoe against transformers and llama.cpp on this CPU
    olmoe data prepare SRC --out D  tokenise text/JSONL/folders/stdlib into training token files
    olmoe serve MODEL               OpenAI-compatible HTTP server (streaming, batching)
    olmoe analyze STUDY MODEL       the paper's routing studies: saturation, coactivation, ...
    olmoe train CONFIG              train (configs/*.yaml; --resume DIR; torchrun for N processes)
    olmoe plot RUN_DIR              a training run's curves and expert-load heatmap as PNG
    olmoe upcycle DENSE OUT         a dense (OLMo) model's MLPs copied into experts
    olmoe ablate SUITE              train the paper's design variants, compare them
    olmoe eval MODEL --tasks paper  OLMES benchmarks (MMLU, HellaSwag, ARC, ...), perplexity, bpb
    olmoe lm-eval ARGS              lm-evaluation-harness with olmoe registered as --model olmoe

MODEL is a checkpoint directory or a hub repo id (`--revision` picks a branch, or one of a
training run's revisions). Mistakes a user can fix (an `olmoe.errors.OlmoeError`, or an OSError
such as a missing file) end with one line on stderr and exit status 1 (2 for bad flags); set
OLMOE_DEBUG=1 to see the traceback anyway. Any other exception is a bug in olmoe and keeps its
traceback.

Each command family has its module here (`generate`, `checkpoint`, `bench`, `data`, `serve`,
`analysis`, `train`, `design`, `eval`), whose `add_commands(commands)` adds its subparsers with
`set_defaults(run=function)`; `common` holds what they share. The library never imports this
package. torch is imported only inside the run functions, so that `olmoe --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from olmoe.errors import OlmoeError

# In the order `olmoe --help` lists their commands.
COMMAND_MODULES = (
    "olmoe.cli.generate",
    "olmoe.cli.checkpoint",
    "olmoe.cli.bench",
    "olmoe.cli.data",
    "olmoe.cli.serve",
    "olmoe.cli.analysis",
    "olmoe.cli.train",
    "olmoe.cli.design",
    "olmoe.cli.eval",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="olmoe", description="Run, inspect and chat with OLMoE models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"olmoe: note: {message}", file=sys.stderr)


# Commands whose options, --help included, all belong to the program they run: the attribute
# that gets them.
PASSTHROUGH = {"bench": "bench_args", "lm-eval": "lm_eval_args"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough = PASSTHROUGH.get(argv[0]) if argv else None
    args = build_parser().parse_args(argv[:1] if passthrough else argv)
    if passthrough:
        setattr(args, passthrough, argv[1:])
    bench = args.command == "bench"
    try:
        if not bench:  # the benchmark runs in an interpreter of its own
            from olmoe.memory import retain_freed_memory

            retain_freed_memory()  # one job per process: reuse freed blocks, no page faults anew
        with warnings.catch_warnings():  # the library's warnings as one line each
            warnings.showwarning = _print_warning
            return args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `olmoe generate ... | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except (OlmoeError, OSError) as exc:  # OSError covers missing files, the hub
        if os.environ.get("OLMOE_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, all of it
        print(f"olmoe {args.command}: error: {message}", file=sys.stderr)
        return 1
