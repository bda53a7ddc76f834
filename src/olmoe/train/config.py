"""Training configuration: one dataclass per section, read from YAML, changed by overrides.

A config file holds the sections below (every key optional except `data.path`); unknown keys
and ill-typed values are errors that name the key. Overrides use the same dotted names as the
file: `--train.max_steps=200`, `--optim.lr 1e-3`, `--model.config.hidden_size=64`.

The defaults are OLMoE-1B-7B-0924's pretraining recipe (AdamW 4e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on every parameter, 2,500 warmup steps, cosine to 10%, clipping at 1.0, 4M-token
batches of 4,096-token instances, bf16 autocast, CE + 0.01 LB + 0.001 Z).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from olmoe.errors import ConfigError

OBJECTIVES = ("pretrain", "sft", "dpo", "kto")
OPTIMIZERS = ("adamw", "rmsprop")
PRECISIONS = ("bf16", "fp32", "auto")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("fsdp", "ddp")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelSection:
    """The model: a preset and/or OlmoeConfig fields, or weights to start from."""

    preset: str | None = None  # "tiny" or "OLMoE-1B-7B-0924" (olmoe.config.PRESETS)
    config: dict[str, Any] = field(default_factory=dict)  # OlmoeConfig fields over the preset
    # Start from these weights instead of a fresh OLMoE initialisation: a hub-layout checkpoint
    # (directory or repo id) or a checkpoint this trainer wrote. A new schedule and data order
    # start at step 0 (use --resume to continue a run instead).
    init_from: str | None = None
    # Also take the AdamW moments from `init_from` (a trainer checkpoint), as OLMoE's annealing
    # stage did.
    init_optimizer: bool = False

    def validate(self) -> None:
        from olmoe.config import PRESETS

        _require(
            self.preset is None or self.preset in PRESETS,
            f"model.preset must be one of {sorted(PRESETS)} or null, got {self.preset!r}",
        )
        _require(
            not self.init_optimizer or self.init_from is not None,
            "model.init_optimizer needs model.init_from (a trainer checkpoint directory)",
        )
        if self.init_from is None:
            self.build()  # a bad model field fails now, with OlmoeConfig's message

    def build(self):
        """The OlmoeConfig to train from scratch."""
        from olmoe.config import PRESETS, OlmoeConfig

        known = {f.name for f in dataclasses.fields(OlmoeConfig)}
        unknown = sorted(set(self.config) - known)
        if unknown:
            raise ConfigError(
                f"model.config has unknown key(s) {unknown}{_did_you_mean(unknown[0], known)}; "
                "its keys are OlmoeConfig's (config.json) fields"
            )
        factory = PRESETS[self.preset] if self.preset else OlmoeConfig
        try:
            return factory(**self.config)
        except TypeError as exc:
            raise ConfigError(f"model.config: {exc}") from None


@dataclass
class DataSection:
    """Pretraining: token files (`olmoe data prepare` output, a .npy file, or OLMo raw
    memmaps). sft, dpo, kto: chat or preference data (a .jsonl, .json, .parquet file or
    save_to_disk directory, prepared into the run directory; or a directory prepared by
    `olmoe data chat`), whose sequences are cut to `seq_len` tokens."""

    path: str = ""
    # Validation tokens; by default the `valid` split of `path` when it is a prepared directory.
    valid_path: str | None = None
    seq_len: int = 4096
    seed: int = 6198  # the data order (a seeded permutation per epoch)
    # sft: pack a micro-batch's examples into rows of up to seq_len tokens, each example
    # attending only to itself, instead of padding every example to the longest
    packing: bool = False

    def validate(self) -> None:
        _require(bool(self.path), "data.path is required: a directory from `olmoe data prepare`")
        _require(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")


@dataclass
class OptimSection:
    """AdamW (or RMSprop, as OLMoE's KTO run used) with fp32 state; `no_decay` exempts
    parameters whose name contains a given string."""

    name: str = "adamw"
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=list)  # OLMoE decays everything
    grad_clip: float | None = 1.0  # global norm; null turns clipping off

    def validate(self) -> None:
        _require(
            self.name in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}"
        )
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(
            all(0 <= b < 1 for b in self.betas), f"optim.betas must lie in [0, 1), got {self.betas}"
        )
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(
            self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}"
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip must be > 0 or null, got {self.grad_clip}",
        )


@dataclass
class ScheduleSection:
    """Learning rate per step: linear warmup to optim.lr, then `name` down to
    final_lr_ratio * optim.lr at decay_steps (default: train.max_steps), constant afterwards.
    `linear` with warmup 0 and ratio 0 is OLMoE's annealing stage."""

    name: str = "cosine"
    warmup_steps: int = 2500
    # Warmup as a share of train.max_steps (the adaptation recipes' way); replaces warmup_steps.
    warmup_ratio: float | None = None
    decay_steps: int | None = None
    final_lr_ratio: float = 0.1

    def validate(self) -> None:
        _require(
            self.name in SCHEDULES, f"schedule.name must be one of {SCHEDULES}, got {self.name!r}"
        )
        _require(
            self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}"
        )
        _require(
            self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
            f"schedule.warmup_ratio must lie in [0, 1) or be null, got {self.warmup_ratio}",
        )
        _require(
            0 <= self.final_lr_ratio <= 1,
            f"schedule.final_lr_ratio must lie in [0, 1], got {self.final_lr_ratio}",
        )


@dataclass
class LossSection:
    """Total loss = CE (or the objective's loss) + lb_coef * LB + z_coef * Z
    (olmoe.train.losses). Unset, the coefficients are the released runs': 0.01 and 0.001 for
    pretraining, 0 for sft, dpo and kto."""

    lb_coef: float | None = None
    z_coef: float | None = None
    # Divide the z-loss by top-k as the released OLMoE code did; false gives the paper's (and
    # OLMo-core's) scale, K times larger.
    z_loss_per_slot: bool = True

    def validate(self) -> None:
        for name in ("lb_coef", "z_coef"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"loss.{name} must be >= 0, got {value}")

    def resolve(self, objective: str) -> None:
        """Fill the unset coefficients with `objective`'s defaults."""
        pretraining = objective == "pretrain"
        if self.lb_coef is None:
            self.lb_coef = 0.01 if pretraining else 0.0
        if self.z_coef is None:
            self.z_coef = 0.001 if pretraining else 0.0


@dataclass
class TrainSection:
    max_steps: int = 1_200_000
    # A time budget for the training steps (evaluation, checkpoints and start-up not counted):
    # after the first steps are timed, max_steps is lowered once to what fits (olmoe.train.budget)
    max_minutes: float | None = None
    global_batch_tokens: int = 4_194_304  # pretraining: per optimizer step, all ranks
    global_batch_examples: int = 128  # sft, dpo, kto: examples (pairs) per optimizer step
    micro_batch_size: int = 4  # instances per forward pass on one rank
    # bf16 autocast over fp32 weights and optimizer state, fp32, or auto: bf16 where the hardware
    # multiplies bf16 natively, else fp32 (olmoe.hardware.training_precision)
    precision: str = "bf16"
    seed: int = 6198  # model initialisation and any randomness in the step
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int | None = None  # torch CPU threads per process; null keeps torch's choice

    def validate(self) -> None:
        _require(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(
            self.max_minutes is None or self.max_minutes > 0,
            f"train.max_minutes must be > 0 (or null for no time budget), got {self.max_minutes}",
        )
        _require(
            self.global_batch_tokens >= 1,
            f"train.global_batch_tokens must be >= 1, got {self.global_batch_tokens}",
        )
        _require(
            self.global_batch_examples >= 1,
            f"train.global_batch_examples must be >= 1, got {self.global_batch_examples}",
        )
        _require(
            self.micro_batch_size >= 1,
            f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}",
        )
        _require(
            self.precision in PRECISIONS,
            f"train.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _require(self.threads is None or self.threads >= 1, "train.threads must be >= 1 or null")


@dataclass
class EvalSection:
    every: int = 0  # validation loss every N steps (0: only at the end)
    batches: int = 8  # micro-batches of validation instances per evaluation (all ranks)
    unigram_baseline: bool = True  # report a unigram model's validation loss next to ours
    sample_prompt: str | None = None  # print a greedy continuation of this at the end
    sample_tokens: int = 48

    def validate(self) -> None:
        _require(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _require(self.batches >= 1, f"eval.batches must be >= 1, got {self.batches}")
        _require(
            self.sample_tokens >= 1, f"eval.sample_tokens must be >= 1, got {self.sample_tokens}"
        )


@dataclass
class CheckpointSection:
    every: int = 1000  # a resumable checkpoint every N steps (0: only at the end)
    keep: int = 2  # newest checkpoints kept; older ones are deleted (0 keeps all)
    # Also keep the model alone every N steps (0: never) as revision RUN/revisions/step{N}-
    # tokens{M}B, named as the released model's hub branches; rotation never deletes these.
    revisions_every: int = 0

    def validate(self) -> None:
        _require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        _require(self.keep >= 0, f"checkpoint.keep must be >= 0, got {self.keep}")
        _require(
            self.revisions_every >= 0,
            f"checkpoint.revisions_every must be >= 0 (0: off), got {self.revisions_every}",
        )


@dataclass
class DistributedSection:
    """Used under torchrun (WORLD_SIZE > 1): gloo on the CPU, nccl on GPUs."""

    strategy: str = "fsdp"  # fsdp: FSDP2 fully_shard (parameters, grads, state sharded); ddp

    def validate(self) -> None:
        _require(
            self.strategy in STRATEGIES,
            f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}",
        )


@dataclass
class PreferenceSection:
    """The adaptation objectives' settings (olmoe.train.preference has the formulas)."""

    sft_reduction: str = "sum"  # summed token CE, as the released SFT; or mean
    beta: float = 0.1
    loss_type: str = "sigmoid"  # DPO: sigmoid, sigmoid_norm, ipo, hinge (TRL's names)
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0  # KTO's lambda_D and lambda_U
    undesirable_weight: float = 1.0
    # The reference model whose log-probabilities DPO and KTO compare against (computed once,
    # before the first step); null: the model training starts from.
    reference: str | None = None

    def validate(self) -> None:
        from olmoe.train.preference import DPO_LOSS_TYPES, SFT_REDUCTIONS

        _require(
            self.sft_reduction in SFT_REDUCTIONS,
            f"preference.sft_reduction must be one of {SFT_REDUCTIONS}, got {self.sft_reduction!r}",
        )
        _require(
            self.loss_type in DPO_LOSS_TYPES,
            f"preference.loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}",
        )
        _require(self.beta > 0, f"preference.beta must be > 0, got {self.beta}")
        _require(
            0 <= self.label_smoothing < 0.5,
            f"preference.label_smoothing must lie in [0, 0.5), got {self.label_smoothing}",
        )
        for name in ("desirable_weight", "undesirable_weight"):
            _require(getattr(self, name) > 0, f"preference.{name} must be > 0")


@dataclass
class TrainConfig:
    run_dir: str = "runs/olmoe"  # log, checkpoints and the final model go here
    # pretrain: next-token loss on token files; sft, dpo, kto: fine-tuning on chat data
    objective: str = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)

    def validate(self) -> None:
        _require(
            self.objective in OBJECTIVES,
            f"objective must be one of {OBJECTIVES}, got {self.objective!r}",
        )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        _require(bool(self.run_dir), "run_dir must be a directory path")
        _require(
            self.objective == "pretrain" or self.model.init_from is not None,
            f"objective {self.objective} fine-tunes a model: set model.init_from to its checkpoint",
        )
        self.loss.resolve(self.objective)
        decay = self.schedule.decay_steps
        _require(
            decay is None
            or self.schedule.warmup_ratio is not None
            or decay > self.schedule.warmup_steps,
            f"schedule.decay_steps ({decay}) must exceed schedule.warmup_steps "
            f"({self.schedule.warmup_steps})",
        )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        config = _build(cls, data, "")
        config.validate()
        return config


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (None: all defaults), apply `--section.key=value` overrides,
    validate. Raises ConfigError or OSError with a message that names the file or key."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_config_file(Path(path), ())
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return TrainConfig.from_dict(data)


def _read_config_file(path: Path, within: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's sections. A file with `base: OTHER.yaml` (relative to it) is that file
    with each of its own settings laid over it as an override, key by key."""
    data = read_yaml_mapping(path, "config", "sections")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name a config file, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in within + (path.resolve(),):
        raise ConfigError(f"{path}: base {base} leads back to a file that names it")
    merged = _read_config_file(base_path, within + (path.resolve(),))
    for key, value in _dotted_settings(data, ""):
        _set_dotted(merged, key, value)
    return merged


def _dotted_settings(data: dict[str, Any], prefix: str):
    """(section.key, value) for every setting in nested sections; a non-empty mapping is a
    section, anything else (lists and empty mappings too) a value."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _dotted_settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def read_yaml_mapping(path: Path, kind: str, holds: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty for an empty file); errors name the file: `kind`
    what it is ("config"), `holds` what its mapping holds ("sections")."""
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {holds}, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--a.b=value` or `--a.b value` pairs; values are read as YAML (numbers, true, [1, 2])."""
    pairs, items = [], list(args)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key=value"
            )
        key, sep, text = arg[2:].partition("=")
        if not sep:
            if not items or items[0].startswith("--"):
                raise ConfigError(f"override --{key} needs a value: --{key}=VALUE")
            text = items.pop(0)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    target = data
    for part in parts[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{key}: {part} is not a section")  # noqa: TRY004
        target = child
    target[parts[-1]] = value


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls, data: Any, where: str):
    """A dataclass from a mapping, checking every key and value type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        message = f"{where or 'the config'} must be a mapping, got {data!r}"
        raise ConfigError(message)  # noqa: TRY004
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        section = f"section {where!r}" if where else "the config's top level"
        raise ConfigError(
            f"unknown key {where + '.' if where else ''}{unknown[0]} in {section}"
            f"{_did_you_mean(str(unknown[0]), fields)}; known keys: {', '.join(fields)}"
        )
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if hint is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value] if origin is list else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} entries, got {value!r}")
        inner = args if origin is tuple else [args[0]] * len(value)
        items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, inner))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int and ok and float(value).is_integer():
            return int(value)
        if hint is float and ok:
            return float(value)
        kind = "an integer" if hint is int else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug here, not user input


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples become lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
