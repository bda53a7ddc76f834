"""`olmoe train` and `olmoe plot` (torch is imported inside the commands, so `olmoe --help` stays
fast)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from olmoe.errors import UsageError


def add_commands(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train an OLMoE model from a YAML config (torchrun for several processes)",
        usage="olmoe train [CONFIG] [--resume DIR] [--section.key=value ...]",
        description=(
            "Train as CONFIG says; --section.key=value overrides any setting (e.g. "
            "--train.max_steps=200 --optim.lr=1e-3; configs/*.yaml show the keys). --resume DIR "
            "continues a run (its newest checkpoint, or a checkpoint directory) exactly where "
            "it stopped; without CONFIG it reuses the run's config.yaml. Data-parallel: "
            "torchrun --nproc_per_node N -m olmoe train CONFIG."
        ),
    )
    train.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (configs/*.yaml)")
    train.add_argument("--resume", metavar="DIR", help="run or checkpoint directory to continue")
    _keep_unknown_flags_as_overrides(train)
    train.set_defaults(run=run_train)

    plot = commands.add_parser(
        "plot", help="draw a training run's curves and expert-load heatmap to PNG"
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holds log.jsonl)")
    plot.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR)")
    plot.set_defaults(run=run_plot)


def run_train(args) -> int:
    from olmoe.train.config import load_config
    from olmoe.train.trainer import RUN_CONFIG_NAME, train

    resume, config_path = args.resume, args.config
    if config_path is None:
        if resume is None:
            raise UsageError("pass a CONFIG (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
        config_path = _saved_config(Path(resume), RUN_CONFIG_NAME)
    config = load_config(config_path, args.overrides)
    result = train(config, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"trained {result.step} steps, {result.tokens:,} tokens; model saved to {result.run_dir}")
    if result.val_loss is not None:
        line = f"validation loss {result.val_loss:.4f} nats/token"
        if result.unigram_loss is not None:
            line += f" (unigram baseline {result.unigram_loss:.4f})"
        print(line)
    if result.sample is not None:
        print(f"sample: {config.eval.sample_prompt}{result.sample}")
    return 0


def _keep_unknown_flags_as_overrides(parser: argparse.ArgumentParser) -> None:
    """argparse cannot declare `--section.key=value` for every setting: this parser keeps the
    flags it does not know in `args.overrides` (load_config checks them) instead of failing."""
    parse_known_args = parser.parse_known_args

    def keep(args=None, namespace=None):
        namespace, unknown = parse_known_args(args, namespace)
        namespace.overrides = [*getattr(namespace, "overrides", []), *unknown]
        return namespace, []

    parser.parse_known_args = keep


def _saved_config(resume: Path, name: str) -> Path:
    """The config.yaml of the run that `resume` (a run or one of its checkpoints) belongs to."""
    for candidate in (resume, resume.parent.parent):
        if (candidate / name).is_file():
            return candidate / name
    raise FileNotFoundError(f"no {name} in {resume} or its run directory: pass CONFIG as well")


def run_plot(args) -> int:
    from olmoe.train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
