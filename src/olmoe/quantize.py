"""Int8 weight-only quantisation: symmetric, one float32 scale per output channel (per expert).

`quantize_model(model)` replaces, in place and one layer at a time, the experts and the LM head
with int8 versions (`w ~ scale * q`, `|q| <= 127`, `scale = max|w| / 127` per row). The
attention projections, the embedding, the router and the norms keep their dtype: the router
decides the experts, and attention is where per-channel int8 costs accuracy (behind full-width
QK-norm a small error in q or k moves the softmax a lot; bench/int8_accuracy.py measures both).
Decoding then reads about 0.6x the bytes of bf16 per token.

The modules here are the reference: they dequantise and multiply in PyTorch. The CPU engine
(olmoe.engine) multiplies the int8 weights directly in native kernels.

On disk (`save_pretrained`) each quantised weight keeps its hub key with int8 data and gains a
`<key>_scale` tensor; config.json records `quantization_config`. Such checkpoints load in olmoe
(directly as int8: peak memory near the int8 bytes); transformers does not read them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from olmoe.errors import ConfigError
from olmoe.formats import QUANTIZE_CHOICES
from olmoe.moe import ACTIVATIONS, OlmoeExperts

QUANT_METHOD = "olmoe-int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True,
                       "group": "output_channel"}  # fmt: skip


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales (one per row) for a (..., N, K) weight."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=-1)  # (..., N)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers), so that checkpoint loading and saving see them by name.
    return nn.Parameter(tensor, requires_grad=False)


class _Int8Module(nn.Module):
    """Keeps scales in float32 through `.to(dtype)` casts, which would round them to bf16."""

    def _apply(self, fn, recurse=True):
        scales = {n: p.data for n, p in self.named_parameters(recurse=False) if n.endswith("scale")}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            param = getattr(self, name)
            if param.dtype != torch.float32:
                param.data = before.to(param.device)
        return self


class Int8Linear(_Int8Module):
    """A quantised `nn.Linear`: int8 `weight` (N, K) and float32 `weight_scale` (N,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.int8))
        self.weight_scale = _frozen(torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_rows(linear.weight)
        module.weight, module.weight_scale = _frozen(q), _frozen(scale)
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)


class Int8Experts(_Int8Module):
    """Quantised `OlmoeExperts`: int8 `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) with
    float32 `gate_up_proj_scale` (E, 2I) and `down_proj_scale` (E, H)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, hidden_act: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = _frozen(torch.empty(num_experts, 2 * inter, hidden, dtype=torch.int8))
        self.gate_up_proj_scale = _frozen(torch.ones(num_experts, 2 * inter))
        self.down_proj = _frozen(torch.empty(num_experts, hidden, inter, dtype=torch.int8))
        self.down_proj_scale = _frozen(torch.ones(num_experts, hidden))
        self.act_fn = ACTIVATIONS[hidden_act]

    @classmethod
    def from_experts(cls, experts: OlmoeExperts, hidden_act: str) -> Int8Experts:
        e, two_i, h = experts.gate_up_proj.shape
        module = cls(e, h, two_i // 2, hidden_act)
        # One expert at a time: a float32 copy of a whole layer would be a gigabyte.
        for name in ("gate_up_proj", "down_proj"):
            source = getattr(experts, name)
            q = torch.empty(source.shape, dtype=torch.int8, device=source.device)
            scale = torch.empty(source.shape[:2], device=source.device)
            for i in range(e):
                q[i], scale[i] = quantize_rows(source[i])
            setattr(module, name, _frozen(q))
            setattr(module, f"{name}_scale", _frozen(scale))
        return module

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        """Each expert that has tokens is dequantised on its own (one expert in the activations'
        dtype, not a whole layer in float32) and runs as two GEMMs."""
        t, k = routing.top_k_indices.shape
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)  # (T, H)
        inter = self.down_proj.shape[2]
        for e in routing.top_k_indices.unique().tolist():
            token, slot = (routing.top_k_indices == e).nonzero(as_tuple=True)  # (n,), (n,)
            gate_up = dequantize(self.gate_up_proj[e], self.gate_up_proj_scale[e], x.dtype)
            h = F.linear(x[token], gate_up)  # (n, 2I)
            act = self.act_fn(h[:, :inter]) * h[:, inter:]  # (n, I)
            down = dequantize(self.down_proj[e], self.down_proj_scale[e], x.dtype)
            y = F.linear(act, down) * routing.top_k_weights[token, slot].unsqueeze(-1)  # (n, H)
            out.index_add_(0, token, y.float())
        return out.to(x.dtype)


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Quantise `model` (OlmoeForCausalLM or OlmoeModel) in place; returns it.

    On the meta device this only swaps the modules: the checkpoint loader does that for an int8
    checkpoint, then fills them from the file."""
    if method not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {QUANTIZE_CHOICES}, got {method!r}")
    unsupported = model.config.transformers_unsupported()
    if unsupported:
        raise ConfigError(
            f"int8 quantisation covers the released architecture; this model changes "
            f"{', '.join(unsupported)}: run it unquantised"
        )
    base = getattr(model, "model", model)
    if isinstance(base.layers[0].mlp.experts, Int8Experts):
        return model  # already int8
    for layer in base.layers:
        layer.mlp.experts = Int8Experts.from_experts(layer.mlp.experts, model.config.hidden_act)
    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    model.config.extra["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return model
