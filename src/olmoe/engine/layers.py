"""The engine's modules: subclasses of the reference modules that send the calls the native
kernels do well to them, and every other call to the reference `forward` they inherit.

This is the one place that decides which path runs. The rules:

- Decode-sized calls (at most `MAX_TOKENS` rows) on bf16 activations with no gradient recorded
  stream their weights through the native matrix-vector kernels: linear layers (bf16, int8 or
  int4), the router, RMSNorm, one query's attention, the experts.
- A prefill's or a training step's experts (bf16, more than one thread) run their GEMMs side by
  side, one expert per thread: without a gradient as one fused native pass per expert (bf16,
  int8 or int4 weights, a quantised expert dequantised by its thread), with one as an autograd
  function of grouped GEMMs (bf16 weights).
- A prefill's int4 linear layers (the attention projections) are dequantised natively, then
  one GEMM each.
- On a CPU without bf16 instructions (the AVX2 back end), where PyTorch emulates bf16 GEMMs, a
  prefill's bf16 linear layers and the router go native to be multiplied in float32 (the
  experts' GEMMs do so inside their native pass).
- The LM head's training loss in float32 (olmoe.head_loss): each chunk's logits are
  exponentiated in the native pass that computes them, never written to memory.
- Everything else (float32, float16, other activations, attention probabilities asked for) is
  the reference code itself.

The subclasses add no state and no parameters: `olmoe.engine.apply` swaps a module's class in
place, and `olmoe.engine.remove` swaps it back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from olmoe.engine import native
from olmoe.model import OlmoeAttention, OlmoeRMSNorm
from olmoe.moe import (
    OlmoeExperts,
    OlmoeRouter,
    RouterOutput,
    autocast_experts,
    grouped_experts,
    slots_by_expert,
)
from olmoe.quantize import Int4Experts, Int4Linear, Int8Experts, Int8Linear

# Up to this many rows a call streams its weights (the kernels); beyond it, it is a GEMM, which
# oneDNN does well.
MAX_TOKENS = 16
QUANTIZED = (torch.int8, torch.uint8)  # int8 and packed int4 weights


# ---------------------------------------------------------------------------- the rules
def decode_sized(x: torch.Tensor) -> bool:
    """At most `MAX_TOKENS` rows of the last dimension: a decode step, not a prefill."""
    return x.numel() <= MAX_TOKENS * x.shape[-1]


def records_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` goes to the streaming kernels: a few bf16 rows on the CPU, bf16,
    int8 or int4 weights in the layout the kernels read (contiguous), no gradient."""
    return (
        x.dtype == torch.bfloat16
        and (weight.dtype == torch.bfloat16 or weight.dtype in QUANTIZED)
        and weight.is_contiguous()
        and x.device.type == "cpu"
        and decode_sized(x)
        and not records_grad(x, weight)
    )


def prefill_sized(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a quantised linear layer's GEMM goes native: bf16 rows (and bias) on the CPU, no
    gradient (the kernel has no backward)."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and (bias is None or bias.dtype == torch.bfloat16)
        and not records_grad(x, *([] if bias is None else [bias]))
    )


def widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a bf16 GEMM (a prefill's linear layer) goes native to be multiplied in float32:
    on CPUs where PyTorch's bf16 GEMMs are emulated (native.bf16_gemm), bf16 operands on the
    CPU, no gradient."""
    return (
        weight.dtype == torch.bfloat16
        and prefill_sized(x, bias)
        and weight.device.type == "cpu"
        and not records_grad(weight)
        and not native.bf16_gemm()
    )


def fused_head(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the LM head loss's chunk is exponentiated in the native pass that computes its
    logits: float32 rows and weight on the CPU (no gradient is recorded inside the loss)."""
    return h.dtype == weight.dtype == torch.float32 and h.device.type == weight.device.type == "cpu"


def small_bf16(x: torch.Tensor) -> bool:
    """Whether an activation-only op (a norm, one query's attention) on `x` goes native."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()


def side_by_side(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an expert's GEMMs run one expert per thread: bf16 activations on the CPU with
    more than one thread (or any number where the native pass multiplies in float32 and
    PyTorch would emulate bf16), and bf16 weights, or quantised ones without a gradient."""
    return (
        x.dtype == torch.bfloat16
        and (weight.dtype == torch.bfloat16 or (weight.dtype in QUANTIZED and not records_grad(x)))
        and x.device.type == "cpu"
        and (torch.get_num_threads() > 1 or not native.bf16_gemm())  # one thread: see `widened`
    )


def version(tensor: torch.Tensor) -> int | None:
    """The count of in-place writes to `tensor`; None for an inference tensor (made under
    torch.inference_mode), which counts none: only a new tensor shows a change there."""
    return None if tensor.is_inference() else tensor._version


def row_sum(module: nn.Module, name: str) -> torch.Tensor:
    """The int32 row sums of an int8 weight, which the int8 kernels need; computed once and kept
    until the weight changes (a new tensor, or written in place)."""
    weight = getattr(module, name)
    key = (weight.data_ptr(), version(weight))
    cache = module.__dict__.setdefault("_engine_row_sums", {})
    if name not in cache or cache[name][0] != key:
        cache[name] = key, weight.sum(dim=-1, dtype=torch.int32)
    return cache[name][1]


def fused_experts(
    x: torch.Tensor,
    routing: RouterOutput,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SiLU experts as one native pass per expert (gather, gate/up GEMM, SiLU, down GEMM,
    routing weight), the experts side by side; the same ATen products as `grouped_experts`."""
    t, k = routing.top_k_indices.shape
    weighted = native.grouped_experts(
        x, gate_up, down, slots_by_expert(routing), routing.tokens_per_expert,
        routing.top_k_weights, scales,
    )  # fmt: skip
    return weighted.view(t, k, -1).sum(dim=1)


# ---------------------------------------------------------------------------- the modules
class CpuLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if streams(x, self.weight):
            return native.linear(x, self.weight, self.bias)
        if widened(x, self.weight, self.bias):
            return native.prefill_linear(x, self.weight, self.bias)
        return super().forward(x)

    @staticmethod
    def exp_logits(h: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor):
        """As the LM head, a chunk's exponentiated logits for the training loss
        (olmoe.head_loss.ExpLogits), where `fused_head` sends them native; else None."""
        return native.exp_logits(h, weight, shift) if fused_head(h, weight) else None


class CpuRMSNorm(OlmoeRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16 and decode_sized(x) and small_bf16(x):
            return native.rms_norm(x, self.weight, self.eps)  # one call, not eight
        return super().forward(x)


class CpuRouter(OlmoeRouter):
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if streams(x, self.weight):  # oneDNN is at its slowest at this narrow shape
            return native.linear(x, self.weight)
        if widened(x, self.weight, None):
            return native.prefill_linear(x, self.weight)
        return super().logits(x)


class CpuAttention(OlmoeAttention):
    def attend(self, q, k, v, mask, dropout: float, output_attentions: bool):
        one_query = q.shape[2] == 1 and not output_attentions and dropout == 0.0
        if one_query and small_bf16(q):  # the kernel has no dropout and no probabilities out
            return native.decode_attention(q, k, v, mask, 1 / math.sqrt(self.head_dim)), None
        return super().attend(q, k, v, mask, dropout, output_attentions)


class CpuExperts(OlmoeExperts):
    def forward(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        silu = self.act_fn is F.silu
        if silu and streams(x, self.gate_up_proj):
            return native.moe(
                x, self.gate_up_proj, self.down_proj, routing.top_k_indices, routing.top_k_weights
            )
        x, gate_up, down = autocast_experts(x, self.gate_up_proj, self.down_proj)
        if not side_by_side(x, gate_up):
            return super().forward(x, routing)
        if silu and not records_grad(x, gate_up):
            return fused_experts(x, routing, gate_up, down)
        return grouped_experts(x, routing, gate_up, down, self.act_fn, native.GroupedLinear.apply)


class CpuInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if streams(x, self.weight):
            return native.linear(
                x, self.weight, self.bias, self.weight_scale, row_sum(self, "weight")
            )
        if prefill_sized(x, self.bias):
            return native.quantized_linear(x, self.weight, self.weight_scale, self.bias)
        return super().forward(x)


class _CpuQuantizedExperts:
    """The engine's forward for quantised experts (int8 or int4); `row_sums` gives what the
    int8 kernels need beside the scales."""

    def row_sums(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None

    def forward(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        if self.act_fn is not F.silu:
            return super().forward(x, routing)
        if streams(x, self.gate_up_proj):
            gate_up_sum, down_sum = self.row_sums()
            return native.moe(
                x, self.gate_up_proj, self.down_proj, routing.top_k_indices,
                routing.top_k_weights, self.gate_up_proj_scale, gate_up_sum,
                self.down_proj_scale, down_sum,
            )  # fmt: skip
        if side_by_side(x, self.gate_up_proj):  # a prefill: each expert dequantised by its thread
            scales = (self.gate_up_proj_scale, self.down_proj_scale)
            return fused_experts(x, routing, self.gate_up_proj, self.down_proj, scales)
        return super().forward(x, routing)


class CpuInt8Experts(_CpuQuantizedExperts, Int8Experts):
    def row_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return row_sum(self, "gate_up_proj"), row_sum(self, "down_proj")


class CpuInt4Linear(Int4Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if streams(x, self.weight):
            return native.linear(x, self.weight, self.bias, self.weight_scale)
        if prefill_sized(x, self.bias):
            return native.quantized_linear(x, self.weight, self.weight_scale, self.bias)
        return super().forward(x)


class CpuInt4Experts(_CpuQuantizedExperts, Int4Experts):
    pass


# Each reference module class and the engine's class that replaces it.
ENGINE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: CpuLinear,
    OlmoeRMSNorm: CpuRMSNorm,
    OlmoeRouter: CpuRouter,
    OlmoeAttention: CpuAttention,
    OlmoeExperts: CpuExperts,
    Int8Linear: CpuInt8Linear,
    Int8Experts: CpuInt8Experts,
    Int4Linear: CpuInt4Linear,
    Int4Experts: CpuInt4Experts,
}
