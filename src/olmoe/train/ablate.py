"""`olmoe ablate SUITE.yaml`: train named variants of one training config on the same data order
and seed, then compare them in one table and one figure.

A suite file:

    name: load-balancing loss
    paper: without it, early layers collapse onto a few experts and the others die
    base: base.yaml                  # a training config, relative to this file
    out_dir: runs/ablations/lb-loss  # each variant trains in OUT_DIR/NAME
    overrides: {train.max_steps: 300}          # for every variant (optional)
    variants:
      lb: {}                                   # the base as it is
      no-lb: {loss.lb_coef: 0.0}               # dotted keys, as `olmoe train --key=value`
      upcycled:                                # start from another variant, upcycled
        upcycle: {from: dense, experts: 8, top_k: 2}

Variants train in the order listed. A finished variant (its final model exported, its last
step logged, its config.yaml the variant's) is skipped; an interrupted one resumes from its
newest checkpoint; a run directory trained under another config is an error, never
overwritten. The comparison goes to OUT_DIR/comparison.{md,json,png}.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from olmoe.errors import ConfigError
from olmoe.fileio import atomic_path, write_atomic
from olmoe.train import state
from olmoe.train.config import TrainConfig, load_config, read_yaml_mapping
from olmoe.train.plot import read_log
from olmoe.train.trainer import LOG_NAME, RUN_CONFIG_NAME

COMPARISON_NAME = "comparison"
UPCYCLE_KEYS = {"from", "experts", "top_k", "noise", "shared_expert", "dense_every",
                "norm_topk_prob"}  # fmt: skip
# The statistics of a run's end: its last tenth of steps (at least one).
TAIL_FRACTION = 0.1


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    upcycle: dict[str, Any] | None = None


@dataclass
class Suite:
    path: Path
    name: str
    base: Path
    out_dir: Path
    variants: list[Variant]
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: str = ""

    def run_dir(self, variant: Variant) -> Path:
        return self.out_dir / variant.name

    def config(self, variant: Variant) -> TrainConfig:
        """The variant's training config: the base, the suite's overrides, the variant's."""
        merged = {**self.overrides, **variant.overrides}
        args = [f"--{key}={json.dumps(value)}" for key, value in merged.items()]
        try:
            config = load_config(self.base, args)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: variant {variant.name}: {exc}") from None
        config.run_dir = str(self.run_dir(variant))
        if variant.upcycle is not None:
            config.model.init_from = str(self.upcycled_init(variant))
        return config

    def upcycled_init(self, variant: Variant) -> Path:
        return self.run_dir(variant) / "upcycled-init"


def load_suite(path: str | os.PathLike, out_dir: str | None = None) -> Suite:
    """Read and check a suite file (every variant's config validated before anything runs)."""
    path = Path(path)
    data = read_yaml_mapping(path, "suite", "name, base, out_dir and variants")
    unknown = set(data) - {"name", "paper", "base", "out_dir", "overrides", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    for key in ("base", "variants"):
        if not data.get(key):
            raise ConfigError(f"{path} needs `{key}`")
    variants = data["variants"]
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: variants must map each name to its overrides")
    suite = Suite(
        path=path,
        name=str(data.get("name", path.stem)),
        base=path.parent / data["base"],
        out_dir=Path(out_dir or data.get("out_dir") or Path("runs/ablations") / path.stem),
        variants=[_variant(path, name, spec) for name, spec in variants.items()],
        overrides=_mapping(path, "overrides", data.get("overrides")),
        paper=str(data.get("paper", "")),
    )
    names = [v.name for v in suite.variants]
    for position, variant in enumerate(suite.variants):
        if variant.upcycle is not None and variant.upcycle["from"] not in names[:position]:
            raise ConfigError(
                f"{path}: variant {variant.name} upcycles {variant.upcycle['from']!r}, which "
                "must be a variant listed before it"
            )
        suite.config(variant)  # a bad override fails now
    return suite


def _mapping(path: Path, where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping of dotted keys to values")
    return dict(value)


def _variant(path: Path, name: Any, spec: Any) -> Variant:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{path}: variant name {name!r} must be a plain directory name")
    overrides = _mapping(path, f"variant {name}", spec)
    upcycle = overrides.pop("upcycle", None)
    if upcycle is not None:
        if (
            not isinstance(upcycle, dict)
            or "from" not in upcycle
            or not set(upcycle) <= UPCYCLE_KEYS
        ):
            raise ConfigError(
                f"{path}: variant {name}: upcycle takes from (a variant), experts, top_k and "
                f"optionally noise, shared_expert, dense_every, norm_topk_prob; got {upcycle!r}"
            )
    return Variant(name, overrides, upcycle)


# ---------------------------------------------------------------------------- running
def run_suite(
    suite: Suite, nproc_per_node: int = 1, log: Callable[[str], None] = print
) -> list[Path]:
    """Train every variant that is not finished, then write the comparison; returns its
    files. `nproc_per_node` > 1 runs each variant's training under torchrun."""
    for variant in suite.variants:
        config = suite.config(variant)
        status = variant_status(suite, variant, config)
        if status == "finished":
            log(f"{variant.name}: finished, skipped")
            continue
        if (
            variant.upcycle is not None
            and not (suite.upcycled_init(variant) / "config.json").exists()
        ):
            log(f"{variant.name}: upcycling {variant.upcycle['from']}")
            make_upcycled_init(suite, variant)
        resume = suite.run_dir(variant) if status == "interrupted" else None
        log(f"{variant.name}: {'resuming' if resume else 'training'} in {suite.run_dir(variant)}")
        if nproc_per_node > 1:
            _train_under_torchrun(suite, variant, config, nproc_per_node, resume)
        else:
            from olmoe.train.trainer import train

            train(config, resume=resume, progress=None)
    return write_comparison(suite)


def variant_status(suite: Suite, variant: Variant, config: TrainConfig) -> str:
    """ "new", "interrupted" (has a checkpoint to resume) or "finished"; a run directory
    trained under another config raises ConfigError."""
    run_dir = suite.run_dir(variant)
    saved = run_dir / RUN_CONFIG_NAME
    if not saved.is_file():
        return "new"
    if yaml.safe_load(saved.read_text()) != config.to_dict():
        raise ConfigError(
            f"{run_dir} was trained under another config than variant {variant.name} of "
            f"{suite.path} now gives: move or delete it to train the variant again"
        )
    if _finished(run_dir, config):
        return "finished"
    try:
        state.find_checkpoint(run_dir)
    except FileNotFoundError:
        return "new"
    return "interrupted"


def _finished(run_dir: Path, config: TrainConfig) -> bool:
    exported = (run_dir / "model.safetensors").is_file() or (
        run_dir / "model.safetensors.index.json"
    ).is_file()
    log = run_dir / LOG_NAME
    if not exported or not log.is_file():
        return False
    steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    # A run with a time budget (train.max_minutes) logs the last step it decided on
    last = next((r["max_steps"] for r in steps if "max_steps" in r), config.train.max_steps)
    return any(r.get("step") == last and "loss" in r for r in steps)


def make_upcycled_init(suite: Suite, variant: Variant) -> Path:
    """Upcycle the final model of the variant named in `variant.upcycle["from"]`."""
    from olmoe.model import OlmoeForCausalLM
    from olmoe.tokenizer import Tokenizer
    from olmoe.upcycle import upcycle

    spec = dict(variant.upcycle)
    source = suite.run_dir(Variant(spec.pop("from"), {}))
    dense = OlmoeForCausalLM.from_pretrained(source)
    model = upcycle(dense, spec.pop("experts"), spec.pop("top_k"), **spec)
    target = suite.upcycled_init(variant)
    model.save_pretrained(target)
    if (source / "tokenizer.json").is_file():
        Tokenizer.from_pretrained(source).save_pretrained(target)
    return target


def _train_under_torchrun(suite, variant, config, nproc_per_node, resume) -> None:
    run_dir = suite.run_dir(variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "variant.yaml"
    write_atomic(config_path, config.to_yaml())
    command = train_command(config_path, nproc_per_node, resume)
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise ConfigError(f"variant {variant.name}: `{shlex.join(command)}` failed")


def train_command(config_path: Path, nproc_per_node: int, resume: Path | None) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", str(nproc_per_node), "-m", "olmoe"]
    command += ["train", str(config_path)]
    return command + (["--resume", str(resume)] if resume else [])


# ---------------------------------------------------------------------------- comparing
def summarize_run(run_dir: Path) -> dict[str, Any]:
    """A finished (or partly trained) run's row of the comparison."""
    steps, evals = read_log(run_dir)
    tail = steps[-max(1, round(len(steps) * TAIL_FRACTION)) :]
    main = "ce" if "ce" in steps[0] else "loss"
    counts = np.sum([r["expert_counts"] for r in tail], axis=0)  # (layers, E) slots
    row = {
        "steps": steps[-1]["step"],
        "train_loss": float(np.mean([r[main] for r in tail])),
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steps])),
        "load_max": float(np.mean([np.mean(r["load_max"]) for r in tail])) if counts.size else None,
        "dead_experts": (counts == 0).sum(axis=1).tolist() if counts.size else [],
        "dropped": float(np.mean([np.mean(r["dropped"]) for r in tail]))
        if "dropped" in tail[0]
        else None,
    }
    return row


def write_comparison(suite: Suite) -> list[Path]:
    """comparison.md (table), comparison.json (every number) and comparison.png (the loss
    curves overlaid) in the suite's out_dir, over the variants that have a log."""
    rows, curves = {}, {}
    for variant in suite.variants:
        run_dir = suite.run_dir(variant)
        if not (run_dir / LOG_NAME).is_file():
            continue
        rows[variant.name] = summarize_run(run_dir)
        curves[variant.name] = read_log(run_dir)
    if not rows:
        raise ConfigError(f"no variant of {suite.path} has trained yet: nothing to compare")
    out = suite.out_dir
    out.mkdir(parents=True, exist_ok=True)
    record = {"suite": suite.name, "paper": suite.paper, "variants": rows}
    paths = [out / f"{COMPARISON_NAME}.json", out / f"{COMPARISON_NAME}.md"]
    write_atomic(paths[0], json.dumps(record, indent=2) + "\n")
    write_atomic(paths[1], comparison_table(suite, rows))
    paths.append(_plot(out / f"{COMPARISON_NAME}.png", suite.name, curves))
    return paths


def comparison_table(suite: Suite, rows: dict[str, dict]) -> str:
    lines = [f"### {suite.name}", ""]
    if suite.paper:
        lines += [f"Paper: {suite.paper}", ""]
    lines += [
        "| variant | steps | train loss | val loss | tokens/s | load max/mean | dead experts "
        "per layer | dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        val = "" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        load = "" if r["load_max"] is None else f"{r['load_max']:.2f}"
        dropped = "" if r["dropped"] is None else f"{100 * r['dropped']:.1f}%"
        dead = " ".join(str(d) for d in r["dead_experts"]) or "(dense)"
        lines.append(
            f"| {name} | {r['steps']} | {r['train_loss']:.3f} | {val} | {r['tokens_per_s']:.0f} "
            f"| {load} | {dead} | {dropped} |"
        )
    return "\n".join(lines) + "\n"


def _plot(path: Path, title: str, curves: dict[str, tuple[list, list]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for index, (name, (steps, evals)) in enumerate(curves.items()):
        colour = f"C{index}"
        main = "ce" if "ce" in steps[0] else "loss"
        x, y = [r["step"] for r in steps], np.array([r[main] for r in steps])
        window = max(1, len(y) // 30)
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        axes[0].plot(x[window - 1 :], smooth, color=colour, lw=1.2, label=name)
        if evals:
            axes[1].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                         color=colour, label=name)  # fmt: skip
    axes[0].set(title=f"{title}: training loss (moving average)", xlabel="step",
                ylabel="nats/token")  # fmt: skip
    axes[1].set(title="validation loss", xlabel="step", ylabel="nats/token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)
    return path


def dry_run_commands(suite: Suite, nproc_per_node: int = 1) -> list[str]:
    """The commands that train the suite's variants elsewhere (a cluster): each variant's
    config written to OUT_DIR/NAME/variant.yaml, then one `olmoe upcycle` or `olmoe train`
    line per step; `olmoe ablate SUITE` afterwards only compares."""
    commands = []
    for variant in suite.variants:
        config = suite.config(variant)
        run_dir = suite.run_dir(variant)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "variant.yaml"
        write_atomic(config_path, config.to_yaml())
        if variant.upcycle is not None:
            spec = dict(variant.upcycle)
            source = suite.run_dir(Variant(spec.pop("from"), {}))
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in spec.items()
                     if not isinstance(v, bool)]  # fmt: skip
            flags += [f"--{k.replace('_', '-')}" for k, v in spec.items() if v is True]
            upcycle = ["olmoe", "upcycle", str(source), str(suite.upcycled_init(variant))]
            commands.append(shlex.join(upcycle + flags))
        command = ["olmoe", "train", str(config_path)]
        if nproc_per_node > 1:
            command = ["torchrun", "--nproc_per_node", str(nproc_per_node), "-m", *command]
        commands.append(shlex.join(command))
    return commands
