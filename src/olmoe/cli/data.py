"""`olmoe data prepare`, `olmoe data chat` and `olmoe data info`.

Imports numpy, tokenizers and torch only inside the commands, so `olmoe --help` stays fast.
"""

from __future__ import annotations

import argparse
import json

from olmoe.cli.common import number


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="prepare and inspect training data")
    actions = data.add_subparsers(
        dest="data_command", metavar="{prepare,chat,info}", required=True, parser_class=type(data)
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
    _add_chat_command(actions)

    info = actions.add_parser(
        "info", help="counts and provenance of a prepared directory, or a token file's length"
    )
    info.add_argument(
        "path", metavar="PATH", help="prepared directory (tokens or chat) or token file"
    )
    info.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        help="ids' type in a headerless OLMo token file (default: uint16)",
    )
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info.set_defaults(run=run_info)


def _add_chat_command(actions) -> None:
    chat = actions.add_parser(
        "chat",
        help="encode chat or preference data (sft, dpo, kto) for fine-tuning",
        description=(
            "Render every record of SOURCE (a .jsonl, .json or .parquet file, or a Hugging Face "
            "save_to_disk directory) with the tokenizer's chat template and write its tokens and "
            "loss masks to DIR, for `olmoe train` with objective sft, dpo or kto (data.path: DIR). "
            "A record's keys give its kind: messages, or prompt + completion (sft); prompt + "
            "chosen + rejected (dpo); prompt + completion + label (kto). Only the assistant's "
            "content and its closing end-of-text token are trained on; sequences are cut to "
            "--max-length tokens, and an example left with nothing to train on is dropped and "
            "counted."
        ),
    )
    chat.add_argument("source", metavar="SOURCE", help="data file or save_to_disk directory")
    chat.add_argument("--out", required=True, metavar="DIR", help="output directory")
    chat.add_argument(
        "--tokenizer",
        metavar="PATH_OR_REPO",
        help="checkpoint directory or hub repo whose tokenizer and chat template to use; the "
        "model you will fine-tune (default: the OLMo tokenizer with the Tulu template)",
    )
    chat.add_argument(
        "--max-length",
        type=number(int, 2, what="an integer >= 2"),
        default=4096,
        metavar="N",
        help="tokens per sequence, at most (default: %(default)s)",
    )
    chat.add_argument("--force", action="store_true", help="replace an existing prepared DIR")
    chat.add_argument("--quiet", action="store_true", help="no progress bar")
    chat.set_defaults(run=run_chat)


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


def run_chat(args) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from olmoe.data.chat import prepare_chat
    from olmoe.tokenizer import Tokenizer

    source, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    # Both checked before the tokenizer loads (perhaps from the hub) and any record is read.
    if not source.exists():
        raise FileNotFoundError(f"no such file or directory: {source}")
    _check_chat_output(out, args.force)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    bar = tqdm(
        desc="encoding", unit=" records", disable=True if args.quiet else None, dynamic_ncols=True
    )
    with bar:
        summary = prepare_chat(
            source, tokenizer, out, args.max_length, force=args.force, progress=bar.update
        )
    print(f"{chat_summary(summary.metadata)}; wrote {out} in {summary.seconds:.1f} s")
    return 0


def _check_chat_output(out, force: bool) -> None:
    """An existing DIR is replaced only with --force, and only when it is a prepared chat
    directory or empty: --force deletes it, so a mistyped --out must not cost a folder."""
    from olmoe.data.chat import FORMAT, METADATA_FILE
    from olmoe.errors import InputError

    if not out.exists():
        return
    if not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    if out.is_dir() and not any(out.iterdir()):
        return
    if _metadata(out / METADATA_FILE).get("format") != FORMAT:
        raise InputError(
            f"{out} exists and is not a directory `olmoe data chat` wrote, so --force will not "
            "replace it: choose another --out"
        )


def _metadata(path) -> dict:
    """A metadata.json's contents, or {} when there is none or it is not a JSON object."""
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def chat_summary(metadata: dict) -> str:
    """One line: the kind, examples, tokens, trained tokens, truncated and dropped counts."""
    kind, examples = metadata["kind"], metadata["examples"]
    sequences = examples * 2 if kind == "dpo" else examples
    parts = [
        f"{kind}: {examples:,} examples"
        + (f" ({metadata['desirable']:,} desirable)" if kind == "kto" else ""),
        f"{metadata['tokens']:,} tokens",
        f"{metadata['trained_tokens']:,} trained",
        f"{metadata['truncated']:,} of {sequences:,} sequences cut to {metadata['max_length']:,}",
        f"{metadata['dropped_no_assistant_tokens']:,} dropped with no assistant token",
    ]
    return ", ".join(parts)


def run_info(args) -> int:
    from pathlib import Path

    from olmoe.data.chat import FORMAT as CHAT_FORMAT
    from olmoe.data.tokens import SPLITS, load_tokens, read_metadata

    path = Path(args.path).expanduser()
    if path.is_dir() and _metadata(path / "metadata.json").get("format") == CHAT_FORMAT:
        return _chat_info(path, args.json)
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


def _chat_info(path, as_json: bool) -> int:
    from olmoe.data.chat import METADATA_FILE

    metadata = _metadata(path / METADATA_FILE)
    if as_json:
        print(json.dumps(metadata, indent=2))
        return 0
    print(f"directory    {path}")
    print(f"source       {metadata['source']} ({metadata['records']:,} records)")
    print(f"vocabulary   {metadata['vocab_size']:,} (eos {metadata['eos_token_id']})")
    print(chat_summary(metadata))
    return 0
