"""Resumable trainer checkpoints.

    RUN/checkpoints/step-00000100/
        config.json, model.safetensors   the model in the hub layout (from_pretrained, transformers)
        tokenizer.json, ...              when the data named its tokenizer
        trainer/optimizer.safetensors    AdamW moments and step counts by parameter name; RNG states
        trainer/state.json               step, tokens seen, data position, optimizer hyperparameters
(The trainer's files sit in a subdirectory so that loaders globbing `*.safetensors` for weights
never see them.)
    RUN/checkpoints/latest               the name of the newest complete checkpoint
    RUN/revisions/step100-tokens0B/      with checkpoint.revisions_every: the model alone (hub
                                         layout), named as the hub names revisions, never rotated

A checkpoint is written into `.step-N.partial` and renamed to `step-N` only when every file is in
place and flushed to disk; `latest` is replaced the same way after that (olmoe.fileio). A run
killed mid-save therefore leaves a `.partial` directory that nothing reads, never a `step-N` that
looks complete; an old checkpoint is renamed to a hidden name before it is deleted, for the same
reason. What killed writes leave behind is deleted when the next trainer of the run starts
(`remove_leftovers`).

Under FSDP the full (unsharded) model and optimizer state are gathered to rank 0, which writes
them; loading gives every rank the full state and lets torch shard it again. Only safetensors and
JSON are read back: no pickles.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from olmoe.checkpoint import save_pretrained
from olmoe.errors import CheckpointError, ConfigError
from olmoe.fileio import (
    atomic_directory,
    replace_directory,
    safetensors_os_errors,
    write_atomic,
)
from olmoe.revisions import REVISIONS_DIR, revision_name
from olmoe.train.distributed import Environment

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_NAME = "trainer/state.json"
OPTIMIZER_NAME = "trainer/optimizer.safetensors"
STATE_FORMAT = "olmoe-trainer/1"
_STEP_DIR = re.compile(r"step-(\d+)")
# How the hidden names end of olmoe.fileio's staging directories and temporary files (.partial)
# and of what it sets aside while replacing a directory (.old, as _prune's checkpoints on their
# way out)
_LEFTOVER_SUFFIXES = (".partial", ".old")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    env: Environment,
    tokenizer=None,
    keep: int = 0,
) -> Path:
    """Write the checkpoint of step `state["step"]`. Every rank calls this (the gathers are
    collective); rank 0 writes. Returns the checkpoint directory."""
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng = _rng_states()
    if env.distributed:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(state["step"])
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".{final.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _write_checkpoint(staging, final, model, model_state, optim_state, gathered, state,
                              env, tokenizer)  # fmt: skip
        except OSError as exc:  # a full disk, a lost mount: clean up, keep what was there
            shutil.rmtree(staging, ignore_errors=True)
            latest = root / LATEST_NAME
            kept = (
                f"the newest complete checkpoint, {latest.read_text().strip()}, is intact"
                if latest.is_file()
                else "no earlier checkpoint exists"
            )
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"saving {final.name} failed ({reason}); {kept}") from exc
        write_atomic(root / LATEST_NAME, final.name + "\n")  # last: the checkpoint is complete
        _prune(root, keep, final.name)
    if env.distributed:
        dist.barrier()
    return final


def _write_checkpoint(staging, final, model, model_state, optim_state, gathered, state, env,
                      tokenizer) -> None:  # fmt: skip
    """The checkpoint's files into `staging`, then `staging` into place as `final`."""
    _model_from_state(_unwrapped_config(model), model_state).save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    (staging / OPTIMIZER_NAME).parent.mkdir()
    tensors = {}
    for name, moments in optim_state["state"].items():
        for key, value in moments.items():
            tensors[f"state/{name}/{key}"] = _as_tensor(value)
    for rank, states in enumerate(gathered):
        for device, value in states.items():
            tensors[f"rng/{rank}/{device}"] = value
    with safetensors_os_errors():  # a full disk must reach the cleanup above as an OSError
        save_file(tensors, staging / OPTIMIZER_NAME, metadata={"format": STATE_FORMAT})
    record = {
        "format": STATE_FORMAT,
        **state,
        "world_size": env.world_size,
        "param_groups": optim_state["param_groups"],
    }
    (staging / STATE_NAME).write_text(json.dumps(_json_safe(record), indent=2) + "\n")
    replace_directory(staging, final)  # flushes every file of it to disk first


def export_model(model: torch.nn.Module, directory: Path, env: Environment, tokenizer=None):
    """Save the model alone (hub layout, plus the tokenizer) into `directory`, e.g. the run
    directory, so that `olmoe generate RUN` and transformers load it. Collective; returns the
    plain, unsharded model on rank 0 and None elsewhere."""
    model_state = get_model_state_dict(model, options=_FULL)
    plain = None
    if env.is_main:
        plain = _model_from_state(_unwrapped_config(model), model_state).eval()
        save_pretrained(plain, directory, tokenizer=tokenizer)  # one save: never half of them
    if env.distributed:
        dist.barrier()
    return plain


def save_revision(
    model: torch.nn.Module, run_dir: Path, step: int, tokens: int, env: Environment, tokenizer=None
) -> Path:
    """Keep the model of this step as revision `step{N}-tokens{M}B` of the run: what
    `export_model` writes, staged and renamed into RUN/revisions/ whole, so that a run killed
    mid-save leaves no revision that looks complete. Collective; returns its directory."""
    final = Path(run_dir) / REVISIONS_DIR / revision_name(step, tokens)
    with atomic_directory(final) if env.is_main else contextlib.nullcontext() as staging:
        export_model(model, staging, env, tokenizer)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: `path` itself, or the newest complete one of a run."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    latest = root / LATEST_NAME
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / STATE_NAME).is_file():
            return candidate
    complete = (
        [p for p in root.glob("step-*") if (p / STATE_NAME).is_file()] if root.is_dir() else []
    )
    if complete:  # `latest` lost: the newest complete checkpoint
        return max(complete, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))
    raise FileNotFoundError(
        f"no trainer checkpoint in {path}: pass a run directory (with {CHECKPOINTS_DIR}/) or a "
        f"checkpoint directory holding {STATE_NAME}"
    )


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {checkpoint / STATE_NAME}: {exc}") from None
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{checkpoint / STATE_NAME} is not an {STATE_FORMAT} trainer state")
    return state


def load_optimizer(
    checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Fill the optimizer's moments and step counts from a checkpoint (sharded again under
    FSDP). The current hyperparameters are kept: the config and the schedule set those."""
    state = read_state(checkpoint)
    tensors = load_file(checkpoint / OPTIMIZER_NAME)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, *rest = key.split("/")
        if kind == "state":
            name, field = rest
            moments.setdefault(name, {})[field] = value
    groups = [
        {**saved, **{k: v for k, v in current.items() if k != "params"}}
        for saved, current in zip(state["param_groups"], optimizer.param_groups)
    ]
    if len(groups) != len(optimizer.param_groups):
        raise ConfigError(
            f"{checkpoint} has {len(state['param_groups'])} parameter groups, this optimizer "
            f"{len(optimizer.param_groups)}: optim.no_decay must match the saved run"
        )
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": moments, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )


def restore_rng(checkpoint: Path, env: Environment) -> None:
    """This rank's random number generator states, as they were when the checkpoint was saved."""
    tensors = load_file(checkpoint / OPTIMIZER_NAME)
    prefix = f"rng/{env.rank}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            device = key[len(prefix) :]
            if device == "cpu":
                torch.set_rng_state(value)
            elif device == "cuda" and torch.cuda.is_available():
                torch.cuda.set_rng_state(value)


# ---------------------------------------------------------------------------- helpers
def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _unwrapped_config(model: torch.nn.Module):
    return getattr(model, "module", model).config


def _model_from_state(config, state: dict[str, torch.Tensor]):
    """An OlmoeForCausalLM whose parameters are the gathered tensors (no copies, no init)."""
    from olmoe.model import OlmoeForCausalLM

    with torch.device("meta"):
        model = OlmoeForCausalLM(config)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:  # assign gives lm_head its own tensor; share it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _as_tensor(value: Any) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensor.detach().cpu().contiguous()


def _json_safe(value: Any) -> Any:
    """numpy and torch scalars as plain numbers, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def remove_leftovers(run_dir: Path) -> None:
    """Delete what writes killed half-way left behind (hidden staging directories, temporary
    files, checkpoints half deleted): in the run directory, its checkpoints/ and revisions/, and
    beside it (the final model's staging). Only the holder of the run's lock may call this, and
    only while none of its own writes is under way."""
    run_dir = Path(run_dir).resolve()  # its name, for the staging beside it
    places = [(run_dir, ".*"), (run_dir / CHECKPOINTS_DIR, ".*"), (run_dir / REVISIONS_DIR, ".*")]
    places.append((run_dir.parent, f".{glob.escape(run_dir.name)}.*"))
    for folder, prefix in places:
        for suffix in _LEFTOVER_SUFFIXES:
            for leftover in folder.glob(prefix + suffix):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def _prune(root: Path, keep: int, latest: str) -> None:
    """Delete checkpoints beyond the newest `keep`."""
    if keep <= 0:
        return
    steps = sorted(
        (p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name)),
        key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)),
    )
    for old in steps[:-keep]:
        if old.name != latest:
            # Hidden first: a deletion cut short must not leave a `step-N` that lacks files.
            hidden = root / f".{old.name}.old"
            shutil.rmtree(hidden, ignore_errors=True)
            os.replace(old, hidden)
            shutil.rmtree(hidden, ignore_errors=True)
