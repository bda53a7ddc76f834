"""Weight-only quantisation of the experts and the LM head: int8 and group-wise int4.

`quantize_model(model, "int8")` replaces, in place and one layer at a time, the experts and the
LM head with int8 versions: symmetric, one float32 scale per output row (`w ~ scale * q`,
`|q| <= 127`, `scale = max|w| / 127`). Decoding then reads about 0.6x the bytes of bf16 per token.

`quantize_model(model, "int4")` stores the experts and the attention projections in 4 bits and
the LM head in int8: one float16 scale per group of 32 consecutive inputs (`w ~ scale * q`, `-8 <= q <= 7`, the scale of either sign), chosen per
group to minimise the squared rounding error (a search over candidate scales, then a
least-squares refit): on Gaussian weights its error is 6% below llama.cpp's Q4_0 rule (the
largest-magnitude weight maps to -8). That is 4.5 bits per weight; the
model reads about 0.3x the bytes of bf16 per token. Each row is padded with zeros to a multiple
of 512 inputs and stored in the order the decode kernel reads (`pack_int4`'s doc). The LM head
stays at 8 bits because at 4 it cost the trained quickstart model 1.5% perplexity, against 0.1%
for 4-bit experts and attention together (docs/inference.md; llama.cpp's Q4 types likewise keep
their output matrix at 6 bits).

The embedding, the router and the norms keep their dtype everywhere: the router decides the
experts, and a token reads one embedding row. int8 keeps attention too: behind full-width
QK-norm a small error in q or k moves the softmax a lot (bench/quantization_accuracy.py).

The modules here are the reference: they dequantise and multiply in PyTorch. The CPU engine
(olmoe.engine) multiplies the quantised weights directly in native kernels.

On disk (`save_pretrained`) each quantised weight keeps its hub key (int8 data, or uint8 bytes
holding two int4 values each) and gains a `<key>_scale` tensor; config.json records
`quantization_config`. Such checkpoints load in olmoe directly in their quantised form (peak
memory near the quantised bytes); transformers does not read them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from olmoe.errors import ConfigError
from olmoe.formats import QUANTIZE_CHOICES
from olmoe.moe import ACTIVATIONS, OlmoeExperts

QUANT_METHOD = "olmoe-int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True,
                       "group": "output_channel"}  # fmt: skip
INT4_GROUP = 32  # inputs per float16 scale
INT4_BLOCK = 512  # inputs per block of the stored order; rows are padded to a multiple of it
INT4_QUANTIZATION_CONFIG = {"quant_method": "olmoe-int4", "bits": 4, "symmetric": True,
                            "group_size": INT4_GROUP, "block": INT4_BLOCK,
                            "modules": {"experts": "int4", "attention": "int4",
                                        "lm_head": "int8"}}  # fmt: skip
# quantize_model's method name for each quant_method a checkpoint may record.
QUANT_METHODS = {QUANT_METHOD: "int8", INT4_QUANTIZATION_CONFIG["quant_method"]: "int4"}
# Candidate scales per int4 group, as max|w| / divisor; the best then gets a least-squares refit.
_INT4_DIVISORS = torch.linspace(6.5, 8.5, 9).tolist()


# ---------------------------------------------------------------------------- int8
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales (one per row) for a (..., N, K) weight."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=-1)  # (..., N)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


# ---------------------------------------------------------------------------- int4
def int4_padded(in_features: int) -> int:
    """Inputs per stored int4 row: `in_features` rounded up to a multiple of INT4_BLOCK."""
    return -(-in_features // INT4_BLOCK) * INT4_BLOCK


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 bytes (..., N, Kp / 2) uint8 and float16 scales (..., N, Kp / 32) for a
    (..., N, K) weight; Kp = int4_padded(K), the padding zeros."""
    w = weight.detach().float()
    k = w.shape[-1]
    w = F.pad(w, (0, int4_padded(k) - k)).unflatten(-1, (-1, INT4_GROUP))  # (..., N, G, 32)
    # The group's largest-magnitude value, with its sign: a scale of either sign maps it to
    # -8 or +7 (or near), and a negative scale lets the far side use all 8 negative levels.
    extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))
    best_scale, best_error = extreme, torch.full_like(extreme, float("inf"))
    for divisor in _INT4_DIVISORS:
        for scale in (extreme / -divisor, extreme / divisor):
            error = _int4_error(w, scale)
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.where(better, error, best_error)
    q = _int4_round(w, best_scale)
    refit = (w * q).sum(-1, keepdim=True) / (q * q).sum(-1, keepdim=True).clamp(min=1)
    refit_better = _int4_error(w, refit) < best_error
    scale = torch.where(refit_better, refit, best_scale)
    # float16 scales, and the values rounded with exactly the stored scale; an all-zero group
    # gets scale 0 (its values dequantise to zero whatever they are).
    scale = scale.clamp(max=torch.finfo(torch.float16).max).half()
    q = _int4_round(w, scale.float())
    return pack_int4(q.flatten(-2).to(torch.int8)), scale.squeeze(-1)


def _int4_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    return torch.round(w / safe).clamp_(-8, 7)


def _int4_error(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w - _int4_round(w, scale) * scale).square().sum(-1, keepdim=True)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (..., Kp) in [-8, 7] as bytes (..., Kp / 2) in the decode kernel's order.

    Each value is stored as the nibble q + 8. In each block of 512 inputs the 256 bytes are
    four chunks of 64: chunk p's low nibbles form "register" 2p and its high nibbles register
    2p + 1, and byte c of register r holds input 32 (c // 4) + 4 r + c % 4. So the kernel's
    32-bit lane l of every register holds four inputs of group l, and one VNNI dot product per
    register adds each group's products into its own lane (olmoe/engine/cpu.cpp)."""
    *lead, kp = q.shape
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)
    # (..., block, group l, register r, i) -> (..., block, r, l, i): the registers' byte order
    registers = nibbles.view(*lead, kp // INT4_BLOCK, 16, 8, 4).transpose(-3, -2)
    chunks = registers.reshape(*lead, kp // INT4_BLOCK, 4, 2, 64)  # r = 2 p + half
    return (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(*lead, kp // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int4 values (..., Kp) int8 of bytes (..., Kp / 2) written by `pack_int4`."""
    *lead, half = packed.shape
    blocks = packed.view(*lead, half // (INT4_BLOCK // 2), 4, 1, 64)
    chunks = torch.cat([blocks & 15, blocks >> 4], dim=-2)  # (..., block, p, half, 64)
    registers = chunks.reshape(*lead, -1, 8, 16, 4).transpose(-3, -2)  # (..., block, l, r, i)
    return registers.reshape(*lead, half * 2).to(torch.int8) - 8


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The (..., N, in_features) weight in `dtype` that packed int4 bytes and scales stand for:
    each value rounded once, dtype(float(q) * float(scale))."""
    q = unpack_int4(packed).unflatten(-1, (-1, INT4_GROUP)).float()
    return (q * scale.float().unsqueeze(-1)).flatten(-2)[..., :in_features].to(dtype)


# ---------------------------------------------------------------------------- modules
def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers), so that checkpoint loading and saving see them by name.
    return nn.Parameter(tensor, requires_grad=False)


class _QuantizedModule(nn.Module):
    """Keeps scales in their own dtype (float32 for int8, float16 for int4) through
    `.to(dtype)` casts, which would round them to bf16."""

    def _apply(self, fn, recurse=True):
        scales = {n: p.data for n, p in self.named_parameters(recurse=False) if n.endswith("scale")}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            param = getattr(self, name)
            if param.dtype != before.dtype:
                param.data = before.to(param.device)
        return self


class _QuantizedLinear(_QuantizedModule):
    """A quantised `nn.Linear`: a quantised `weight` and its `weight_scale`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(self.stored_shape(out_features, in_features),
                                          dtype=self.storage_dtype))  # fmt: skip
        self.weight_scale = _frozen(
            torch.ones(self.scale_shape(out_features, in_features), dtype=self.scale_dtype)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        if not linear.weight.is_meta:  # on the meta device the loader fills it from the file
            q, scale = cls.quantize(linear.weight)
            module.weight, module.weight_scale = _frozen(q), _frozen(scale)
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize(self.weight, self.weight_scale, self.in_features, x.dtype)
        return F.linear(x, weight, self.bias)


class _QuantizedExperts(_QuantizedModule):
    """Quantised `OlmoeExperts`: `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) in the
    quantised storage, with `gate_up_proj_scale` and `down_proj_scale`."""

    def __init__(self, num_experts: int, hidden: int, inter: int, hidden_act: str = "silu"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, inter
        for name, rows, cols in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            stored = torch.empty(
                num_experts, *self.stored_shape(rows, cols), dtype=self.storage_dtype
            )
            scale = torch.ones(num_experts, *self.scale_shape(rows, cols), dtype=self.scale_dtype)
            setattr(self, name, _frozen(stored))
            setattr(self, f"{name}_scale", _frozen(scale))
        self.act_fn = ACTIVATIONS[hidden_act]

    @classmethod
    def from_experts(cls, experts: OlmoeExperts, hidden_act: str):
        e, two_i, h = experts.gate_up_proj.shape
        module = cls(e, h, two_i // 2, hidden_act)
        if experts.gate_up_proj.is_meta:  # the loader fills it from the file
            return module
        # One expert at a time: a float32 copy of a whole layer would be a gigabyte.
        for name in ("gate_up_proj", "down_proj"):
            source, target = getattr(experts, name), getattr(module, name)
            scale = getattr(module, f"{name}_scale")
            for i in range(e):
                target.data[i], scale.data[i] = cls.quantize(source[i])
        return module

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        cols = self.hidden_size if name == "gate_up_proj" else self.intermediate_size
        return self.dequantize(
            getattr(self, name)[e], getattr(self, f"{name}_scale")[e], cols, dtype
        )

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        """Each expert that has tokens is dequantised on its own (one expert in the activations'
        dtype, not a whole layer in float32) and runs as two GEMMs."""
        out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)  # (T, H)
        inter = self.intermediate_size
        for e in routing.top_k_indices.unique().tolist():
            token, slot = (routing.top_k_indices == e).nonzero(as_tuple=True)  # (n,), (n,)
            h = F.linear(x[token], self.expert_weight("gate_up_proj", e, x.dtype))  # (n, 2I)
            act = self.act_fn(h[:, :inter]) * h[:, inter:]  # (n, I)
            y = F.linear(act, self.expert_weight("down_proj", e, x.dtype))
            out.index_add_(0, token, (y * routing.top_k_weights[token, slot].unsqueeze(-1)).float())
        return out.to(x.dtype)


class _Int8Storage:
    """int8, one float32 scale per output row."""

    storage_dtype, scale_dtype, method = torch.int8, torch.float32, "int8"

    @staticmethod
    def stored_shape(rows: int, cols: int) -> tuple[int, ...]:
        return rows, cols

    @staticmethod
    def scale_shape(rows: int, cols: int) -> tuple[int, ...]:
        return (rows,)

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(weight)

    @staticmethod
    def dequantize(q, scale, cols: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(q, scale, dtype)


class _Int4Storage:
    """Two int4 values per byte, one float16 scale per group of 32 inputs (`pack_int4`)."""

    storage_dtype, scale_dtype, method = torch.uint8, torch.float16, "int4"

    @staticmethod
    def stored_shape(rows: int, cols: int) -> tuple[int, ...]:
        return rows, int4_padded(cols) // 2

    @staticmethod
    def scale_shape(rows: int, cols: int) -> tuple[int, ...]:
        return rows, int4_padded(cols) // INT4_GROUP

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_int4(weight)

    @staticmethod
    def dequantize(packed, scale, cols: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(packed, scale, cols, dtype)


class Int8Linear(_Int8Storage, _QuantizedLinear):
    """A quantised `nn.Linear`: int8 `weight` (N, K) and float32 `weight_scale` (N,)."""


class Int8Experts(_Int8Storage, _QuantizedExperts):
    """int8 `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) with float32
    `gate_up_proj_scale` (E, 2I) and `down_proj_scale` (E, H)."""


class Int4Linear(_Int4Storage, _QuantizedLinear):
    """A quantised `nn.Linear`: packed int4 `weight` (N, Kp / 2) uint8 and float16
    `weight_scale` (N, Kp / 32), Kp = int4_padded(K)."""


class Int4Experts(_Int4Storage, _QuantizedExperts):
    """Packed int4 `gate_up_proj` (E, 2I, Hp / 2) and `down_proj` (E, H, Ip / 2) uint8 with
    float16 `gate_up_proj_scale` (E, 2I, Hp / 32) and `down_proj_scale` (E, H, Ip / 32)."""


# Per method: the experts' class, the attention projections' (None: they keep their dtype), the
# LM head's, and the config recorded.
_MODULES = {"int8": (Int8Experts, None, Int8Linear, QUANTIZATION_CONFIG),
            "int4": (Int4Experts, Int4Linear, Int8Linear, INT4_QUANTIZATION_CONFIG)}  # fmt: skip
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantization_config(method: str) -> dict:
    """What config.json's `quantization_config` records for a model quantised with `method`."""
    return copy.deepcopy(_MODULES[method][3])


def quantization_method(model: nn.Module) -> str | None:
    """The method of a quantised model ("int8" or "int4"), None for one that is not."""
    experts = getattr(model, "model", model).layers[0].mlp.experts
    return experts.method if isinstance(experts, _QuantizedExperts) else None


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Quantise `model` (OlmoeForCausalLM or OlmoeModel) in place with `method` ("int8" or
    "int4"); returns it.

    On the meta device this only swaps the modules: the checkpoint loader does that for a
    quantised checkpoint, then fills them from the file."""
    if method not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {QUANTIZE_CHOICES}, got {method!r}")
    unsupported = model.config.transformers_unsupported()
    if unsupported:
        raise ConfigError(
            f"{method} quantisation covers the released architecture; this model changes "
            f"{', '.join(unsupported)}: run it unquantised"
        )
    current = quantization_method(model)
    if current == method:
        return model
    if current is not None:
        raise ConfigError(
            f"this model is already quantised as {current}; load the unquantised checkpoint "
            f"to quantise it as {method}"
        )
    experts_class, attention_class, head_class, _ = _MODULES[method]
    base = getattr(model, "model", model)
    for layer in base.layers:
        layer.mlp.experts = experts_class.from_experts(layer.mlp.experts, model.config.hidden_act)
        for name in _PROJECTIONS if attention_class else ():
            attention = layer.self_attn
            setattr(attention, name, attention_class.from_linear(getattr(attention, name)))
    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        model.lm_head = head_class.from_linear(model.lm_head)
    model.config.extra["quantization_config"] = quantization_config(method)
    return model
