"""`olmoe eval`: OLMES benchmarks, perplexity and bits per byte from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olmoe.cli.common import (
    add_load_arguments,
    add_model_arguments,
    load_model,
    number,
    wait_passively,
)
from olmoe.errors import UsageError
from olmoe.eval.chat_tasks import CHAT_TASKS
from olmoe.eval.generative_tasks import GENERATIVE_TASK_NAMES, is_generative_name, is_ifeval
from olmoe.eval.instruction_following import load_ifeval
from olmoe.eval.strategies import STRATEGIES
from olmoe.eval.tasks import BUILTIN_TASKS, MMLU, MMLU_SUBJECTS, PAPER_TASKS, is_task_file

# The names --tasks takes besides single tasks.
TASK_GROUPS = {"paper": PAPER_TASKS, "all": BUILTIN_TASKS, "generative": GENERATIVE_TASK_NAMES}
KNOWN_TASKS = (*BUILTIN_TASKS, *CHAT_TASKS, *GENERATIVE_TASK_NAMES)


def add_commands(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="OLMES benchmarks (MMLU, HellaSwag, ARC, ...), perplexity and bits per byte",
        description=(
            "Score MODEL on OLMES v0.1 multiple-choice tasks (both formats, the better one "
            "reported), and/or its perplexity and bits per byte over text or prepared tokens."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--tasks",
        help=f"comma-separated tasks: {', '.join(BUILTIN_TASKS)}, mmlu:<subject>, a task file "
        "(.yaml/.json), or the groups 'paper' (the model card's six) and 'all' (the multiple-"
        f"choice tasks); mmlu_chat (0-shot in the chat format, as OLMoE-Instruct was scored); "
        f"generative tasks: {', '.join(GENERATIVE_TASK_NAMES)}, or the group 'generative'; "
        "ifeval:FILE (instruction following, IFEval's input_data.jsonl format)",
    )
    parser.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        help="perplexity and bits per byte of text files or folders, each read and tokenised as "
        "`olmoe data prepare` does (a .jsonl file: one document per line)",
    )
    parser.add_argument(
        "--tokens",
        metavar="DIR",
        help="perplexity and bits per byte of a directory `olmoe data prepare` wrote",
    )
    parser.add_argument(
        "--split", default="valid", help="the --tokens split to score (default: %(default)s)"
    )
    parser.add_argument(
        "--limit",
        type=number(int, 1, what="an integer >= 1"),
        help="score only the first N questions of each task (of each subject for MMLU)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(int, 1, what="an integer >= 1"),
        default=8,
        help="rows per forward pass: questions for tasks, windows for perplexity "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=number(int, 2, what="an integer >= 2"),
        default=2048,
        help="tokens the model sees at once; OLMES uses 2048 (default: %(default)s)",
    )
    parser.add_argument(
        "--stride",
        type=number(int, 1, what="an integer >= 1"),
        help="perplexity window step (default: half of --max-length)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="packed",
        help="packed: a question's choices share one pass over its context (default); "
        "flat: one sequence per choice",
    )
    parser.add_argument("--output", metavar="FILE", help="write every metric as JSON to FILE")
    parser.add_argument(
        "--predictions", action="store_true", help="include per-question predictions in --output"
    )
    _add_generation_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_load_arguments(parser)
    parser.set_defaults(run=run_eval)
    bridge = commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with olmoe registered as its model 'olmoe'",
        add_help=False,
    )
    bridge.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        help="lm_eval's arguments: --model olmoe --model_args pretrained=DIR,dtype=fp32 "
        "--tasks ... (lm_eval --help lists them)",
    )
    bridge.set_defaults(run=run_lm_eval)


def _add_generation_arguments(parser) -> None:
    group = parser.add_argument_group(
        "generative tasks", "each task's reference settings unless overridden here"
    )
    group.add_argument(
        "--generations",
        metavar="FILE",
        help="append each problem's generations to FILE (JSON lines) as it finishes; a rerun "
        "with the same FILE skips the problems already there (resumes an interrupted run)",
    )
    group.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="prompt through the chat template (default: when the checkpoint ships a chat "
        "template of its own, not olmoe's built-in Tulu fallback)",
    )
    group.add_argument(
        "--max-new-tokens", type=number(int, 1, what="an integer >= 1"), help="tokens per answer"
    )
    group.add_argument(
        "--temperature",
        type=number(float, 0, what="a number >= 0"),
        help="sampling temperature; 0 is greedy (the tasks' default)",
    )
    group.add_argument(
        "--samples",
        type=number(int, 1, what="an integer >= 1"),
        help="answers per problem (pass@k for code up to k = samples; needs --temperature > 0)",
    )
    group.add_argument(
        "--stop",
        type=_stop_sequences,
        metavar="JSON",
        help="stop sequences as a JSON list of strings, e.g. '[\"\\n\\n\", \"Question:\"]' "
        "('[]': none)",
    )
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")


def _stop_sequences(text: str) -> tuple[str, ...]:
    # JSON, so that newlines and quotes need no shell tricks.
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise argparse.ArgumentTypeError(
            f"expected a JSON list of non-empty strings such as '[\"\\n\\n\"]', got {text!r}"
        )
    return tuple(value)


def expand_tasks(spec: str) -> list[str]:
    """The task names of a --tasks value, groups expanded, each checked before any loading."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for name in TASK_GROUPS.get(item, (item,)):
            if is_ifeval(name):
                # The file, and the checkers it needs (an optional extra), are checked now, not
                # after the model has loaded.
                load_ifeval(name)
            elif is_task_file(name):
                if not Path(name).expanduser().is_file():
                    raise UsageError(f"--tasks: no task file at {name}")
            elif name.startswith(f"{MMLU}:"):
                bad = [s for s in name.split(":", 1)[1].split("+") if s not in MMLU_SUBJECTS]
                if bad:
                    raise UsageError(f"--tasks: unknown MMLU subject(s) {', '.join(bad)}")
            elif name not in KNOWN_TASKS:
                raise UsageError(
                    f"--tasks: unknown task {name!r}; choose from {', '.join(KNOWN_TASKS)}, "
                    "mmlu:<subject>, paper, all, generative, ifeval:FILE, or a task file "
                    "(.yaml/.json)"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise UsageError("--tasks is empty: name at least one task")
    return names


def run_eval(args) -> int:
    if not (args.tasks or args.text or args.tokens):
        raise UsageError("nothing to do: pass --tasks, --text FILES or --tokens DIR")
    tasks = expand_tasks(args.tasks) if args.tasks else []
    for path in args.text or []:
        if not Path(path).exists():
            raise UsageError(f"--text: no file or folder at {path}")
    written = [path for path in (args.output, args.generations) if path]
    if written:
        from olmoe.fileio import check_writable

        for path in written:
            check_writable(path)
    if args.generations and not any(map(is_generative_name, tasks)):
        raise UsageError("--generations keeps generative tasks' answers: name one in --tasks")
    if (args.samples or 1) > 1 and not args.temperature:
        raise UsageError(
            f"--samples {args.samples} needs --temperature above 0: greedy decoding writes the "
            "same answer every time"
        )
    if args.stride is not None and args.stride >= args.max_length:
        raise UsageError(
            f"--stride must be below --max-length ({args.max_length}) so that each window keeps "
            f"some context; got {args.stride}"
        )
    # OpenMP workers that spin while they wait fight whatever else runs on the machine for its
    # cores (bench/eval_strategies.py --threads 2 shows it, with and without the policy set).
    wait_passively("eval")

    from olmoe.eval.evaluation import describe_model, evaluate, results_table

    model, tokenizer, _ = load_model(args)
    model.eval()
    info = {**describe_model(model, args.model, args.revision), "quantize": args.quantize}
    progress = not args.no_progress
    if tasks:
        results = evaluate(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            max_length=args.max_length,
            strategy=args.strategy,
            progress=progress,
            keep_predictions=args.predictions,
            model_info=info,
            generation=_generation_options(args, tasks, tokenizer),
        )
    else:
        results = {"format": "olmoe-eval/1", "model": info, "tasks": {}}
    perplexity = _perplexity(args, model, tokenizer, progress)
    if perplexity:
        results["perplexity"] = perplexity
    if tasks:
        print(results_table(results))
    for name, values in perplexity.items():
        bpb = values["bits_per_byte"]
        print(
            f"{name}: perplexity {values['perplexity']:.3f}, "
            f"{values['bits_per_token']:.4f} bits/token, "
            + (f"{bpb:.4f} bits/byte" if bpb is not None else "bits/byte unknown (no byte count)")
            + f" over {values['tokens']:,} tokens"
        )
    if args.output:
        from olmoe.fileio import write_atomic

        write_atomic(args.output, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_lm_eval(args) -> int:
    """lm-eval's own command line, in this process, after registering olmoe's model class (lm-eval
    0.4.13 reads no plugins: a bare `lm_eval --model olmoe` cannot find it)."""
    wait_passively("lm-eval")
    try:
        from olmoe.eval.lm_eval_bridge import main
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return main(args.lm_eval_args)


def _generation_options(args, tasks: list[str], tokenizer) -> dict | None:
    """evaluate_generative's options from the flags; None when no generative task is asked."""
    if not any(map(is_generative_name, tasks)):
        return None
    from olmoe.eval.generative import Overrides
    from olmoe.tokenizer import TULU_CHAT_TEMPLATE

    chat = args.chat
    if chat is None:
        # Every olmoe tokenizer has a template (Tulu's when the checkpoint ships none, and
        # olmoe saves it with every checkpoint, base models included): only another one marks
        # a chat model.
        chat = tokenizer.chat_template != TULU_CHAT_TEMPLATE
    how = "detected" if args.chat is None else "--chat" if chat else "--no-chat"
    kind = "chat" if chat else "base"
    print(f"olmoe eval: generative tasks prompted as a {kind} model ({how})", file=sys.stderr)
    overrides = Overrides(args.max_new_tokens, args.temperature, args.samples, args.stop)
    return {
        "chat": chat,
        "overrides": overrides,
        "seed": args.seed,
        "generations_file": args.generations,
    }


def _perplexity(args, model, tokenizer, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from olmoe.eval.perplexity import text_perplexity, token_perplexity

    if not (args.text or args.tokens):
        return {}
    options = {"max_length": args.max_length, "stride": args.stride, "batch_size": args.batch_size}
    out = {}
    with tqdm(unit="tok", desc="perplexity", disable=not progress) as bar:
        options["progress"] = bar.update
        for path in args.text or []:
            out[str(path)] = text_perplexity(model, tokenizer, path, **options).to_dict()
        if args.tokens:
            key = f"{args.tokens} ({args.split})"
            out[key] = token_perplexity(model, args.tokens, args.split, **options).to_dict()
    return out
