"""`olmoe analyze STUDY MODEL`: the OLMoE paper's routing studies from the command line."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from olmoe.cli.common import add_load_arguments, add_model_arguments, load_model, number
from olmoe.errors import UsageError

STUDIES = {
    "saturation": "how much of MODEL's routing already matches a later checkpoint (--against), "
    "at one revision or over several (--revisions)",
    "coactivation": "how often pairs of experts are chosen for the same token",
    "domains": "each expert's share of the routing per corpus (--data NAME=SOURCE ...)",
    "vocabulary": "how consistently each token id goes to one expert",
    "load": "tokens per expert, max/mean load and routing entropy per layer",
}
DEFAULT_MAX_TOKENS = 200_000  # per corpus: the paper's domain study used up to ~200k tokens


def add_commands(commands) -> None:
    analyze = commands.add_parser(
        "analyze", help="the OLMoE paper's routing studies: numbers (JSON, CSV) and PNG plots"
    )
    studies = analyze.add_subparsers(dest="study", required=True, parser_class=type(analyze))
    for study, help_text in STUDIES.items():
        parser = studies.add_parser(study, help=help_text, description=help_text)
        add_model_arguments(parser)
        _add_common_arguments(parser, study)
        parser.set_defaults(run=run_analyze, revisions=None)
    studies.choices["saturation"].add_argument(
        "--against",
        required=True,
        metavar="FINAL",
        help="the later checkpoint (directory or repo id) to compare MODEL's routing with",
    )
    studies.choices["saturation"].add_argument(
        "--against-revision", help="revision of FINAL (e.g. main)"
    )
    studies.choices["saturation"].add_argument(
        "--revisions",
        type=_name_list,
        metavar="R1,R2,...",
        help="trace saturation over training: compare each of these revisions of MODEL, in "
        "training order, with FINAL (e.g. step5000-tokens20B,step120000-tokens503B); writes "
        "saturation_series.json, .csv and .png",
    )
    studies.choices["coactivation"].add_argument(
        "--top-experts",
        type=number(int, 2, what="an integer >= 2"),
        default=32,
        help="most used experts shown in the heatmap (default: %(default)s)",
    )
    studies.choices["vocabulary"].add_argument(
        "--min-count",
        type=number(int, 1, what="an integer >= 1"),
        default=10,
        help="token ids seen fewer times are left out (default: %(default)s)",
    )


def _add_common_arguments(parser: argparse.ArgumentParser, study: str) -> None:
    parser.add_argument(
        "--data",
        action="append",
        metavar="[NAME=]SOURCE",
        help="a corpus (repeatable): a text/JSONL file or folder, stdlib, stdlib-code, "
        "stdlib-docstrings, a prepared token directory (its validation split) or a .npy token "
        "file (default: code=stdlib-code and docstrings=stdlib-docstrings)"
        + ("" if study == "domains" else "; several corpora are pooled"),
    )
    parser.add_argument(
        "--max-tokens",
        type=number(int, 1, what="an integer >= 1"),
        default=DEFAULT_MAX_TOKENS,
        help="tokens read per corpus (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-length",
        type=number(int, 2, what="an integer >= 2"),
        help="tokens per forward pass, each chunk its own sequence (default: 2048, at most "
        "the model's context)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(int, 1, what="an integer >= 1"),
        default=1,
        help="chunks per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--layers",
        type=_layer_list,
        help="comma-separated layers to plot/report in detail (default: first, middle, last)",
    )
    parser.add_argument(
        "--out", type=Path, help="directory for the results (default: analysis/STUDY)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_load_arguments(parser)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 0,7,15, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct revisions like step1-tokens0B,step2-tokens0B, got {text!r}"
        )
    return names


def run_analyze(args) -> int:
    from olmoe.analysis import Corpus, collect_corpora, studies
    from olmoe.fileio import check_writable, move_into_directory, staging_directory

    corpora = [Corpus.parse(spec) for spec in args.data] if args.data else None
    for corpus in corpora or ():
        corpus.check()
    out = args.out or Path("analysis") / args.study
    check_writable(out)
    if args.revisions:
        if args.revision is not None:
            raise UsageError("--revision and --revisions both pick MODEL's revisions: pass one")
        args.revision = args.revisions[0]
    model, tokenizer, _ = load_model(args)
    context = model.config.max_position_embeddings
    chunk_length = args.chunk_length or min(2048, context)
    if chunk_length > context:
        raise UsageError(f"--chunk-length {chunk_length} exceeds the model's context of {context}")
    collect = {
        "max_tokens": args.max_tokens,
        "chunk_length": chunk_length,
        "batch_size": args.batch_size,
        "progress": not args.quiet,
        "pool": args.study != "domains",
        "keep_trace": args.study == "saturation",
        "vocabulary": args.study == "vocabulary",
    }
    counts = collect_corpora(model, tokenizer, corpora, **collect)
    if args.study == "saturation":
        del model  # two released-size models do not fit in memory together
        counts = _saturation_counts(args, counts["all"], tokenizer, corpora, collect)

    if args.revisions:
        early = {name: counts[name] for name in args.revisions}
        report = studies.saturation_series_report(early, counts["final"])
    elif args.study == "saturation":
        report = studies.saturation_report(counts["early"], counts["final"])
    elif args.study == "coactivation":
        report = studies.coactivation_report(counts["all"], args.layers, args.top_experts)
    elif args.study == "domains":
        report = studies.domains_report(counts)
    elif args.study == "vocabulary":
        report = studies.vocabulary_report(counts["all"], tokenizer, args.layers, args.min_count)
    else:
        report = studies.load_report(counts["all"])
    # Staged, then moved in together: a write that fails (a full disk) leaves the last run's
    # files as they were, not some of them replaced.
    with staging_directory(out) as staging:
        for name, value in counts.items():
            value.save(staging / f"counts-{name}.npz")
        written = studies.write_report(report, staging, args.layers)
        move_into_directory(staging, out)
    print(studies.summary(report))
    print(f"wrote {len(written) + len(counts)} files to {out}", file=sys.stderr)
    return 0


def _saturation_counts(args, first, tokenizer, corpora, collect) -> dict:
    """The routing of MODEL (`first`: at --revision, or the first of --revisions) and then of
    its other --revisions and of FINAL on the same tokens, one model in memory at a time."""
    from olmoe.analysis import collect_corpora

    names = args.revisions or ["early"]
    counts = {names[0]: first}
    for revision in names[1:]:
        gc.collect()
        args.revision = revision
        model, _, _ = load_model(args)
        counts[revision] = collect_corpora(model, tokenizer, corpora, **collect)["all"]
        del model
    gc.collect()
    args.model, args.revision = args.against, args.against_revision
    final, _, _ = load_model(args)
    counts["final"] = collect_corpora(final, tokenizer, corpora, **collect)["all"]
    return counts
