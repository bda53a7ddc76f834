"""`olmoe upcycle DENSE OUT` and `olmoe ablate SUITE`: the OLMoE paper's design experiments."""

from __future__ import annotations

import sys
from pathlib import Path

from olmoe.cli.common import add_model_arguments, number
from olmoe.errors import UsageError


def add_commands(commands) -> None:
    upcycle = commands.add_parser(
        "upcycle",
        usage="olmoe upcycle DENSE OUT --experts E --top-k K [options]",
        help="turn a dense model (OLMo) into an MoE whose experts start as copies of its MLP",
        description=(
            "Sparse upcycling as the OLMoE paper did it: every expert a copy of the dense MLP, "
            "a new router drawn from N(0, 0.02). OUT is a checkpoint that `olmoe train` "
            "continues from (model.init_from)."
        ),
    )
    add_model_arguments(upcycle)  # MODEL: the dense checkpoint
    upcycle.add_argument("output", metavar="OUT", help="directory for the MoE checkpoint")
    positive = number(int, 1, what="a positive integer")
    upcycle.add_argument("--experts", type=positive, required=True, help="experts per MoE layer")
    upcycle.add_argument("--top-k", type=positive, required=True, help="experts per token")
    upcycle.add_argument(
        "--noise",
        type=number(float, 0.0, high=1.0, what="a fraction in [0, 1]"),
        default=0.0,
        metavar="FRACTION",
        help="replace this fraction of the copied expert weights with N(0, 0.02) noise "
        "(the paper tried 0.5; default: %(default)s)",
    )
    upcycle.add_argument(
        "--shared-expert", action="store_true", help="also copy the MLP into a shared expert"
    )
    upcycle.add_argument(
        "--dense-every",
        type=number(int, 0, what="a layer interval >= 0"),
        default=0,
        metavar="N",
        help="keep every N-th layer dense (default: every layer gets experts)",
    )
    upcycle.add_argument(
        "--norm-topk-prob",
        action="store_true",
        help="renormalise the top-k weights (then, without noise or a shared expert, the "
        "upcycled model computes exactly what the dense one does)",
    )
    upcycle.add_argument("--seed", type=int, default=0, help="router and noise seed")
    upcycle.set_defaults(run=run_upcycle)

    ablate = commands.add_parser(
        "ablate",
        help="train a suite of design variants and compare them (configs/ablations/*.yaml)",
        description=(
            "Train every variant of SUITE on the same data order and seed (finished ones are "
            "skipped, interrupted ones resumed), then write OUT_DIR/comparison.md, .json and "
            ".png. docs/ablations.md describes the suites and what they measured."
        ),
    )
    ablate.add_argument("suite", metavar="SUITE", help="a suite file (configs/ablations/*.yaml)")
    ablate.add_argument("--out-dir", metavar="DIR", help="instead of the suite's out_dir")
    ablate.add_argument(
        "--nproc-per-node",
        type=positive,
        default=1,
        metavar="N",
        help="train each variant under torchrun with N processes (default: in this process)",
    )
    ablate.add_argument(
        "--dry-run",
        action="store_true",
        help="write each variant's config and print the commands that train it (for a "
        "cluster); run `olmoe ablate SUITE` afterwards to compare",
    )
    ablate.set_defaults(run=run_ablate)


def run_upcycle(args) -> int:
    from olmoe import OlmoeForCausalLM
    from olmoe.tokenizer import Tokenizer
    from olmoe.upcycle import upcycle

    output = Path(args.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"OUT {output} exists and is not an empty directory: choose a new one")
    dense = OlmoeForCausalLM.from_pretrained(args.model, revision=args.revision)
    model = upcycle(
        dense,
        args.experts,
        args.top_k,
        noise=args.noise,
        shared_expert=args.shared_expert,
        dense_every=args.dense_every,
        norm_topk_prob=args.norm_topk_prob,
        seed=args.seed,
    )
    model.save_pretrained(output)
    # A checkpoint without tokenizer files gets OLMo's, as every command reads it.
    Tokenizer.from_pretrained(args.model, revision=args.revision).save_pretrained(output)
    config = model.config
    print(
        f"wrote {output}: {config.num_parameters():,} parameters, "
        f"{config.num_parameters(active_only=True):,} active per token "
        f"({config.num_experts_per_tok} of {config.num_experts} experts)",
        file=sys.stderr,
    )
    return 0


def run_ablate(args) -> int:
    from olmoe.train.ablate import dry_run_commands, load_suite, run_suite

    suite = load_suite(args.suite, args.out_dir)
    if args.dry_run:
        print("\n".join(dry_run_commands(suite, args.nproc_per_node)))
        return 0
    paths = run_suite(suite, args.nproc_per_node, log=lambda line: print(line, file=sys.stderr))
    for path in paths:
        print(path)
    return 0
