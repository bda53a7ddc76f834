"""OlmoeConfig: transformers' field names and defaults, both config.json generations, presets,
parameter counts and validation messages."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from olmoe import OlmoeConfig, OlmoeForCausalLM
from olmoe.config import DESIGN_SWITCHES, PRESETS
from olmoe.errors import ConfigError

# transformers' documented OlmoeConfig signature (the released checkpoints' config.json keys).
DOCUMENTED_DEFAULTS = {
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-05,
    "use_cache": True,
    "pad_token_id": 1,
    "bos_token_id": None,
    "eos_token_id": 50279,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "num_experts_per_tok": 8,
    "num_experts": 64,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.01,
    "norm_topk_prob": False,
}

# The config.json of allenai/OLMoE-1B-7B-0924, as transformers 4 wrote it.
RELEASED_CONFIG_JSON = {
    "architectures": ["OlmoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "eos_token_id": 50279,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "model_type": "olmoe",
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "pad_token_id": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 50304,
}

RELEASED_PARAMETERS = 6_919_161_856
RELEASED_ACTIVE_PARAMETERS = 1_282_017_280

# What transformers must read back from our config.json exactly as we meant it.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "norm_topk_prob",
    "rms_norm_eps",
)

ROPE_VARIANTS = {
    "default": (10000.0, None),
    "linear": (50000.0, {"type": "linear", "factor": 2.0}),
    "dynamic": (500000.0, {"type": "dynamic", "factor": 4.0}),
}


def write_json(path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------------- fields and defaults
def test_fields_are_transformers_documented_ones_then_the_design_switches():
    fields = [f.name for f in dataclasses.fields(OlmoeConfig)]
    assert set(fields) == set(DOCUMENTED_DEFAULTS) | set(DESIGN_SWITCHES)
    assert fields[-len(DESIGN_SWITCHES) :] == list(DESIGN_SWITCHES)


def test_dataclass_defaults_are_the_documented_ones():
    config = OlmoeConfig()
    assert {name: getattr(config, name) for name in DOCUMENTED_DEFAULTS} == {
        **DOCUMENTED_DEFAULTS, "num_key_value_heads": 16
    }  # fmt: skip
    assert {name: getattr(config, name) for name in DESIGN_SWITCHES} == DESIGN_SWITCHES


def test_num_key_value_heads_none_resolves_to_num_attention_heads():
    assert OlmoeConfig().num_key_value_heads == 16
    assert OlmoeConfig.tiny(num_attention_heads=8).num_key_value_heads == 8
    assert OlmoeConfig.tiny(num_key_value_heads=2).num_key_value_heads == 2


def test_defaults_match_transformers_olmoe_config():
    ours, theirs = OlmoeConfig(), transformers.OlmoeConfig()
    # transformers 5 folds rope_theta/rope_scaling into rope_parameters (and aliases
    # rope_scaling to it): compared below through what we write for it.
    shared = [
        f.name
        for f in dataclasses.fields(OlmoeConfig)
        if f.name not in ("rope_theta", "rope_scaling") and hasattr(theirs, f.name)
    ]
    assert len(shared) == len(DOCUMENTED_DEFAULTS) - 2, "transformers renamed a field"
    for name in shared:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.to_dict()["rope_parameters"] == dict(theirs.rope_parameters)


# ---------------------------------------------------------------------------- reading config.json
def test_reads_released_transformers4_config_as_the_released_preset(tmp_path):
    write_json(tmp_path / "config.json", RELEASED_CONFIG_JSON)
    config = OlmoeConfig.from_json_file(tmp_path / "config.json")
    assert config == OlmoeConfig.olmoe_1b_7b()
    assert config.extra == {"torch_dtype": "bfloat16"}  # architectures etc. are regenerated


def test_reads_transformers4_style_rope_scaling(tmp_path):
    data = {
        **RELEASED_CONFIG_JSON,
        "rope_theta": 250000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    write_json(tmp_path / "config.json", data)
    config = OlmoeConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 250000.0
    assert config.rope_scaling == {"type": "linear", "factor": 2.0}
    assert config.extra["torch_dtype"] == "bfloat16"
    assert "architectures" not in config.extra and "model_type" not in config.extra


def test_reads_transformers5_style_rope_parameters(tmp_path):
    v4_only = ("rope_theta", "rope_scaling", "torch_dtype")
    data = {k: v for k, v in RELEASED_CONFIG_JSON.items() if k not in v4_only}
    data["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 4.0}
    data["dtype"] = "bfloat16"
    data["transformers_version"] = "5.23.0"
    write_json(tmp_path / "config.json", data)
    config = OlmoeConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"type": "dynamic", "factor": 4.0}
    assert config.extra == {"dtype": "bfloat16"}


def test_rope_parameters_win_over_stale_transformers4_keys():
    config = OlmoeConfig.from_dict(
        {
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        }
    )
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is None


def test_reads_num_local_experts_alias():
    assert OlmoeConfig.from_dict({"num_local_experts": 32}).num_experts == 32


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    data = {**RELEASED_CONFIG_JSON, "my_tool_setting": 3, "nested": {"a": [1, 2]}}
    config = OlmoeConfig.from_dict(data)
    assert config.extra["my_tool_setting"] == 3
    assert config.to_dict()["my_tool_setting"] == 3
    config.save_pretrained(tmp_path)
    again = OlmoeConfig.from_pretrained(tmp_path)
    assert again.extra["my_tool_setting"] == 3
    assert again.extra["nested"] == {"a": [1, 2]}
    assert again == config


def test_from_dict_does_not_modify_its_argument():
    data = {"rope_parameters": {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}}
    snapshot = json.loads(json.dumps(data))
    OlmoeConfig.from_dict(data)
    assert data == snapshot


# ---------------------------------------------------------------------------- writing config.json
@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_saved_config_loads_in_transformers5(tmp_path, rope):
    theta, scaling = ROPE_VARIANTS[rope]
    ours = OlmoeConfig.tiny(rope_theta=theta, rope_scaling=scaling, num_key_value_heads=2)
    ours.save_pretrained(tmp_path)
    theirs = transformers.OlmoeConfig.from_pretrained(tmp_path)

    params = theirs.rope_parameters
    assert params["rope_theta"] == theta
    assert params["rope_type"] == rope
    if scaling is not None:
        assert params["factor"] == scaling["factor"]
    for name in SIZE_FIELDS:
        assert getattr(theirs, name) == getattr(ours, name), name


@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_transformers5_written_config_loads_in_ours(tmp_path, rope):
    theta, scaling = ROPE_VARIANTS[rope]
    rope_parameters = {"rope_type": rope, "rope_theta": theta}
    if scaling is not None:
        rope_parameters["factor"] = scaling["factor"]
    transformers.OlmoeConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        rope_parameters=rope_parameters,
    ).save_pretrained(tmp_path)
    ours = OlmoeConfig.from_pretrained(tmp_path)
    assert ours.rope_theta == theta
    assert ours.rope_scaling == scaling
    assert (ours.hidden_size, ours.num_key_value_heads, ours.intermediate_size) == (64, 2, 32)


@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_round_trip_ours_to_ours(tmp_path, rope):
    theta, scaling = ROPE_VARIANTS[rope]
    config = OlmoeConfig.tiny(
        rope_theta=theta,
        rope_scaling=scaling,
        num_key_value_heads=1,
        attention_bias=True,
        clip_qkv=8.0,
        norm_topk_prob=True,
        tie_word_embeddings=True,
        eos_token_id=[0, 5],
        bos_token_id=2,
    )
    assert OlmoeConfig.from_dict(config.to_dict()) == config
    assert OlmoeConfig.from_dict(json.loads(config.to_json_string())) == config
    config.save_pretrained(tmp_path)
    assert OlmoeConfig.from_pretrained(tmp_path) == config


def test_to_dict_writes_both_transformers_generations_keys():
    scaling = {"type": "linear", "factor": 2.0}
    data = OlmoeConfig.tiny(rope_theta=20000.0, rope_scaling=scaling).to_dict()
    assert data["model_type"] == "olmoe"
    assert data["architectures"] == ["OlmoeForCausalLM"]
    assert data["rope_theta"] == 20000.0  # transformers 4
    assert data["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert data["rope_parameters"] == {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}


def test_rope_scaling_rope_type_spelling_is_normalised():
    config = OlmoeConfig.tiny(rope_scaling={"rope_type": "dynamic", "factor": 3.0})
    assert config.rope_scaling == {"type": "dynamic", "factor": 3.0}


# ---------------------------------------------------------------------------- presets
def test_released_preset_is_defaults_with_intermediate_1024():
    released = OlmoeConfig.olmoe_1b_7b()
    assert released.intermediate_size == 1024
    for name, default in DOCUMENTED_DEFAULTS.items():
        if name not in ("intermediate_size", "num_key_value_heads"):
            assert getattr(released, name) == default, name
    assert released.num_key_value_heads == released.num_attention_heads == 16
    assert released.head_dim == 128
    assert PRESETS["OLMoE-1B-7B-0924"]() == released


def test_tiny_preset_validates_and_takes_overrides():
    tiny = OlmoeConfig.tiny()
    tiny.validate()
    assert tiny.num_experts_per_tok < tiny.num_experts
    assert tiny.hidden_size % tiny.num_attention_heads == 0
    assert OlmoeConfig.tiny(hidden_size=64).hidden_size == 64
    assert PRESETS["tiny"]() == tiny


# ---------------------------------------------------------------------------- parameter counts
def test_num_parameters_of_the_released_shape():
    released = OlmoeConfig.olmoe_1b_7b()
    assert released.num_parameters() == RELEASED_PARAMETERS
    assert released.num_parameters(active_only=True) == RELEASED_ACTIVE_PARAMETERS


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_key_value_heads": 2},
        {"num_key_value_heads": 1},
        {"attention_bias": True},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 2, "attention_bias": True, "tie_word_embeddings": True},
    ],
    ids=["mha", "gqa", "mqa", "bias", "tied", "all"],
)
def test_num_parameters_matches_a_built_model(overrides):
    config = OlmoeConfig.tiny(**overrides)
    model = OlmoeForCausalLM(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == config.num_parameters()


def test_active_parameters_count_only_routed_experts():
    config = OlmoeConfig.tiny()
    h, i = config.hidden_size, config.intermediate_size
    idle = config.num_experts - config.num_experts_per_tok
    expected = config.num_parameters() - config.num_hidden_layers * idle * 3 * h * i
    assert config.num_parameters(active_only=True) == expected


def test_released_shape_on_meta_device_has_the_released_count():
    with torch.device("meta"):
        model = OlmoeForCausalLM(OlmoeConfig.olmoe_1b_7b())
    assert model.lm_head.weight.is_meta
    assert model.num_parameters() == RELEASED_PARAMETERS


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 30}, "num_attention_heads"),  # 30 % 4
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts": 8, "num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 1.0}}, "rope_scaling factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "rope_scaling factor"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling factor"),
        ({"rope_scaling": "linear"}, "rope_scaling"),
        ({"rope_scaling": ["linear", 2.0]}, "rope_scaling"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_experts": -1}, "num_experts"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"intermediate_size": -16}, "intermediate_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"hidden_size": 32.0}, "hidden_size"),
        ({"hidden_size": True}, "hidden_size"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"hidden_act": "tanh"}, "hidden_act"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"clip_qkv": 0.0}, "clip_qkv"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"eos_token_id": [0, -2]}, "eos_token_id"),
    ],
)
def test_invalid_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        OlmoeConfig.tiny(**overrides)


def test_hidden_not_divisible_by_heads_names_both_fields():
    with pytest.raises(ConfigError) as info:
        OlmoeConfig.tiny(hidden_size=30, num_attention_heads=4)
    assert "hidden_size (30)" in str(info.value)
    assert "num_attention_heads (4)" in str(info.value)


def test_validate_catches_values_changed_after_construction():
    config = OlmoeConfig.tiny()
    config.num_experts_per_tok = config.num_experts + 1
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        config.validate()


def test_from_dict_validates():
    with pytest.raises(ConfigError, match="hidden_size"):
        OlmoeConfig.from_dict({"hidden_size": 0})


def test_from_dict_rejects_other_model_types():
    with pytest.raises(ConfigError, match="model_type") as info:
        OlmoeConfig.from_dict({**RELEASED_CONFIG_JSON, "model_type": "llama"})
    assert "llama" in str(info.value)


def test_from_json_file_rejects_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 2048,')
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        OlmoeConfig.from_json_file(path)
    assert str(path) in str(info.value)


def test_from_json_file_rejects_a_non_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object"):
        OlmoeConfig.from_json_file(path)
