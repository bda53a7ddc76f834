"""A PyTorch stand-in for the compiled kernels (olmoe/engine/cpu.cpp): the same functions, the
same arguments in the same order, the same results as far as plain PyTorch gives them.

The engine's tests run on it where the real kernels cannot (a CPU with neither AVX-512 BF16 nor
AVX2, no compiler), so that the engine's wiring — which call goes native, what it is handed, in which
order, and what happens when the kernel refuses — is tested on every machine. Where the real
kernels run, the same tests run on them instead. Each op here is built from the same PyTorch
steps as the per-module path, so that the one-call decode step equals it bit for bit, as the
real kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olmoe import quantize
from olmoe.model import apply_rotary
from olmoe.moe import route

WEIGHTS_PER_LAYER, REQUIRED_WEIGHTS, EXPERT_EXTRAS = 19, 11, 4
PROJECTIONS = range(1, 5)  # q, k, v, o among the required weights


def _dequantize(weight, scale, in_features):
    if weight.dtype == torch.uint8:
        return quantize.dequantize_int4(weight, scale, in_features, torch.bfloat16)
    return weight if scale is None else (weight.float() * scale.unsqueeze(-1)).to(torch.bfloat16)


def linear(rows, weight, bias=None, scale=None, row_sum=None):
    return F.linear(rows, _dequantize(weight, scale, rows.shape[-1]), bias)


def quantized_linear(rows, weight, scale, bias=None):
    return F.linear(rows, _dequantize(weight, scale, rows.shape[-1]), bias)


def prefill_linear(rows, weight, bias=None):
    return F.linear(rows.float(), weight.float(), None if bias is None else bias.float()).bfloat16()


bf16_gemm = True  # as on a CPU with bf16 instructions: the engine leaves bf16 GEMMs to PyTorch


def rms_norm(rows, weight, eps):
    x = rows.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(rows.dtype)


def _expert(x, gate_up, down, e, gate_up_scale, down_scale):
    scale = None if gate_up_scale is None else gate_up_scale[e]
    h = F.linear(x, _dequantize(gate_up[e], scale, x.shape[-1]))
    inter = gate_up.shape[1] // 2
    scale = None if down_scale is None else down_scale[e]
    return F.linear(F.silu(h[:, :inter]) * h[:, inter:], _dequantize(down[e], scale, inter))


def moe(x, gate_up, down, indices, weights, gate_up_scale=None, gate_up_sum=None,
        down_scale=None, down_sum=None):  # fmt: skip
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            y = _expert(x[t : t + 1], gate_up, down, e, gate_up_scale, down_scale)
            out[t] += (y * weights[t, k])[0].float()
    return out.to(x.dtype)


def grouped_linear(x, weight, counts, scale=None):
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ weight[e].T for e, chunk in enumerate(chunks)])


def grouped_weight_grad(grad, x, counts):
    rows = counts.tolist()
    return torch.stack(
        [g.T @ chunk for g, chunk in zip(torch.split(grad, rows), torch.split(x, rows))]
    )


def grouped_experts(x, gate_up, down, slot_order, counts, top_k_weights, gate_up_scale=None,
                    down_scale=None):  # fmt: skip
    k = top_k_weights.shape[1]
    out = torch.empty(slot_order.shape[0], x.shape[1], dtype=x.dtype)
    start = 0
    for e, count in enumerate(counts.tolist()):
        slots = slot_order[start : start + count]
        start += count
        if count:
            y = _expert(x[slots // k], gate_up, down, e, gate_up_scale, down_scale)
            out[slots] = y * top_k_weights.reshape(-1)[slots].unsqueeze(-1)
    return out


def decode_attention(q, k, v, mask, scale):
    b, n, d = q.shape
    out = F.scaled_dot_product_attention(
        q.view(b, n, 1, d), k, v, attn_mask=None if mask is None else mask.view(b, 1, 1, -1),
        scale=scale, enable_gqa=n != k.shape[1],
    )  # fmt: skip
    return out.view(b, n, d)


def _fits(weights) -> bool:
    for layer in range(0, len(weights), WEIGHTS_PER_LAYER):
        w = weights[layer : layer + WEIGHTS_PER_LAYER]
        experts, attention = w[REQUIRED_WEIGHTS - 2].dtype, w[1].dtype
        for slot, t in enumerate(w):
            if slot >= REQUIRED_WEIGHTS + EXPERT_EXTRAS:  # int4 attention's scales
                if (t is not None) != (attention == torch.uint8):
                    return False
                continue
            if slot >= REQUIRED_WEIGHTS:  # scales in even extras, int8 row sums in odd ones
                scale = (slot - REQUIRED_WEIGHTS) % 2 == 0
                if (t is not None) != (experts == torch.int8 or (experts == torch.uint8 and scale)):
                    return False
                continue
            expert = slot >= REQUIRED_WEIGHTS - 2
            wanted = experts if expert else attention if slot in PROJECTIONS else torch.bfloat16
            if t is None or t.device.type != "cpu" or t.dtype != wanted:
                return False
    return True


def decode_layers(x, weights, k_caches, v_caches, cos, sin, positions, kv_length, mask, eps,
                  clip_qkv, top_k, norm_topk_prob):  # fmt: skip
    assert len(weights) == WEIGHTS_PER_LAYER * len(k_caches) == WEIGHTS_PER_LAYER * len(v_caches)
    if not _fits(weights):
        return []
    out, all_logits = x, []
    b = x.shape[0]
    for layer, (k_cache, v_cache) in enumerate(zip(k_caches, v_caches)):
        (input_norm, q_w, k_w, v_w, o_w, q_norm, k_norm, post_norm, router, gate_up, down,
         gate_up_scale, gate_up_sum, down_scale, down_sum, q_s, k_s, v_s, o_s) = weights[
            layer * WEIGHTS_PER_LAYER : (layer + 1) * WEIGHTS_PER_LAYER
        ]  # fmt: skip
        g, d = k_cache.shape[1], k_cache.shape[3]
        n = rms_norm(out, input_norm, eps)
        q = rms_norm(linear(n, q_w, None, q_s), q_norm, eps)
        k = rms_norm(linear(n, k_w, None, k_s), k_norm, eps)
        v = linear(n, v_w, None, v_s)
        if clip_qkv > 0:
            q, k, v = (t.clamp(-clip_qkv, clip_qkv) for t in (q, k, v))
        rotary = cos[:, None], sin[:, None]  # (B, 1, D): one position per row
        q = apply_rotary(q.view(b, -1, 1, d), *rotary).view(b, -1)
        k = apply_rotary(k.view(b, g, 1, d), *rotary)  # (B, G, 1, D)
        rows = torch.arange(b)
        k_cache[rows, :, positions] = k[:, :, 0]
        v_cache[rows, :, positions] = v.view(b, g, d)
        attended = decode_attention(
            q.view(b, -1, d), k_cache[:, :, :kv_length], v_cache[:, :, :kv_length], mask,
            d**-0.5,
        )  # fmt: skip
        h = out + linear(attended.reshape(b, -1), o_w, None, o_s)
        m = rms_norm(h, post_norm, eps)
        logits = linear(m, router)
        routing = route(logits, top_k, norm_topk_prob)
        out = h + moe(m, gate_up, down, routing.top_k_indices, routing.top_k_weights,
                      gate_up_scale, gate_up_sum, down_scale, down_sum)  # fmt: skip
        all_logits.append(logits)
    return [out, *all_logits]


def exp_logits(h, weight, shift):
    exponents = h @ weight.T - shift[:, None]
    exps = exponents.exp()
    return exps, exps.sum(1), exponents.max().item()


def read_all(buffer):
    return int(buffer.view(torch.uint8).sum())
