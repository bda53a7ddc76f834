"""`olmoe quantize MODEL OUTPUT`, `olmoe info MODEL` and `olmoe revisions MODEL`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from olmoe.cli.common import add_model_arguments
from olmoe.errors import UsageError
from olmoe.formats import QUANTIZE_CHOICES


def add_commands(commands) -> None:
    quantize = commands.add_parser(
        "quantize",
        help="write an int8 or int4 copy of a checkpoint (loads faster, decodes faster)",
    )
    add_model_arguments(quantize)
    quantize.add_argument("output", metavar="OUTPUT", help="directory for the quantised checkpoint")
    how = quantize.add_mutually_exclusive_group()
    how.add_argument(
        "--method",
        choices=QUANTIZE_CHOICES,
        help="int8: one scale per output channel (the default); int4: one float16 scale per "
        "group of 32 inputs, about 0.3x the bytes of bf16",
    )
    how.add_argument("--bits", type=int, choices=(8, 4), help="8 (int8) or 4 (int4)")
    quantize.add_argument("--max-shard-size", default="5GB", help="(default: %(default)s)")
    quantize.set_defaults(run=run_quantize)

    info = commands.add_parser("info", help="describe a checkpoint without loading its weights")
    add_model_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=run_info)

    revisions = commands.add_parser(
        "revisions",
        help="list the intermediate checkpoints of a training run or the branches of a hub repo",
    )
    revisions.add_argument("model", metavar="MODEL", help="run directory or hub repo id")
    revisions.add_argument("--json", action="store_true", help="print one JSON list")
    revisions.set_defaults(run=run_revisions)


def run_quantize(args) -> int:
    from olmoe import OlmoeForCausalLM
    from olmoe.checkpoint import parse_size, save_pretrained
    from olmoe.fileio import check_writable
    from olmoe.tokenizer import Tokenizer

    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UsageError(f"OUTPUT {output} exists and is not a directory")
    if output.is_dir() and output.resolve() == Path(args.model).expanduser().resolve():
        raise UsageError(
            "OUTPUT must differ from MODEL: quantising in place would lose the original"
        )
    parse_size(args.max_shard_size)  # a bad size fails before minutes of work
    check_writable(output)  # and so does a read-only OUTPUT
    method = args.method or f"int{args.bits or 8}"
    model = OlmoeForCausalLM.from_pretrained(args.model, revision=args.revision, quantize=method)
    tokenizer = Tokenizer.from_pretrained(args.model, revision=args.revision)
    # One save for both: a full disk must not leave weights without their tokenizer.
    save_pretrained(model, output, max_shard_size=args.max_shard_size, tokenizer=tokenizer)
    print(f"wrote {method} checkpoint to {output}", file=sys.stderr)
    return 0


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
    experts = (
        f"{config.num_experts_per_tok} of {config.num_experts} experts"
        if config.moe_layer_indices
        else "dense: no experts"
    )
    print(f"parameters   {total:,} total, {active:,} active per token ({experts})")
    print(f"dtype        {', '.join(summary.dtypes)}")
    print(f"files        {summary.num_files} safetensors, {_size(summary.total_bytes)}")
    print("config")
    for key, value in sorted(config.to_dict().items()):
        print(f"  {key:<26} {json.dumps(value)}")
    return 0


def run_revisions(args) -> int:
    from dataclasses import asdict

    from olmoe.revisions import list_revisions

    found = list_revisions(args.model)
    if not found:
        print(
            f"{args.model} has no revisions: checkpoint.revisions_every keeps them", file=sys.stderr
        )
    if args.json:
        print(json.dumps([asdict(revision) for revision in found], indent=2))
        return 0
    width = max([len("revision"), *(len(r.name) for r in found)])
    print(f"{'revision':<{width}}  {'step':>9}  {'tokens':>7}  {'size':>9}")
    for r in found:
        step = "" if r.step is None else f"{r.step:,}"
        tokens = "" if r.tokens_billions is None else f"{r.tokens_billions:,}B"
        size = "" if r.size is None else _size(r.size)
        print(f"{r.name:<{width}}  {step:>9}  {tokens:>7}  {size:>9}".rstrip())
    return 0


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} B"
    for unit in ("KB", "MB", "GB", "TB"):
        nbytes /= 1000
        if nbytes < 1000 or unit == "TB":
            break
    return f"{nbytes:.2f} {unit}"
