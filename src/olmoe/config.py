"""`OlmoeConfig`: the model's shape and behaviour, with the Hugging Face `config.json` field names.

The dataclass fields and their defaults are exactly those of transformers' `OlmoeConfig`, so a
`config.json` written by either library reads in the other. Two generations of that file exist:
transformers 4 (what the released checkpoints carry) writes `rope_theta`, `rope_scaling` and
`torch_dtype`; transformers 5 writes `rope_parameters` and `dtype`. Both read here, and
`to_dict()` writes both sets of keys so that either transformers major version loads our files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from olmoe.errors import ConfigError
from olmoe.fileio import write_atomic

CONFIG_NAME = "config.json"
MODEL_TYPE = "olmoe"
ROPE_SCALING_TYPES = ("linear", "dynamic")
# Activations the experts accept, as transformers names them in `hidden_act`.
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")

# Keys that belong to the file rather than to the model; `to_dict` writes them fresh.
_GENERATED_KEYS = ("model_type", "architectures", "transformers_version", "rope_parameters")


@dataclass
class OlmoeConfig:
    vocab_size: int = 50304
    hidden_size: int = 2048
    intermediate_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-05
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 50279
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        # Keys of a config.json that have no field here (`torch_dtype`, a third-party tool's
        # settings...): kept by `from_dict` and written back by `to_dict`, never an error. An
        # attribute rather than a field, so the fields stay exactly transformers' own.
        self.extra: dict[str, Any] = {}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count from the shape alone (no model needed).

        `active_only` counts what one token touches: everything but the experts it is not routed
        to. The whole embedding matrix and lm_head are included, as the OLMoE paper counts them.
        """
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        kv = self.num_key_value_heads * self.head_dim
        bias = self.attention_bias
        attention = 2 * h * h + 2 * h * kv + (2 * h + 2 * kv if bias else 0) + h + kv  # + q/k norms
        experts_used = e if not active_only else self.num_experts_per_tok
        moe = h * e + experts_used * 3 * h * i
        layer = attention + moe + 2 * h  # + the two block norms
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + h  # + final norm

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ValueError` naming the offending field and what to change."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "num_experts",
            "num_experts_per_tok",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "initializer_range", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): choose a head count that divides it"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head dimension hidden_size / num_attention_heads = {self.head_dim} must be even "
                "for rotary embeddings: change hidden_size or num_attention_heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}): choose a divisor of it "
                "(1 for multi-query attention, num_attention_heads for full multi-head)"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts "
                f"({self.num_experts}): lower num_experts_per_tok or add experts"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported: "
                f"use one of {SUPPORTED_ACTIVATIONS}"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(
                f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}"
            )
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError(f"clip_qkv must be None or a positive number, got {self.clip_qkv!r}")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(
                f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef!r}"
            )
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ConfigError(f"{name} must be None or a non-negative integer, got {value!r}")
        eos = self.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(isinstance(t, int) and t >= 0 for t in eos_ids):
            raise ConfigError(
                f"eos_token_id must be None, a non-negative integer or a list of them, got {eos!r}"
            )

    # ------------------------------------------------------------------ dict / json
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OlmoeConfig:
        """Build from a config.json dictionary of either transformers generation."""
        data = copy.deepcopy(dict(data))
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"config model_type is {model_type!r}, not {MODEL_TYPE!r}: this is not an OLMoE "
                "checkpoint"
            )
        if "num_local_experts" in data and "num_experts" not in data:
            data["num_experts"] = data.pop("num_local_experts")  # transformers' attribute alias
        rope_parameters = data.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            # transformers 5 keeps theta and scaling in one dict; it wins over stale v4 keys.
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if "rope_theta" in rope_parameters:
                data["rope_theta"] = rope_parameters["rope_theta"]
            if rope_type == "default":
                data["rope_scaling"] = None
            else:
                data["rope_scaling"] = {
                    k: v for k, v in rope_parameters.items() if k not in ("rope_theta",)
                }
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in names})
        config.extra = {
            k: v for k, v in data.items() if k not in names and k not in _GENERATED_KEYS
        }
        return config

    def to_dict(self) -> dict[str, Any]:
        """A config.json dictionary that transformers 4 and 5 both load."""
        out: dict[str, Any] = {"architectures": ["OlmoeForCausalLM"], "model_type": MODEL_TYPE}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            # transformers 5 names the kind `rope_type`; a stray `type` beside "default" would
            # read back (here) as no scaling at all.
            scaling = dict(self.rope_scaling)
            rope_parameters["rope_type"] = scaling.pop("type")
            rope_parameters.update(scaling)
        out["rope_parameters"] = rope_parameters
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> OlmoeConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}): fix or replace the file") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None
    ) -> OlmoeConfig:
        """Read `config.json` from a checkpoint directory, or from the hub for a repo id."""
        from olmoe.checkpoint import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path_or_repo_id, revision=revision, weights=False)
        return cls.from_json_file(os.path.join(directory, CONFIG_NAME))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        write_atomic(os.path.join(directory, CONFIG_NAME), self.to_json_string())

    # ------------------------------------------------------------------ presets
    @classmethod
    def olmoe_1b_7b(cls, **overrides: Any) -> OlmoeConfig:
        """The released OLMoE-1B-7B-0924 shape (6.9B parameters, 1.3B active)."""
        return cls(**{"intermediate_size": 1024, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> OlmoeConfig:
        """A few-thousand-parameter model with every OLMoE feature, for tests and examples."""
        settings: dict[str, Any] = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            num_experts=8,
            num_experts_per_tok=2,
            pad_token_id=1,
            eos_token_id=0,
        )
        settings.update(overrides)
        return cls(**settings)


PRESETS = {"OLMoE-1B-7B-0924": OlmoeConfig.olmoe_1b_7b, "tiny": OlmoeConfig.tiny}


def _normalise_rope_scaling(scaling: Any) -> dict[str, Any]:
    """Accept `{"type" or "rope_type": "linear" | "dynamic", "factor": > 1}`; store `type`."""
    if not isinstance(scaling, dict):
        raise ConfigError(
            f"rope_scaling must be None or a dict like {{'type': 'linear', 'factor': 2.0}}, "
            f"got {scaling!r}"
        )
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if rope_type not in ROPE_SCALING_TYPES:
        raise ConfigError(
            f"rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {rope_type!r}: "
            "set rope_scaling={'type': 'linear', 'factor': 2.0} or None"
        )
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ConfigError(
            f"rope_scaling factor must be a number greater than 1, got {factor!r}: "
            "set e.g. rope_scaling={'type': '" + rope_type + "', 'factor': 2.0}"
        )
    return {"type": rope_type, **scaling}
