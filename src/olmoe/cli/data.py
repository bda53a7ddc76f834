"""`olmoe data prepare` and `olmoe data info`.

Imports numpy, tokenizers and torch only inside the commands, so `olmoe --help` stays fast.
"""

from __future__ import annotations

import argparse
import json

from olmoe.cli.common import number


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="prepare and inspect training token files")
    actions = data.add_subparsers(
        dest="data_command", metavar="{prepare,info}", required=True, parser_class=type(data)
    )

    prepare = actions.add_parser(
        "prepare",
        help="tokenise text into OLMo-style token files (train.npy, valid.npy, metadata.json)",
        description=(
            "Tokenise SOURCES into DIR/train.npy and DIR/valid.npy (uint16 ids, uint32 for "
            "vocabularies over 65,536; eos after every document) and DIR/metadata.json. A source "
            "is a text file, a .jsonl/.jsonl.gz file with a 'text' field per line (Dolma), a "
            "folder (recursively), or stdlib, stdlib-code or stdlib-docstrings (this Python's "
            "standard library: code with docstrings, code alone, docstrings alone). Empty, "
            "binary and unreadable inputs are skipped and counted."
        ),
    )
    prepare.add_argument("sources", metavar="SOURCE", nargs="+", help="file, folder or stdlib*")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output directory")
    prepare.add_argument(
        "--tokenizer",
        metavar="PATH_OR_REPO",
        help="checkpoint directory or hub repo whose tokenizer to use (default: OLMoE's, the "
        "OLMo GPT-NeoX tokenizer)",
    )
    prepare.add_argument(
        "--valid-fraction",
        type=_fraction,
        default=0.01,
        metavar="F",
        help="share of the documents held out for validation (default: %(default)s)",
    )
    prepare.add_argument(
        "--valid-min-tokens",
        type=number(int, 0, what="an integer >= 0"),
        default=100_000,
        metavar="N",
        help="a small corpus's validation split gets at least this many tokens, from at most "
        "half its documents (default: %(default)s)",
    )
    prepare.add_argument(
        "--seed",
        type=number(int, 0, what="an integer >= 0"),
        default=0,
        metavar="N",
        help="seed of the validation split's draws (default: 0)",
    )
    prepare.add_argument("--force", action="store_true", help="replace an existing DIR")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(run=run_prepare)

    info = actions.add_parser(
        "info", help="counts and provenance of a prepared directory, or a token file's length"
    )
    info.add_argument("path", metavar="PATH", help="prepared directory or token file")
    info.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        help="ids' type in a headerless OLMo token file (default: uint16)",
    )
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info.set_defaults(run=run_info)


def _fraction(text: str) -> float:
    value = number(float, 0.0, what="a number in [0, 1)")(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def run_prepare(args) -> int:
    from olmoe.data.prepare import prepare

    summary = prepare(
        args.sources,
        args.out,
        tokenizer=args.tokenizer,
        valid_fraction=args.valid_fraction,
        valid_min_tokens=args.valid_min_tokens,
        seed=args.seed,
        force=args.force,
        progress=False if args.quiet else None,
    )
    print(summary.format())
    return 0


def run_info(args) -> int:
    from pathlib import Path

    from olmoe.data.tokens import SPLITS, load_tokens, read_metadata

    path = Path(args.path).expanduser()
    if path.is_dir():
        metadata = read_metadata(path)
        if args.json:
            print(json.dumps(metadata, indent=2))
            return 0
        print(f"directory    {path}")
        print(f"tokenizer    {metadata['tokenizer']} (eos {metadata['eos_token_id']}, "
              f"vocabulary {metadata['vocab_size']:,}, {metadata['dtype']})")  # fmt: skip
        for name in SPLITS:
            split = metadata["splits"][name]
            print(f"{name:<12} {split['documents']:,} documents, {split['tokens']:,} tokens, "
                  f"{metadata['bytes'][name]:,} bytes of text")  # fmt: skip
        for source in metadata["sources"]:
            skipped = ", ".join(f"{n} {r}" for r, n in source["skipped"].items()) or "none"
            print(f"source       {source['source']} ({source['path']}): "
                  f"{source['documents']:,} documents, skipped: {skipped}")  # fmt: skip
        return 0
    tokens = load_tokens(path, dtype=args.dtype)
    if args.json:
        print(json.dumps({"path": str(path), "dtype": tokens.dtype.name, "tokens": len(tokens)}))
    else:
        print(f"{path}: {len(tokens):,} {tokens.dtype.name} tokens")
    return 0
