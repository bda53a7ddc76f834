"""The compiled kernels (olmoe/engine/cpu.cpp) against float64 formulas.

Their numerics: bf16 inputs, float32 products and sums, one bf16 rounding of each result (and of
the expert activation before the down projection). So the formulas below round at the same
places and the tolerance is a bf16 unit in the last place, not a loose percentage. The LM
head loss's exponentials are float32 throughout, to within float32 rounding of the formula.
These run only where the kernels do; tests/engine/test_engine.py checks the modules that call
them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from olmoe.engine import native
from olmoe.quantize import (
    dequantize,
    dequantize_int4,
    int4_padded,
    quantize_int4,
    quantize_rows,
    unpack_int4,
)
from tests.engine.helpers import activation_rounding_slack, bf16, moe_formula, random_routing

pytestmark = pytest.mark.skipif(
    native.compiled() is None,
    reason="needs an x86 CPU with AVX-512 BF16/VNNI or AVX2 and a C++ compiler",
)
BF16_ULP = dict(rtol=2**-7, atol=1e-6)  # one bf16 rounding of a float32-exact result


@pytest.mark.parametrize(
    "tokens, out_features, in_features",
    [(1, 64, 2048), (1, 100, 48), (2, 50, 200), (3, 33, 16), (4, 40, 300), (8, 256, 1024),
     (16, 130, 96), (5, 7, 40),
     (1, 600, 2048), (3, 1100, 1000)],  # several 1 MB work items, the last one partial
)  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(tokens, out_features, in_features, bias):
    x = bf16(tokens, in_features, seed=1)
    weight = bf16(out_features, in_features, scale=0.05, seed=2)
    b = bf16(out_features, seed=3) if bias else None
    got = native.linear(x, weight, b)
    expected = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out_features)
    assert_close(got.double(), expected.bfloat16().double(), **BF16_ULP)


def test_linear_keeps_leading_dimensions():
    x = bf16(2, 3, 64)
    weight = bf16(32, 64, scale=0.1, seed=4)
    assert_close(native.linear(x, weight), F.linear(x, weight), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows, out_features, in_features", [(40, 96, 200), (17, 33, 64)])
def test_prefill_linear_matches_float64(rows, out_features, in_features, bias):
    x, weight = bf16(rows, in_features, seed=1), bf16(out_features, in_features, seed=2)
    add = bf16(out_features, seed=3) if bias else None
    got = native.prefill_linear(x, weight, add)
    expected = x.double() @ weight.double().T + (add.double() if bias else 0)
    assert got.dtype == torch.bfloat16
    assert_close(got.double(), expected, **BF16_ULP)


@pytest.mark.parametrize(
    "tokens, experts, top_k, hidden, inter, only",
    [
        (1, 8, 2, 32, 16, None),  # the tiny config, decode at batch 1
        (8, 64, 8, 64, 48, None),  # most experts idle, others shared
        (16, 8, 2, 32, 16, [3, 5]),  # every token on the same two experts
        (6, 4, 1, 96, 64, [2]),  # top-1, all on one expert, three experts empty
        (12, 16, 4, 128, 80, None),
        (3, 4, 2, 1100, 600, None),  # gate/up in 3 work items per expert, down in 2
    ],
)
def test_moe_matches_float64(tokens, experts, top_k, hidden, inter, only):
    x = bf16(tokens, hidden, seed=5)
    gate_up = bf16(experts, 2 * inter, hidden, scale=0.1, seed=6)
    down = bf16(experts, hidden, inter, scale=0.1, seed=7)
    routing = random_routing(tokens, experts, top_k, seed=8, only=only)
    got = native.moe(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    expected = moe_formula(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    slack = activation_rounding_slack(
        x, gate_up, down, routing.top_k_indices, routing.top_k_weights
    )
    assert got.dtype == torch.bfloat16
    error = (got.double() - expected.bfloat16().double()).abs()
    assert (error <= 1e-4 + 2**-6 * expected.abs() + slack).all(), error.max()


def test_moe_silu_holds_for_large_and_tiny_gate_values():
    """The kernel's own vectorised exp inside SiLU, over gates from about -400 to 400 (beyond
    float32's exp range in both directions) and near zero."""
    x = bf16(2, 32, seed=14)
    gate_up = bf16(4, 32, 32, scale=1.0, seed=15)
    gate_up[:, :16] *= torch.logspace(-3, 2, 16).bfloat16()[:, None]  # gate rows, many scales
    down = bf16(4, 32, 16, scale=0.1, seed=16)
    routing = random_routing(2, 4, 2, seed=17)
    got = native.moe(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    expected = moe_formula(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    assert torch.isfinite(got).all()
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-6, atol=1e-3)


def test_read_all_touches_every_byte():
    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    empty = native.read_all(buffer)
    buffer[12345] = 7  # a change anywhere changes the checksum
    assert native.read_all(buffer) != empty


@pytest.mark.parametrize(
    "heads, kv_heads, masked, dim, cached",
    # the last: OLMoE's head size, a cache length that is no multiple of the 16-wide vectors
    [(4, 4, False, 16, 9), (8, 2, True, 16, 9), (4, 1, True, 16, 9), (4, 4, True, 128, 77)],
)
def test_decode_attention_matches_float64(heads, kv_heads, masked, dim, cached):
    batch, capacity = 2, 96
    q = bf16(batch, heads, 1, dim, seed=13)
    k_cache = bf16(batch, kv_heads, capacity, dim, seed=14)
    v_cache = bf16(batch, kv_heads, capacity, dim, seed=15)
    k, v = k_cache[:, :, :cached], v_cache[:, :, :cached]  # strided views, as the cache gives
    mask = None
    if masked:  # the first sequence is left-padded by three positions
        mask = torch.zeros(batch, 1, 1, cached, dtype=torch.bfloat16)
        mask[0, ..., :3] = torch.finfo(torch.bfloat16).min
    got = native.decode_attention(q, k, v, mask, dim**-0.5)
    group = heads // kv_heads
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    scores = q.double() @ kk.transpose(-1, -2) * dim**-0.5  # (B, N, 1, P)
    if masked:
        scores[0, ..., :3] = -torch.inf
    expected = scores.softmax(-1) @ vv
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 16, 0, 0, 0], [0] * 6])
def test_grouped_linear_equals_one_product_per_group_forward_and_backward(counts):
    """The experts side by side (prefill and training): each group exactly its own product,
    and the gradients exactly those of the per-group products; empty groups get zero."""
    counts = torch.tensor(counts)
    x = bf16(int(counts.sum()), 40, seed=11).requires_grad_()
    weight = bf16(6, 24, 40, scale=0.1, seed=12).requires_grad_()
    grad = bf16(x.shape[0], 24, seed=13)
    got = native.GroupedLinear.apply(x, weight, counts)
    got.backward(grad)
    x_ref, weight_ref = x.detach().requires_grad_(), weight.detach().requires_grad_()
    chunks = torch.split(x_ref, counts.tolist())
    expected = torch.cat([chunk @ weight_ref[e].T for e, chunk in enumerate(chunks)])
    expected.backward(grad)
    assert got.shape == (x.shape[0], 24)
    assert torch.equal(got, expected)
    assert torch.equal(x.grad, x_ref.grad)
    assert_close(weight.grad, weight_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["bf16", "int8", "int4"])
def test_grouped_products_of_several_tiles_are_each_groups_product(method):
    """Experts of 600 x 2048 weights: where the back end multiplies in float32, each expert's
    weights are widened or dequantised 2 MB at a time (256 rows of float32) into its GEMM;
    each group is still its product with the (dequantised) weights, rounded once."""
    counts = torch.tensor([5, 0, 11])
    x = bf16(16, 2048, seed=21)
    weight = bf16(3, 600, 2048, scale=0.05, seed=22)
    scale, dense = None, weight
    if method == "int8":
        weight, scale = quantize_rows(weight)
        dense = dequantize(weight, scale, torch.bfloat16)
    elif method == "int4":
        weight, scale = quantize_int4(weight)
        dense = dequantize_int4(weight, scale, 2048, torch.bfloat16)
    got = native.compiled().grouped_linear(x, weight, counts, scale)
    chunks = torch.split(x.double(), counts.tolist())
    expected = torch.cat([chunk @ dense[e].double().T for e, chunk in enumerate(chunks)])
    assert got.shape == (16, 600)
    assert_close(got.double(), expected.bfloat16().double(), **BF16_ULP)


@pytest.mark.parametrize(
    "tokens, out_features, in_features",
    [(1, 64, 2048), (1, 9, 300), (2, 20, 1000), (3, 33, 40), (4, 8, 130), (8, 130, 96),
     (16, 17, 200),
     (1, 1100, 2048),  # 3 work items of 1 MB, the last one partial
     (1, 5, 4100), (2, 3, 8200)],  # past the 32-bit partial sums' span, a partial chunk last
)  # fmt: skip
def test_int8_linear_kernel_is_exact_on_the_quantised_weights(tokens, out_features, in_features):
    x = bf16(tokens, in_features, seed=1)
    q, scale = quantize_rows(bf16(out_features, in_features, scale=0.05, seed=2))
    got = native.linear(x, q, None, scale, q.sum(-1, dtype=torch.int32))
    # the kernel's only rounding besides the output's: activations to 15 bits per row
    expected = x.double() @ dequantize(q, scale, torch.float64).T
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize(
    "tokens, experts, top_k, only",
    [(1, 8, 2, None), (8, 64, 8, None), (10, 8, 2, [1, 6]), (4, 4, 1, [0])],
)
def test_int8_moe_kernel_matches_float64(tokens, experts, top_k, only):
    hidden, inter = 64, 48
    x = bf16(tokens, hidden, seed=5)
    gate_up, gate_up_scale = quantize_rows(bf16(experts, 2 * inter, hidden, scale=0.1, seed=6))
    down, down_scale = quantize_rows(bf16(experts, hidden, inter, scale=0.1, seed=7))
    routing = random_routing(tokens, experts, top_k, seed=8, only=only)
    got = native.moe(
        x, gate_up, down, routing.top_k_indices, routing.top_k_weights,
        gate_up_scale, gate_up.sum(-1, dtype=torch.int32), down_scale,
        down.sum(-1, dtype=torch.int32),
    )  # fmt: skip
    expected = moe_formula(
        x,
        dequantize(gate_up, gate_up_scale, torch.float64),
        dequantize(down, down_scale, torch.float64),
        routing.top_k_indices,
        routing.top_k_weights,
    )
    # the activation before the down projection: bf16 in the formula, 15 bits in the kernel
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-6, atol=2e-3)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 16, 0, 0, 0], [0] * 6])
def test_grouped_int8_linear_is_each_group_times_its_dequantised_weights(counts):
    """int8 experts side by side (prefill): each group exactly its own product with the weights
    dequantised as olmoe.quantize.dequantize rounds them; empty groups are skipped."""
    counts = torch.tensor(counts)
    x = bf16(int(counts.sum()), 40, seed=11)
    q, scale = quantize_rows(bf16(6, 24, 40, scale=0.1, seed=12))
    got = native.compiled().grouped_linear(x, q, counts, scale)
    chunks = torch.split(x, counts.tolist())
    weights = dequantize(q, scale, torch.bfloat16)
    expected = torch.cat([chunk @ weights[e].T for e, chunk in enumerate(chunks)])
    assert got.shape == (x.shape[0], 24) and torch.equal(got, expected)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize(
    "tokens, out_features, in_features, bias",
    [(40, 24, 40, False), (17, 600, 2048, True),  # 1 MB tiles: three, the last one partial
     (33, 70, 1100, False)],
)  # fmt: skip
def test_quantized_linear_is_the_product_with_the_dequantised_weight(
    method, tokens, out_features, in_features, bias
):
    """A prefill's quantised linear layer: tile by tile, the threads side by side, it is
    F.linear with the weight dequantised as olmoe.quantize rounds it."""
    quantise, restore = (
        (quantize_rows, lambda q, s: dequantize(q, s, torch.bfloat16))
        if method == "int8"
        else (quantize_int4, lambda q, s: dequantize_int4(q, s, in_features, torch.bfloat16))
    )
    x = bf16(tokens, in_features, seed=13)
    q, scale = quantise(bf16(out_features, in_features, scale=0.05, seed=14))
    b = bf16(out_features, seed=15) if bias else None
    got = native.quantized_linear(x, q, scale, b)
    expected = x.double() @ restore(q, scale).double().T + (0 if b is None else b.double())
    assert got.shape == (tokens, out_features)
    assert_close(got.double(), expected.bfloat16().double(), **BF16_ULP)


# ---------------------------------------------------------------------------- int4
def group_quantised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernels' activations: each group of 32 (zero padded to the weights' blocks)
    rounded to int8 with scale max|x| / 127, in float32 as the kernel divides."""
    padded = F.pad(x.float(), (0, int4_padded(x.shape[-1]) - x.shape[-1])).unflatten(-1, (-1, 32))
    peak = padded.abs().amax(-1, keepdim=True)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    return torch.round(padded / scale), scale


def int4_formula(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 sum over groups of (exact integer dot product) x weight scale x activation scale."""
    q, x_scale = group_quantised(x)  # (T, G, 32), (T, G, 1)
    w = unpack_int4(packed).unflatten(-1, (-1, 32)).double()  # (N, G, 32)
    dots = torch.einsum("tgi,ngi->tng", q.double(), w)
    return (dots * x_scale.double().squeeze(-1)[:, None] * scale.double()[None]).sum(-1)


@pytest.mark.parametrize(
    "tokens, out_features, in_features",
    [(1, 64, 2048), (3, 100, 1000), (8, 33, 48), (16, 40, 512), (5, 7, 1100),
     (2, 1100, 2048)],  # several 1 MB work items
)  # fmt: skip
def test_int4_linear_kernel_is_exact_on_the_quantised_values(tokens, out_features, in_features):
    x = bf16(tokens, in_features, seed=1)
    packed, scale = quantize_int4(bf16(out_features, in_features, scale=0.05, seed=2))
    got = native.linear(x, packed, None, scale)
    assert got.shape == (tokens, out_features)
    assert_close(got.double(), int4_formula(x, packed, scale).bfloat16().double(), **BF16_ULP)


@pytest.mark.parametrize("in_features", [32, 100, 512, 1100, 2048])
def test_int4_dequantisation_equals_the_reference_bit_for_bit(in_features):
    """Through the prefill's product with the identity: each output is one weight times 1."""
    packed, scale = quantize_int4(bf16(70, in_features, scale=0.3, seed=3))
    expected = dequantize_int4(packed, scale, in_features, torch.bfloat16)
    identity = torch.eye(in_features, dtype=torch.bfloat16)
    assert torch.equal(native.quantized_linear(identity, packed, scale).T, expected)


@pytest.mark.parametrize("tokens, experts, top_k, only", [(1, 8, 2, None), (8, 64, 8, None),
                                                          (10, 8, 2, [1, 6])])  # fmt: skip
def test_int4_moe_kernel_matches_float64(tokens, experts, top_k, only):
    hidden, inter = 512, 96
    x = bf16(tokens, hidden, seed=5)
    gate_up, gate_up_scale = quantize_int4(bf16(experts, 2 * inter, hidden, scale=0.1, seed=6))
    down, down_scale = quantize_int4(bf16(experts, hidden, inter, scale=0.1, seed=7))
    routing = random_routing(tokens, experts, top_k, seed=8, only=only)
    got = native.moe(x, gate_up, down, routing.top_k_indices, routing.top_k_weights,
                     gate_up_scale, None, down_scale, None)  # fmt: skip
    expected = moe_formula(
        x,
        dequantize_int4(gate_up, gate_up_scale, hidden, torch.float64),
        dequantize_int4(down, down_scale, inter, torch.float64),
        routing.top_k_indices,
        routing.top_k_weights,
    )
    # both products see activations rounded to 8 bits per group of 32, the formula bf16 ones
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert relative(got, expected) < 2e-2  # about 1.2% with these inputs
    assert float((got.double() - expected).abs().max()) < 0.03 * float(expected.abs().max())


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


def test_int4_kernels_refuse_rows_of_another_width():
    packed, scale = quantize_int4(bf16(8, 512, seed=9))
    with pytest.raises(RuntimeError, match="features"):
        native.linear(bf16(1, 600), packed, None, scale)
    with pytest.raises(RuntimeError, match="scale"):
        native.linear(bf16(1, 512), packed, None, None)


@pytest.mark.parametrize(
    ("rows", "vocab", "hidden"),
    [(1, 1, 1), (7, 33, 5), (13, 600, 40), (6, 16, 3)],  # tails of rows, ids and tile groups
)
def test_exp_logits_matches_float64(rows, vocab, hidden):
    generator = torch.Generator().manual_seed(rows + vocab)
    h = torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator)
    shift = torch.randn(rows, generator=generator)
    exps, sums, top = native.exp_logits(h, weight, shift)
    exponents = h.double() @ weight.double().T - shift.double()[:, None]
    assert exps.dtype == torch.float32 and exps.shape == (rows, vocab)
    # A float32 sum of `hidden` products is off by at most about hidden + 1 roundings of its
    # terms' magnitudes; exp turns that absolute error into a relative one, and adds its own.
    magnitudes = h.double().abs() @ weight.double().abs().T + shift.double().abs()[:, None]
    slack = (hidden + 2) * 2**-24 * magnitudes + 1e-6
    assert ((exps.double() / exponents.exp() - 1).abs() <= slack).all()
    assert_close(sums.double(), exponents.exp().sum(1), rtol=slack.max().item(), atol=0)
    assert abs(top - exponents.max().item()) <= slack.max().item()


def test_exp_logits_leaves_ids_beyond_the_vocabulary_out():
    """The last tile's columns past the vocabulary multiply zeros: with a shift far below 0
    their exponent would be the largest and their exponential would swamp the sums."""
    h = torch.ones(3, 4)
    weight = torch.full((5, 4), -25.0)  # every logit -100
    shift = torch.full((3,), -90.0)
    exps, sums, top = native.exp_logits(h, weight, shift)
    assert top == -10.0
    assert_close(sums, torch.full((3,), 5 * math.exp(-10.0)), rtol=1e-6, atol=0)
    assert exps.shape == (3, 5)
