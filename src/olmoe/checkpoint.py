"""Hub-layout checkpoints: load them lazily, save them (sharded or not); olmoe.hub finds them.

On disk each expert has its own keys, as the released checkpoints and every peer expect:
    model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight
In memory a layer's experts are two stacked tensors (`gate_up_proj` (E, 2I, H), `down_proj`
(E, H, I)). `hub_pieces` is the one place that maps between the two; every other tensor keeps its
name. Files that hold the stacked tensors under their in-memory names (as transformers 5 can write
them) load too. Only safetensors is read: a pickled `.bin` file can run code, so it is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from olmoe.config import CONFIG_NAME, OlmoeConfig
from olmoe.errors import CheckpointError, InputError
from olmoe.fileio import (
    default_permissions,
    move_into_directory,
    safetensors_os_errors,
    staging_directory,
)
from olmoe.hub import resolve_checkpoint_dir
from olmoe.memory import advise_huge_pages

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_STACKED_EXPERTS = re.compile(
    r"(.*layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale)?"  # quantised: + scales
)

# A piece of a model parameter as stored on disk: the file key and the index into the parameter
# it fills (an empty index means the whole parameter).
Piece = tuple[str, tuple]


# ---------------------------------------------------------------------------- key map
def hub_pieces(name: str, config: OlmoeConfig) -> list[Piece]:
    """The on-disk keys that make up parameter `name`, and where each goes inside it."""
    match = _STACKED_EXPERTS.fullmatch(name)
    if match is None:
        return [(name, ())]
    prefix, stacked, scale = match.groups()
    weight = "weight_scale" if scale else "weight"  # a quantised checkpoint's scales
    inter = config.intermediate_size
    pieces: list[Piece] = []
    for e in range(config.num_experts):
        if stacked == "gate_up_proj":  # gate rows first, then up rows
            pieces.append((f"{prefix}.{e}.gate_proj.{weight}", (e, slice(0, inter))))
            pieces.append((f"{prefix}.{e}.up_proj.{weight}", (e, slice(inter, 2 * inter))))
        else:
            pieces.append((f"{prefix}.{e}.down_proj.{weight}", (e,)))
    return pieces


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file, from the file's header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I8": torch.int8,  # int8-quantised checkpoints (olmoe.quantize)
    "U8": torch.uint8,  # int4-quantised checkpoints: two values per byte
}


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensor table of a safetensors file: an 8-byte little-endian header length, a JSON
    header of dtype, shape and data offsets per tensor, then the data."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if size < 8 or length > size - 8:
            raise CheckpointError(f"{file} is not a safetensors file, or it is truncated")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file} has a corrupt safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    table = {}
    for key, entry in header.items():
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {key} in {file.name} is stored as {entry['dtype']}; olmoe reads "
                f"{', '.join(_SAFETENSORS_DTYPES)} weights"
            )
        begin, end = entry["data_offsets"]
        stored = StoredTensor(
            file,
            _SAFETENSORS_DTYPES[entry["dtype"]],
            tuple(entry["shape"]),
            8 + length + begin,
            end - begin,
        )
        if (
            stored.offset + stored.nbytes > size
            or math.prod(stored.shape) * stored.dtype.itemsize != stored.nbytes
        ):
            raise CheckpointError(f"tensor {key} in {file.name} is truncated or mis-sized")
        table[key] = stored
    return table


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `directory`, single file or sharded."""
    index_path = directory / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted({directory / name for name in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        missing = sorted(f.name for f in files if not f.is_file())
        if missing:
            raise CheckpointError(f"{index_path} lists shard files that are missing: {missing}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{directory} holds only pickled weights ({', '.join(pickled)}); olmoe reads "
                "safetensors only, because unpickling can run arbitrary code. Convert them "
                "(for example with transformers: from_pretrained then save_pretrained) first"
            )
        raise CheckpointError(f"no *.safetensors weights in {directory}")
    table: dict[str, StoredTensor] = {}
    for file in files:
        table.update(read_header(file))
    return table


def _read_config(directory: Path) -> OlmoeConfig:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}: is this an OLMoE checkpoint?")
    return OlmoeConfig.from_json_file(config_path)


@dataclass(frozen=True)
class CheckpointSummary:
    """What `olmoe info` shows: read from config.json and the safetensors headers, no weights."""

    directory: Path
    config: OlmoeConfig
    dtypes: tuple[str, ...]  # stored weight dtypes, e.g. ("bfloat16",)
    num_files: int
    total_bytes: int  # the weights' bytes


def summarize_checkpoint(
    path_or_repo_id: str | os.PathLike, revision: str | None = None
) -> CheckpointSummary:
    """Describe a checkpoint without loading it. A hub repo is described from its JSON files
    (config and shard index) alone, so nothing large is downloaded."""
    directory = resolve_checkpoint_dir(path_or_repo_id, revision=revision, weights=False)
    config = _read_config(directory)
    index_path = directory / WEIGHTS_INDEX_NAME
    if not any(directory.glob("*.safetensors")) and index_path.is_file():  # hub: JSON only
        index = json.loads(index_path.read_text())
        files = set(index.get("weight_map", {}).values())
        stored_dtype = config.extra.get("torch_dtype") or config.extra.get("dtype") or "unknown"
        total = int(index.get("metadata", {}).get("total_size", 0))
        return CheckpointSummary(directory, config, (str(stored_dtype),), len(files), total)
    tensors = stored_tensors(directory)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    files = {t.file for t in tensors.values()}
    total = sum(t.nbytes for t in tensors.values())
    return CheckpointSummary(directory, config, tuple(dtypes), len(files), total)


# ---------------------------------------------------------------------------- loading
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            f"dtype must be a floating-point torch dtype or its name (bfloat16, float16, "
            f"float32), got {dtype!r}"
        )
    return dtype


def load_pretrained(cls, path_or_repo_id, revision=None, dtype=None, device="cpu", quantize=None):
    """Build `cls` from a checkpoint with peak memory near the weights' size.

    The model is created on the meta device, given uninitialised storage of the final dtype on
    the final device, and each stored tensor is read from its file straight into its place in
    that storage: no random init, no second copy, no float32 detour for bf16 weights. Plain
    reads rather than safetensors' memory map: mapped pages count as resident while the file is
    open, which would show a 13.8 GB load as 27 GB.
    """
    directory = resolve_checkpoint_dir(path_or_repo_id, revision=revision)
    config = _read_config(directory)
    stored = stored_tensors(directory)
    dtype = resolve_dtype(dtype)

    with torch.device("meta"):
        model = cls(config)
        if config.extra.get("quantization_config"):
            from olmoe.quantize import quantize_model

            quantize_model(model, _quantization_method(config))
    plan = _load_plan(model, config, stored)
    if dtype is None:  # keep what is stored: a bf16 checkpoint stays bf16
        dtype = stored[plan[0][1][0][0]].dtype
    model.to(dtype=dtype).to_empty(device=device)  # replaces the parameter objects
    _retie_embeddings(model)
    advise_huge_pages(model.parameters())  # before the first touch, or the advice is too late
    params = dict(model.named_parameters())

    # Every read in file order: a disk (or the page cache's readahead) streams a checkpoint
    # read front to back, while the model's parameter order jumps around inside the shards.
    reads = sorted(
        ((stored[key], name, index) for name, pieces in plan for key, index in pieces),
        key=lambda read: (str(read[0].file), read[0].offset),
    )
    total = sum(t.nbytes for t, _, _ in reads)
    progress = tqdm(total=total, desc="Loading weights", unit="B", unit_scale=True, disable=None)
    with contextlib.ExitStack() as stack, torch.no_grad(), progress:
        files = {f: stack.enter_context(open(f, "rb")) for f in {t.file for t in stored.values()}}
        for tensor, name, index in reads:
            _read_into(files[tensor.file], tensor, params[name][index])
            progress.update(tensor.nbytes)
    # The config describes the model in memory, as transformers' does after a dtype cast.
    config.extra["torch_dtype"] = config.extra["dtype"] = str(dtype).removeprefix("torch.")
    if quantize is not None:
        from olmoe.quantize import quantize_model

        quantize_model(model, quantize)
    return model.eval()


def _quantization_method(config: OlmoeConfig) -> str:
    from olmoe.quantize import QUANT_METHODS

    method = config.extra["quantization_config"].get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(
            f"this checkpoint is quantised with {method!r}; olmoe reads its own "
            f"{' and '.join(map(repr, QUANT_METHODS))} checkpoints (olmoe quantize) and "
            "unquantised ones"
        )
    return QUANT_METHODS[method]


def _read_into(fh, stored: StoredTensor, dest: torch.Tensor) -> None:
    """Fill `dest` with a stored tensor, reading straight into its memory where dtype, device
    and layout allow, else through one temporary buffer."""
    direct = dest.dtype == stored.dtype and dest.device.type == "cpu" and dest.is_contiguous()
    buffer = dest if direct else torch.empty(stored.shape, dtype=stored.dtype)
    fh.seek(stored.offset)
    if fh.readinto(memoryview(buffer.view(-1).view(torch.uint8).numpy())) != stored.nbytes:
        raise CheckpointError(f"{stored.file} ended early: the file is truncated")
    if not direct:
        dest.copy_(buffer)


def _retie_embeddings(model) -> None:
    """Share the embedding with lm_head again after `to_empty`.

    `to_empty` gives each module its own new parameter, so a tied lm_head would be left as a
    separate, never-filled tensor (the plan loads the shared weight once, as the embedding).
    """
    if model.config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight


def _load_plan(model, config, stored) -> list[tuple[str, list[Piece]]]:
    """Match every parameter to its file keys, checking names and shapes before reading data."""
    # A bare OlmoeModel reading a causal-LM checkpoint: its keys carry the `model.` prefix.
    base_only = not hasattr(model, "lm_head")
    prefix = "model." if base_only and any(k.startswith("model.") for k in stored) else ""
    plan, used, missing = [], set(), []
    for name, param in model.named_parameters():  # a tied lm_head comes once, as the embedding
        key = prefix + name
        # stored under the in-memory name (stacked experts included), or in the hub layout
        pieces = [(key, ())] if key in stored else hub_pieces(key, config)
        absent = [k for k, _ in pieces if k not in stored]
        if absent:
            missing.extend(absent)
            continue
        for k, index in pieces:
            expected = tuple(param[index].shape)
            if stored[k].shape != expected:
                raise CheckpointError(
                    f"tensor {k} in {stored[k].file.name} has shape {stored[k].shape}, but the "
                    f"model built from config.json expects {expected}: the config and the "
                    "weights disagree"
                )
            used.add(k)
        plan.append((name, pieces))
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from the checkpoint, for example "
            f"{', '.join(missing[:5])}"
        )
    unexpected = sorted(k for k in set(stored) - used if k.startswith(prefix))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # a copy of the tied embedding; nothing to load
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint, for example "
            f"{', '.join(unexpected[:5])}: the config does not describe these weights"
        )
    return plan


# ---------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' (10^9) or '2GiB' (2^30)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise InputError(
            f"max_shard_size must be a positive byte count or like '5GB', got {size!r}"
        )
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    result = int(number * powers[unit])
    if result <= 0:
        raise InputError(f"max_shard_size must be positive, got {size!r}")
    return result


def save_pretrained(
    model, directory: str | os.PathLike, max_shard_size: int | str = "5GB", tokenizer=None
) -> None:
    """Write config.json and the weights in the hub layout (and `tokenizer`'s files).

    Files are written to a temporary directory beside the target and moved in only when all of
    them are complete, so an interrupted save never leaves a half-written checkpoint (nor one
    without its tokenizer); weight files of an earlier save that the new one does not use are
    removed.
    """
    limit = parse_size(max_shard_size)
    config: OlmoeConfig = model.config
    unsupported = [] if config.is_dense_olmo else config.transformers_unsupported()
    if unsupported:
        warnings.warn(
            # No path in the message: Python shows a repeated warning once, not at every save.
            f"transformers' OlmoeForCausalLM cannot represent "
            f"{', '.join(unsupported)} (the paper's design switches); config.json records them "
            "and olmoe loads this checkpoint exactly, but transformers would load a different "
            "model",
            stacklevel=3,
        )
    tensors = [
        (key, param.detach()[index])
        # a tied lm_head is stored once, as the embedding
        for name, param in model.named_parameters()
        for key, index in hub_pieces(name, config)
    ]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    for key, tensor in tensors:
        size = tensor.nbytes
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((key, tensor))
        shard_bytes += size

    target = Path(directory)
    with staging_directory(target) as staging:
        names = (
            [WEIGHTS_NAME]
            if len(shards) == 1
            else [SHARD_NAME.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
        )
        weight_map = {}
        for name, shard in zip(names, tqdm(shards, desc="Saving", unit="shard", disable=None)):
            # Expert slices are contiguous, non-overlapping views of the stacked tensors, which
            # safetensors (>= 0.8) writes straight from memory: saving makes no copy of them.
            with safetensors_os_errors():  # a full disk: an OSError, for one-line errors
                save_file(dict(shard), staging / name, metadata={"format": "pt"})
            weight_map.update({key: name for key, _ in shard})
        if len(shards) > 1:
            total = sum(t.nbytes for _, t in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        # The dtype the weights were written in, under both transformers generations' keys.
        written = copy.copy(config)
        dtype_name = str(model.dtype).removeprefix("torch.")
        written.extra = {**config.extra, "torch_dtype": dtype_name, "dtype": dtype_name}
        written.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for file in staging.iterdir():
            default_permissions(file)  # safetensors makes its files private to their writer
        _remove_stale_weights(target, keep={file.name for file in staging.iterdir()})
        # The weights (or their index) last: a save killed while moving in (into a run
        # directory, say) must not leave weights that look like a model beside no config.
        move_into_directory(staging, target, last=(WEIGHTS_NAME, WEIGHTS_INDEX_NAME))


def _remove_stale_weights(target: Path, keep: set[str]) -> None:
    """Delete the weight files of an earlier save into `target` that the new save does not
    replace: loaders would take its old shards or index for part of the new checkpoint."""
    if not target.exists():
        return
    for old in target.iterdir():
        stale_weights = old.name == WEIGHTS_INDEX_NAME or old.suffix == ".safetensors"
        if stale_weights and old.name not in keep and old.is_file():
            old.unlink()
