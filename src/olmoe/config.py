"""`OlmoeConfig`: the model's shape and behaviour, with the Hugging Face `config.json` field names.

The dataclass fields and their defaults are those of transformers' `OlmoeConfig`, so a
`config.json` written by either library reads in the other, followed by the OLMoE paper's design
switches (`DESIGN_SWITCHES`: shared expert, token dropping, expert choice, QK-norm, norm type,
initialisation, dense layers). Each defaults to the released architecture and is written to
config.json only when it differs, so a released model's file is unchanged; see
docs/ablations.md for what each does. Two generations of that file exist:
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
from olmoe.hub import resolve_checkpoint_dir

CONFIG_NAME = "config.json"
MODEL_TYPE = "olmoe"
ROPE_SCALING_TYPES = ("linear", "dynamic")
# Activations the experts accept, as transformers names them in `hidden_act`.
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")

# Keys that belong to the file rather than to the model; `to_dict` writes them fresh.
_GENERATED_KEYS = ("model_type", "architectures", "transformers_version", "rope_parameters")

ROUTING_CHOICES = ("token_choice", "expert_choice")
EXPERT_CHOICE_GROUPS = ("sequence", "batch")
NORM_CHOICES = ("rmsnorm", "nonparametric_layernorm")


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
    # ---- the paper's design switches (olmoe only; defaults = the released architecture)
    # An always-on SwiGLU expert of this width beside the routed ones (0: none); its output is
    # added to theirs, or with `shared_expert_weighted` mixed as shared/(K+1) + routed*K/(K+1).
    shared_expert_intermediate_size: int = 0
    shared_expert_weighted: bool = False
    # False: megablocks' token dropping, each expert keeping its first
    # int(moe_capacity_factor * K * T / E) of a micro-batch's T tokens' routing slots.
    moe_dropless: bool = True
    moe_capacity_factor: float = 1.25
    # "expert_choice": each expert takes its top (K * S) // E tokens of a sequence (S tokens) or
    # of the whole micro-batch (`expert_choice_group: batch`). A training ablation: it reads
    # future tokens, so it cannot generate.
    moe_routing: str = "token_choice"
    expert_choice_group: str = "sequence"
    qk_norm: bool = True
    # "nonparametric_layernorm": OLMo's LayerNorm without weight or bias, for every norm.
    norm_type: str = "rmsnorm"
    # Initial weights ~ normal(0, initializer_range) cut at this many standard deviations;
    # None: an untruncated normal.
    init_cutoff_factor: float | None = 3.0
    # Layers whose MLP is one dense SwiGLU of `dense_intermediate_size` (None: K * the expert
    # width, the same active compute) instead of the experts.
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    dense_intermediate_size: int | None = None

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

    @property
    def moe_layer_indices(self) -> list[int]:
        """The layers that have experts (each returns a RouterOutput), in order."""
        dense = set(self.mlp_only_layers)
        return [i for i in range(self.num_hidden_layers) if i not in dense]

    @property
    def dense_width(self) -> int:
        """The width of a dense layer's SwiGLU MLP."""
        if self.dense_intermediate_size is not None:
            return self.dense_intermediate_size
        return self.num_experts_per_tok * self.intermediate_size

    def design_changes(self) -> dict[str, Any]:
        """The design switches set off the released architecture, by name."""
        return {
            name: getattr(self, name)
            for name, default in DESIGN_SWITCHES.items()
            if getattr(self, name) != default
        }

    def transformers_unsupported(self) -> list[str]:
        """The switches transformers' OlmoeForCausalLM cannot represent (it would load such a
        checkpoint as a different model). Initialisation is not among them: it only decides
        the starting weights."""
        changed = self.design_changes()
        # Settings that only qualify another switch change nothing while that one is off.
        qualifiers = {
            "shared_expert_weighted": self.shared_expert_intermediate_size > 0,
            "moe_capacity_factor": not self.moe_dropless,
            "expert_choice_group": self.moe_routing == "expert_choice",
            "dense_intermediate_size": bool(self.mlp_only_layers),
            "init_cutoff_factor": False,
        }
        return [name for name in changed if qualifiers.get(name, True)]

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count from the shape alone (no model needed).

        `active_only` counts what one token touches: everything but the experts it is not routed
        to. The whole embedding matrix and lm_head are included, as the OLMoE paper counts them.
        """
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        kv = self.num_key_value_heads * self.head_dim
        bias = self.attention_bias
        norm = h if self.norm_type == "rmsnorm" else 0  # a norm's weight
        qk_norms = (h + kv) * (norm > 0) if self.qk_norm else 0
        attention = 2 * h * h + 2 * h * kv + (2 * h + 2 * kv if bias else 0) + qk_norms
        experts_used = e if not active_only else self.num_experts_per_tok
        moe = h * e + experts_used * 3 * h * i + 3 * h * self.shared_expert_intermediate_size
        moe_layers = len(self.moe_layer_indices)
        dense_layers = self.num_hidden_layers - moe_layers
        blocks = self.num_hidden_layers * (attention + 2 * norm) + moe_layers * moe
        blocks += dense_layers * 3 * h * self.dense_width
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return blocks + embeddings + norm  # + final norm

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
        self._validate_design_switches()
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

    def _validate_design_switches(self) -> None:
        for name, choices in (
            ("moe_routing", ROUTING_CHOICES),
            ("expert_choice_group", EXPERT_CHOICE_GROUPS),
            ("norm_type", NORM_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("qk_norm", "moe_dropless", "shared_expert_weighted"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        size = self.shared_expert_intermediate_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(
                f"shared_expert_intermediate_size must be 0 (no shared expert) or a positive "
                f"integer, got {size!r}"
            )
        dense = self.dense_intermediate_size
        if dense is not None and (
            isinstance(dense, bool) or not isinstance(dense, int) or dense <= 0
        ):
            raise ConfigError(
                f"dense_intermediate_size must be null or a positive integer, got {dense!r}"
            )
        factor = self.moe_capacity_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
            raise ConfigError(
                f"moe_capacity_factor must be a number >= 0 (0: no dropping), got {factor!r}"
            )
        cutoff = self.init_cutoff_factor
        if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, (int, float))
                                   or cutoff <= 0):  # fmt: skip
            raise ConfigError(
                f"init_cutoff_factor must be null (a plain normal) or a positive number of "
                f"standard deviations, got {cutoff!r}"
            )
        layers = self.mlp_only_layers
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers
            for i in layers
        ):
            raise ConfigError(
                f"mlp_only_layers must be a list of layer indices in [0, {self.num_hidden_layers})"
                f", got {layers!r}"
            )
        if len(set(layers)) != len(layers):
            raise ConfigError(f"mlp_only_layers lists a layer twice: {layers!r}")

    # ------------------------------------------------------------------ dict / json
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OlmoeConfig:
        """Build from a config.json dictionary of either transformers generation."""
        data = copy.deepcopy(dict(data))
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type == OLMO_MODEL_TYPE:
            data = _olmo_as_olmoe(data)
        elif model_type != MODEL_TYPE:
            raise ConfigError(
                f"config model_type is {model_type!r}, not {MODEL_TYPE!r} or "
                f"{OLMO_MODEL_TYPE!r}: this is not an OLMoE or OLMo checkpoint"
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

    @property
    def is_dense_olmo(self) -> bool:
        """Whether this is a dense OLMo model (transformers' OlmoForCausalLM): no experts in any
        layer, OLMo's non-parametric LayerNorm, no QK-norm. Saved in OLMo's layout."""
        return (
            len(self.mlp_only_layers) == self.num_hidden_layers
            and self.norm_type == "nonparametric_layernorm"
            and not self.qk_norm
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dictionary that transformers 4 and 5 both load: OlmoeForCausalLM's,
        or OlmoForCausalLM's for a dense OLMo model."""
        if self.is_dense_olmo:
            out: dict[str, Any] = {"architectures": ["OlmoForCausalLM"], "model_type": "olmo"}
            out.update(self.extra)
            out.update({name: copy.deepcopy(getattr(self, name)) for name in OLMO_FIELDS})
            out["intermediate_size"] = self.dense_width
        else:
            out = {"architectures": ["OlmoeForCausalLM"], "model_type": MODEL_TYPE}
            out.update(self.extra)
            changed = self.design_changes()
            for f in dataclasses.fields(self):
                if f.name not in DESIGN_SWITCHES or f.name in changed:
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


OLMO_MODEL_TYPE = "olmo"
# transformers' OlmoConfig: these fields, with these defaults where they differ from OLMoE's.
OLMO_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "clip_qkv",
)  # fmt: skip
OLMO_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
}


def _olmo_as_olmoe(data: dict[str, Any]) -> dict[str, Any]:
    """A dense OLMo config.json (transformers' OlmoConfig) as OLMoE fields: every layer dense
    with the OLMo MLP's width, non-parametric LayerNorm, no QK-norm. The expert fields keep
    their defaults (no layer uses them); `olmoe upcycle` sets them."""
    data = {**OLMO_DEFAULTS, **data, "model_type": MODEL_TYPE}
    layers = data["num_hidden_layers"]
    data.update(
        mlp_only_layers=list(range(layers)) if isinstance(layers, int) else layers,
        dense_intermediate_size=data.pop("intermediate_size"),
        norm_type="nonparametric_layernorm",
        qk_norm=False,
    )
    return data


def _design_switches() -> dict[str, Any]:
    """Each design switch's released value: the fields after transformers' own."""
    fields = [f.name for f in dataclasses.fields(OlmoeConfig)]
    defaults = OlmoeConfig.tiny()
    return {name: getattr(defaults, name) for name in fields[fields.index("norm_topk_prob") + 1 :]}


DESIGN_SWITCHES = _design_switches()


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
