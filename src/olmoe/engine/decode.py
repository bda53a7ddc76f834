"""A decode step's layers in one native call.

Between two layers of a decode step, Python runs in caches that the previous layer's weights
have flushed; one native call for all layers (cpu.cpp's `decode_layers`) removes that time. It
runs the same operations with the same roundings as the layers' per-module path (the tests
compare bit for bit), and applies where every layer can: bf16 weights (int8 or int4 experts and
int4 attention allowed), no attention bias, SiLU experts, inference.

The plan, each layer's `LayerWeights`, is gathered once and kept beside the model (not on it)
while every module and parameter it was read from is still in place: a replaced parameter or
module is seen at the next step, without hooks. A cast or a move changes the tensors
themselves, which the kernel checks (dtypes, devices, layout) before it writes anything.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from olmoe.engine import native
from olmoe.engine.layers import row_sum, version
from olmoe.model import OlmoeModel
from olmoe.moe import RouterOutput, route


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, in the order cpu.cpp's `decode_layers` reads them."""

    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor | None  # int8 experts: per-row scales and integer row sums;
    gate_up_row_sum: torch.Tensor | None  # int4: group scales, no sums
    down_scale: torch.Tensor | None
    down_row_sum: torch.Tensor | None
    q_scale: torch.Tensor | None  # int4 attention: the projections' group scales
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    o_scale: torch.Tensor | None


class DecodeSettings(NamedTuple):
    """What every layer must share for one native call."""

    norm_eps: float
    clip_qkv: float  # 0: no clipping
    top_k: int
    norm_topk_prob: bool


class DecodePlan(NamedTuple):
    """Every layer's weights for the native step, and how they were reached: each
    (dict, key, value) link from the model down to a weight, and each int8 weight's version (its
    row sums were computed from it). The plan stands while all of these do."""

    weights: list[torch.Tensor | None]  # every layer's LayerWeights, one flat list
    settings: DecodeSettings
    links: list[tuple[dict, str, object]]
    versions: list[tuple[torch.Tensor, int]]

    def current(self) -> bool:
        return all(table.get(key) is value for table, key, value in self.links) and all(
            version(tensor) == seen for tensor, seen in self.versions
        )


# Each model's plan, for as long as the model lives.
_plans: weakref.WeakKeyDictionary[OlmoeModel, DecodePlan] = weakref.WeakKeyDictionary()


def decode_plan(model: OlmoeModel) -> DecodePlan | None:
    """The model's plan: the one made for an earlier step while it still matches the model,
    else a new one; None where some layer cannot run natively."""
    plan = _plans.get(model)
    if plan is not None and plan.current():
        return plan
    _plans.pop(model, None)
    plan = _make_plan(model)
    if plan is not None:
        _plans[model] = plan
    return plan


def _make_plan(model: OlmoeModel) -> DecodePlan | None:
    links: list[tuple[dict, str, object]] = []

    def child(module, name):  # read through the module's own tables, remembering the link
        table = module._parameters if name in module._parameters else module._modules
        links.append((table, name, table[name]))
        return table[name]

    weights, settings, versions = [], set(), []
    stack = child(model, "layers")
    for name in stack._modules:
        layer = child(stack, name)
        attn, mlp = child(layer, "self_attn"), child(layer, "mlp")
        gate, experts = child(mlp, "gate"), child(mlp, "experts")
        projections = [child(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        norms = [child(layer, "input_layernorm"), child(attn, "q_norm"), child(attn, "k_norm"),
                 child(layer, "post_attention_layernorm")]  # fmt: skip
        matrices = [child(m, "weight") for m in projections]
        attention_scales = [None] * 4
        if all(m.dtype == torch.uint8 for m in matrices):
            attention_scales = [child(m, "weight_scale") for m in projections]
        if (
            (attention_scales[0] is None and any(m.dtype != torch.bfloat16 for m in matrices))
            or any(p.bias is not None for p in projections)
            or experts.act_fn is not F.silu
        ):
            return None
        gate_up, down = child(experts, "gate_up_proj"), child(experts, "down_proj")
        extras = [None] * 4
        if gate_up.dtype == torch.uint8:
            scales = [child(experts, "gate_up_proj_scale"), child(experts, "down_proj_scale")]
            extras = [scales[0], None, scales[1], None]
        elif gate_up.dtype == torch.int8:
            extras = [
                child(experts, "gate_up_proj_scale"), row_sum(experts, "gate_up_proj"),
                child(experts, "down_proj_scale"), row_sum(experts, "down_proj"),
            ]  # fmt: skip
            versions += [(gate_up, version(gate_up)), (down, version(down))]
        norm_weights = [child(n, "weight") for n in norms]
        weights += LayerWeights(
            norm_weights[0], *matrices, norm_weights[1], norm_weights[2], norm_weights[3],
            child(gate, "weight"), gate_up, down, *extras, *attention_scales,
        )  # fmt: skip
        settings.add(
            DecodeSettings(norms[0].eps, attn.clip_qkv or 0.0, gate.top_k, gate.norm_topk_prob)
        )
    if len(settings) != 1:
        return None
    return DecodePlan(weights, settings.pop(), links, versions)


def decode_step(model: OlmoeModel, x, rotary, mask, cache, cache_position):
    """One new token per sequence through every layer: x (B, 1, H) -> the last layer's output
    (B, 1, H) and each layer's (B, E) router logits; None where the layers cannot run natively
    (then nothing has been written to the cache)."""
    plan = decode_plan(model)
    if plan is None:
        return None
    b = x.shape[0]
    attn = model.layers[0].self_attn
    like = (b, attn.num_kv_heads, attn.head_dim)
    slots = [cache.decode_slot(i, cache_position, like) for i in range(len(model.layers))]
    positions, kv_length = slots[0][2], slots[0][3]
    cos, sin = (t.reshape(-1, t.shape[-1]).expand(b, -1).contiguous() for t in rotary)
    result = native.decode_layers(
        x.view(b, -1), plan.weights, [s[0] for s in slots], [s[1] for s in slots], cos, sin,
        positions, kv_length, None if mask is None else mask.reshape(b, -1), *plan.settings,
    )  # fmt: skip
    if result is None:
        return None
    out, router_logits = result
    return out.view(b, 1, -1), router_logits


class CpuOlmoeModel(OlmoeModel):
    """Runs a decode step (one new token per sequence, a KVCache) in one native call."""

    def run_layers(
        self,
        hidden,
        rotary,
        mask,
        cache,
        cache_position,
        output_attentions=False,
        output_hidden_states=False,
        output_routing=False,
    ):
        step = None
        one_token = hidden.shape[1] == 1 and not (output_attentions or output_hidden_states)
        # inference only: the kernel has no attention dropout and records no gradient
        native_step = hidden.dtype == torch.bfloat16 and not (
            self.training or torch.is_grad_enabled()
        )
        if one_token and native_step and hasattr(cache, "decode_slot"):
            step = decode_step(self, hidden, rotary, mask, cache, cache_position)
        if step is None:
            return super().run_layers(
                hidden, rotary, mask, cache, cache_position,
                output_attentions, output_hidden_states, output_routing,
            )  # fmt: skip
        out, router_logits = step
        routing: list[RouterOutput] = []
        if output_routing:
            gate = self.layers[0].mlp.gate
            routing = [route(logits, gate.top_k, gate.norm_topk_prob) for logits in router_logits]
        return out, [], [], routing
