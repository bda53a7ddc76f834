"""Hub-layout checkpoints: exact round trips (single file, sharded, tied, bf16), the on-disk key
layout, files written by transformers 5, clear errors, crash-safe saving, hub snapshots from a
local cache, and loading without a second copy of the weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import olmoe.checkpoint
from olmoe import CheckpointError, OlmoeConfig, OlmoeForCausalLM
from olmoe.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from olmoe.errors import InputError, OlmoeError
from tests.conftest import modules_imported_by, randomize, tiny_model, use_offline_hub
from tests.parity import reference_config

SMALL_SHARD = 20_000  # bytes: splits a tiny float32 model (~160 kB) into several shards


# ---------------------------------------------------------------------------- helpers
def assert_same_state(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def file_keys(directory: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """key -> (file name, shape, safetensors dtype) over every safetensors file in `directory`."""
    keys = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                keys[key] = (file.name, tuple(piece.get_shape()), piece.get_dtype())
    return keys


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def rewrite_weights(file: Path, change) -> None:
    """Apply `change` to the tensor dict stored in `file` and write it back."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def logits(model: OlmoeForCausalLM) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------- round trips
def test_single_file_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(0)
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", WEIGHTS_NAME]

    loaded = OlmoeForCausalLM.from_pretrained(tmp_path / "a")
    assert_same_state(loaded, model)
    assert loaded.config == model.config
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))

    loaded.save_pretrained(tmp_path / "b")
    assert directory_bytes(tmp_path / "b") == directory_bytes(tmp_path / "a")


def test_sharded_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(1, num_key_value_heads=2, attention_bias=True)
    model.save_pretrained(tmp_path / "a", max_shard_size=SMALL_SHARD)
    a = tmp_path / "a"
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 2
    assert WEIGHTS_NAME not in shards
    pattern = rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors"
    assert all(re.fullmatch(pattern, s) for s in shards)
    index = json.loads((a / WEIGHTS_INDEX_NAME).read_text())
    keys = file_keys(a)
    for name in shards:  # no tensor here exceeds the limit alone, so no shard does either
        shard_shapes = [shape for file, shape, _ in keys.values() if file == name]
        assert sum(torch.Size(shape).numel() * 4 for shape in shard_shapes) <= SMALL_SHARD
    assert index["weight_map"] == {key: file for key, (file, _, _) in keys.items()}
    tensor_bytes = sum(
        torch.Size(shape).numel() * 4 for _, shape, dtype in keys.values() if dtype == "F32"
    )
    assert all(dtype == "F32" for _, _, dtype in keys.values())
    assert index["metadata"]["total_size"] == tensor_bytes

    loaded = OlmoeForCausalLM.from_pretrained(a)
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded), logits(model))

    loaded.save_pretrained(tmp_path / "b", max_shard_size=SMALL_SHARD)
    assert directory_bytes(tmp_path / "b") == directory_bytes(a)


def test_max_shard_size_accepts_unit_strings(tmp_path):
    model = tiny_model(2)
    model.save_pretrained(tmp_path, max_shard_size="20kB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_same_state(OlmoeForCausalLM.from_pretrained(tmp_path), model)
    with pytest.raises(InputError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size="lots")


def test_files_hold_per_expert_hub_keys(tmp_path):
    config = OlmoeConfig.tiny(num_key_value_heads=2)
    tiny_model(3, num_key_value_heads=2).save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    keys = {key: shape for key, (_, shape, _) in file_keys(tmp_path).items()}
    h, i, kv = config.hidden_size, config.intermediate_size, 2 * config.head_dim

    expected = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (config.vocab_size, h),
    }
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        expected[f"{p}.self_attn.q_proj.weight"] = (h, h)
        expected[f"{p}.self_attn.k_proj.weight"] = (kv, h)
        expected[f"{p}.self_attn.v_proj.weight"] = (kv, h)
        expected[f"{p}.self_attn.o_proj.weight"] = (h, h)
        expected[f"{p}.self_attn.q_norm.weight"] = (h,)
        expected[f"{p}.self_attn.k_norm.weight"] = (kv,)
        expected[f"{p}.input_layernorm.weight"] = (h,)
        expected[f"{p}.post_attention_layernorm.weight"] = (h,)
        expected[f"{p}.mlp.gate.weight"] = (config.num_experts, h)
        for e in range(config.num_experts):
            expected[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (i, h)
            expected[f"{p}.mlp.experts.{e}.up_proj.weight"] = (i, h)
            expected[f"{p}.mlp.experts.{e}.down_proj.weight"] = (h, i)
    assert keys == expected
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)


def test_expert_split_puts_gate_rows_first(tmp_path):
    model = tiny_model(4)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    i = model.config.intermediate_size
    experts = model.model.layers[1].mlp.experts
    for e in (0, 5):
        prefix = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(stored[f"{prefix}.gate_proj.weight"], experts.gate_up_proj[e, :i])
        assert torch.equal(stored[f"{prefix}.up_proj.weight"], experts.gate_up_proj[e, i:])
        assert torch.equal(stored[f"{prefix}.down_proj.weight"], experts.down_proj[e])


# ------------------------------------------------------------------------ other libraries' files
@pytest.mark.parametrize(
    "overrides", [{}, {"num_key_value_heads": 2, "attention_bias": True}], ids=["mha", "gqa_bias"]
)
def test_loads_files_saved_by_transformers5(tmp_path, overrides):
    torch.manual_seed(5)
    theirs = transformers.OlmoeForCausalLM(reference_config(**overrides))
    randomize(theirs, 5).save_pretrained(tmp_path)

    ours = OlmoeForCausalLM.from_pretrained(tmp_path)
    their_state = theirs.state_dict()
    assert set(ours.state_dict()) == set(their_state)
    assert_same_state(ours, theirs)
    i = ours.config.intermediate_size
    stored = load_file(tmp_path / WEIGHTS_NAME)
    for layer, e in ((0, 0), (1, 7)):
        gate = stored[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"]
        up = stored[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"]
        ours_gate_up = ours.model.layers[layer].mlp.experts.gate_up_proj[e]
        assert torch.equal(ours_gate_up, torch.cat([gate, up]))
        assert ours_gate_up.shape == (2 * i, ours.config.hidden_size)


def test_transformers5_loads_our_files(tmp_path):
    model = tiny_model(6, num_key_value_heads=2)
    model.save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    theirs = transformers.OlmoeForCausalLM.from_pretrained(tmp_path)
    assert_same_state(theirs, model)


def test_loads_stacked_in_memory_layout(tmp_path):
    model = tiny_model(7)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    assert_same_state(OlmoeForCausalLM.from_pretrained(tmp_path), model)


# ---------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.bfloat16"])
def test_dtype_argument_casts_on_load(tmp_path, dtype):
    model = tiny_model(8)
    model.save_pretrained(tmp_path)
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_state(loaded, model.to(torch.bfloat16))
    assert loaded.config.extra["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [None, "auto"])
def test_no_dtype_keeps_the_stored_one(tmp_path, dtype):
    model = tiny_model(9).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert {d for _, _, d in file_keys(tmp_path).values()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_state(loaded, model)


@pytest.mark.parametrize("dtype", ["int8", "banana", torch.int64, 3])
def test_bad_dtype_raises(tmp_path, dtype):
    tiny_model(10).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="dtype"):
        OlmoeForCausalLM.from_pretrained(tmp_path, dtype=dtype)


# ---------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model(11, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "a")
    assert "lm_head.weight" not in file_keys(tmp_path / "a")

    loaded = OlmoeForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded), logits(model))

    loaded.save_pretrained(tmp_path / "b")
    assert directory_bytes(tmp_path / "b") == directory_bytes(tmp_path / "a")


def test_tied_checkpoint_with_a_stored_lm_head_copy_loads(tmp_path):
    model = tiny_model(12, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    rewrite_weights(
        tmp_path / WEIGHTS_NAME,
        lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()),
    )
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(loaded, model)


def test_tied_bf16_load_keeps_the_tie(tmp_path):
    model = tiny_model(13, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


# ---------------------------------------------------------------------------- errors
def test_checkpoint_error_is_exported():
    import olmoe

    assert olmoe.CheckpointError is olmoe.checkpoint.CheckpointError is olmoe.errors.CheckpointError
    assert issubclass(CheckpointError, OlmoeError) and issubclass(CheckpointError, ValueError)


def test_missing_tensor_is_named(tmp_path):
    tiny_model(14).save_pretrained(tmp_path)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite_weights(tmp_path / WEIGHTS_NAME, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing") as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    assert key in str(info.value)


def test_unexpected_tensor_is_named(tmp_path):
    tiny_model(15).save_pretrained(tmp_path)
    key = "model.layers.0.mlp.experts.8.gate_proj.weight"  # tiny has experts 0..7
    rewrite_weights(tmp_path / WEIGHTS_NAME, lambda t: t.__setitem__(key, torch.zeros(16, 32)))
    with pytest.raises(CheckpointError, match="unexpected") as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    assert key in str(info.value)


def test_config_disagreeing_with_weights_names_key_and_both_shapes(tmp_path):
    tiny_model(16).save_pretrained(tmp_path)  # intermediate_size 16
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in message
    assert "(16, 32)" in message and "(8, 32)" in message
    assert WEIGHTS_NAME in message


def test_mis_shaped_tensor_names_key_and_both_shapes(tmp_path):
    tiny_model(17).save_pretrained(tmp_path)
    key = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(tmp_path / WEIGHTS_NAME, lambda t: t.__setitem__(key, torch.zeros(32, 31)))
    with pytest.raises(CheckpointError) as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert key in message and "(32, 31)" in message and "(32, 32)" in message


def test_pickled_weights_are_refused_without_unpickling(tmp_path, monkeypatch):
    model = tiny_model(18)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not be called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="safetensors") as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    assert "pytorch_model.bin" in str(info.value)


def test_directory_without_weights(tmp_path):
    OlmoeConfig.tiny().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="safetensors") as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_config_json(tmp_path):
    tiny_model(19).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        OlmoeForCausalLM.from_pretrained(tmp_path)


def test_nonexistent_local_path(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(FileNotFoundError, match="no checkpoint directory") as info:
        OlmoeForCausalLM.from_pretrained(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        OlmoeForCausalLM.from_pretrained("./no-such-checkpoint-dir")


def test_revision_with_a_local_directory(tmp_path):
    tiny_model(20).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="revision"):
        OlmoeForCausalLM.from_pretrained(tmp_path, revision="main")


def test_index_referencing_a_missing_shard(tmp_path):
    tiny_model(21).save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        OlmoeForCausalLM.from_pretrained(tmp_path)
    assert shard.name in str(info.value)
    assert WEIGHTS_INDEX_NAME in str(info.value)


def test_invalid_index_json(tmp_path):
    tiny_model(22).save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    (tmp_path / WEIGHTS_INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=re.escape(WEIGHTS_INDEX_NAME)):
        OlmoeForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- crash-safe saving
def fail_after_first_file(monkeypatch):
    real_save_file = olmoe.checkpoint.save_file
    calls = []

    def flaky_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(olmoe.checkpoint, "save_file", flaky_save_file)
    return calls


def test_interrupted_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    earlier = tiny_model(23)
    earlier.save_pretrained(target)
    before = directory_bytes(target)

    calls = fail_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        tiny_model(24).save_pretrained(target, max_shard_size=SMALL_SHARD)
    assert len(calls) == 2  # the first shard was written before the failure

    assert directory_bytes(target) == before
    assert_same_state(OlmoeForCausalLM.from_pretrained(target), earlier)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    fail_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        tiny_model(25).save_pretrained(tmp_path / "ckpt", max_shard_size=SMALL_SHARD)
    assert list(tmp_path.iterdir()) == []


def test_resaving_with_fewer_shards_removes_stale_files(tmp_path):
    tiny_model(26).save_pretrained(tmp_path, max_shard_size=SMALL_SHARD)
    many = len(list(tmp_path.glob("model-*.safetensors")))
    assert many > 2

    second = tiny_model(27)
    second.save_pretrained(tmp_path, max_shard_size=4 * SMALL_SHARD)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert 1 < len(shards) < many
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert_same_state(OlmoeForCausalLM.from_pretrained(tmp_path), second)

    third = tiny_model(28)
    third.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert_same_state(OlmoeForCausalLM.from_pretrained(tmp_path), third)


def test_save_keeps_unrelated_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "README.md").write_text("notes")
    tiny_model(29).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "README.md").read_text() == "notes"


# ---------------------------------------------------------------------------- hub snapshots
REPO = "allenai/OLMoE-tiny"
MAIN_COMMIT = "1" * 40
STEP_COMMIT = "2" * 40
STEP_BRANCH = "step10000-tokens41B"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding two revisions of REPO, with the hub unreachable."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    models = {}
    for branch, commit, seed in (("main", MAIN_COMMIT, 30), (STEP_BRANCH, STEP_COMMIT, 31)):
        models[branch] = tiny_model(seed)
        models[branch].save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)

    use_offline_hub(monkeypatch, tmp_path / "hf", cache)
    return models


def test_hub_repo_id_loads_main_from_the_cache(fake_hub):
    loaded = OlmoeForCausalLM.from_pretrained(REPO)
    assert_same_state(loaded, fake_hub["main"])


def test_hub_revision_selects_an_intermediate_checkpoint(fake_hub):
    loaded = OlmoeForCausalLM.from_pretrained(REPO, revision=STEP_BRANCH)
    assert_same_state(loaded, fake_hub[STEP_BRANCH])
    by_commit = OlmoeForCausalLM.from_pretrained(REPO, revision=STEP_COMMIT)
    assert_same_state(by_commit, fake_hub[STEP_BRANCH])


def test_hub_config_only(fake_hub):
    assert OlmoeConfig.from_pretrained(REPO, revision=STEP_BRANCH) == fake_hub[STEP_BRANCH].config


def test_unknown_hub_repo_raises_oserror(fake_hub):
    with pytest.raises(OSError, match="allenai/OLMoE-missing") as info:
        OlmoeForCausalLM.from_pretrained("allenai/OLMoE-missing")
    assert type(info.value) is OSError
    assert "hub" in str(info.value)


def test_unknown_hub_revision_raises_oserror(fake_hub):
    with pytest.raises(OSError, match=re.escape(f"{REPO}@step1-tokens0B")):
        OlmoeForCausalLM.from_pretrained(REPO, revision="step1-tokens0B")


def test_invalid_repo_id_raises_file_not_found(fake_hub):
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        OlmoeForCausalLM.from_pretrained("not a repo id!")


# ---------------------------------------------------------------------------- peak memory
# Runs in a fresh interpreter: loads a tiny checkpoint first (so one-time costs such as torch's
# meta-device kernels are in the baseline), resets the resident-set high-water mark, loads the
# big checkpoint and prints how far the high-water mark rose.
_MEASURE_LOAD = textwrap.dedent(
    """
    import re, sys
    from olmoe import OlmoeForCausalLM

    def high_water_mark():
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024

    OlmoeForCausalLM.from_pretrained(sys.argv[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass  # then the baseline is the earlier peak: a laxer check, never a false failure
    baseline = high_water_mark()
    model = OlmoeForCausalLM.from_pretrained(sys.argv[2])
    print(high_water_mark() - baseline)
    """
)


@pytest.mark.parametrize("cutoff", [3.0, None])
def test_loading_initialises_nothing_and_imports_no_compiler(tmp_path, cutoff):
    """from_pretrained builds the model on the meta device and reads every value in: a random
    normal_ there (nn.Embedding's own, or init_weights' without a cutoff) would import
    torch._dynamo, seconds of every command's start."""
    tiny_model(3).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "init_cutoff_factor": cutoff}))
    load = f"import olmoe; olmoe.OlmoeForCausalLM.from_pretrained({str(tmp_path)!r})"
    assert modules_imported_by(load, ["torch._dynamo"]) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux /proc")
def test_loading_peak_memory_is_near_the_weights_size(tmp_path):
    tiny_model(32).save_pretrained(tmp_path / "warmup")
    # ~107 MB of float32 weights: large next to interpreter noise, still a second to build.
    config = OlmoeConfig.tiny(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_hidden_layers=4,
        num_experts=16,
        num_experts_per_tok=2,
    )
    torch.manual_seed(33)
    OlmoeForCausalLM(config).save_pretrained(tmp_path / "big", max_shard_size="40MB")
    weights = config.num_parameters() * 4
    assert weights > 100e6

    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_LOAD, str(tmp_path / "warmup"), str(tmp_path / "big")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    # The model's storage is allocated once and each tensor is read straight into it: no second
    # copy of the weights, and no memory-mapped file pages counted as resident.
    budget = 1.15 * weights + 16 * 2**20
    assert growth < budget, f"loading grew the resident set by {growth / 1e6:.0f} MB"
    assert growth > 0.9 * weights  # the measurement sees the weights at all


def test_base_model_loads_from_causal_lm_checkpoint_and_round_trips(tmp_path):
    """OlmoeModel reads a causal-LM checkpoint (keys prefixed `model.`, lm_head skipped), and its
    own checkpoint (no prefix, as transformers writes a base model)."""
    from olmoe import OlmoeModel

    lm = tiny_model(5)
    lm.save_pretrained(tmp_path / "lm")
    base = OlmoeModel.from_pretrained(tmp_path / "lm")
    ids = torch.randint(0, lm.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = lm.model(ids).last_hidden_state
        assert torch.equal(base(ids).last_hidden_state, expected)
    base.save_pretrained(tmp_path / "base")
    with safe_open(tmp_path / "base" / "model.safetensors", framework="pt") as handle:
        assert "embed_tokens.weight" in handle.keys()
        assert "layers.0.mlp.experts.3.up_proj.weight" in handle.keys()
    again = OlmoeModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert torch.equal(again(ids).last_hidden_state, expected)


def test_truncated_weights_file_raises(tmp_path):
    tiny_model(6).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        OlmoeForCausalLM.from_pretrained(tmp_path)


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    """Staging must not leave the checkpoint private to its writer (mkdtemp's 0700)."""
    umask = os.umask(0o022)
    try:
        tiny_model(7).save_pretrained(tmp_path / "ckpt", max_shard_size=SMALL_SHARD)
    finally:
        os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    for file in (tmp_path / "ckpt").iterdir():
        assert file.stat().st_mode & 0o777 == 0o644, file.name
