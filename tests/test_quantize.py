"""Int8 weight-only quantisation: the rounding rule, the int8 kernels against float64 formulas,
the quantised model against bf16, and int8 checkpoints (save, load, CLI)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from olmoe import OlmoeForCausalLM, kernels
from olmoe.quantize import Int8Experts, Int8Linear, dequantize, quantize_model, quantize_rows
from tests.conftest import tiny_model
from tests.test_kernels import bf16, moe_formula, random_routing

needs_kernels = pytest.mark.skipif(
    kernels.native() is None, reason="needs an x86 CPU with AVX-512 BF16/VNNI and a C++ compiler"
)


def test_quantize_rows_is_symmetric_per_row_and_within_half_a_step():
    weight = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1, 10, 100, 0]).unsqueeze(1)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert int(q.abs().max()) == 127  # each nonzero row uses the full range
    assert_close(scale[:5], weight[:5].abs().amax(1) / 127)
    assert scale[5] == 1 and not q[5].any()  # an all-zero row
    error = (dequantize(q, scale, torch.float32) - weight).abs()
    assert bool((error <= scale.unsqueeze(1) / 2 + 1e-6).all())


@needs_kernels
@pytest.mark.parametrize(
    "tokens, out_features, in_features",
    [(1, 64, 2048), (1, 9, 300), (2, 20, 1000), (3, 33, 40), (4, 8, 130), (8, 130, 96),
     (16, 17, 200),
     (1, 1100, 2048)],  # 3 work items of 1 MB, the last one partial
)  # fmt: skip
def test_int8_linear_kernel_is_exact_on_the_quantised_weights(tokens, out_features, in_features):
    x = bf16(tokens, in_features, seed=1)
    q, scale = quantize_rows(bf16(out_features, in_features, scale=0.05, seed=2))
    got = kernels.linear(x, q, None, scale, q.sum(-1, dtype=torch.int32))
    # the kernel's only rounding besides the output's: activations to 15 bits per row
    expected = x.double() @ dequantize(q, scale, torch.float64).T
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-7, atol=1e-3)


@needs_kernels
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
    got = kernels.moe(
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


@needs_kernels
@needs_kernels
@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 16, 0, 0, 0], [0] * 6])
def test_grouped_int8_linear_is_each_group_times_its_dequantised_weights(counts):
    """int8 experts side by side (prefill): each group exactly its own product with the weights
    dequantised as olmoe.quantize.dequantize rounds them; empty groups are skipped."""
    counts = torch.tensor(counts)
    x = bf16(int(counts.sum()), 40, seed=11)
    q, scale = quantize_rows(bf16(6, 24, 40, scale=0.1, seed=12))
    got = kernels.grouped_linear_int8(x, q, scale, counts)
    chunks = torch.split(x, counts.tolist())
    weights = dequantize(q, scale, torch.bfloat16)
    expected = torch.cat([chunk @ weights[e].T for e, chunk in enumerate(chunks)])
    assert got.shape == (x.shape[0], 24) and torch.equal(got, expected)


@needs_kernels
def test_int8_prefill_side_by_side_matches_one_expert_at_a_time(monkeypatch):
    model = tiny_model(seed=1).to(torch.bfloat16)
    quantize_model(model)
    experts = model.model.layers[0].mlp.experts
    x = bf16(40, model.config.hidden_size, seed=3)
    # five of the eight experts idle
    routing = random_routing(
        40, model.config.num_experts, model.config.num_experts_per_tok, 4, only=[1, 2, 5]
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            assert kernels.grouped_applies(x, experts.gate_up_proj)
            side_by_side = experts(x, routing)
            monkeypatch.setattr(kernels, "grouped_applies", lambda *args: False)
            one_by_one = experts(x, routing)
    finally:
        torch.set_num_threads(threads)
    # the same products; the sum over a token's experts rounds once here, per expert there
    assert_close(side_by_side, one_by_one, rtol=2**-7, atol=1e-3)


def test_int8_modules_kernel_and_fallback_agree(monkeypatch):
    model = tiny_model(seed=1).to(torch.bfloat16)
    quantize_model(model)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.experts, Int8Experts)
    assert isinstance(model.lm_head, Int8Linear)
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16  # attention stays bf16
    x = bf16(5, model.config.hidden_size, seed=3)
    routing = random_routing(5, model.config.num_experts, model.config.num_experts_per_tok, 4)
    with torch.no_grad():
        fast = (layer.mlp.experts(x, routing), model.lm_head(x))
        monkeypatch.setattr(kernels, "applies", lambda *args: False)
        slow = (layer.mlp.experts(x, routing), model.lm_head(x))
    for a, b in zip(fast, slow):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


def test_quantised_model_stays_close_to_bf16():
    model = tiny_model(seed=2).to(torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64]])
    with torch.no_grad():
        reference = model(ids).logits.float()
        quantize_model(model)
        got = model(ids).logits.float()
    assert model.config.extra["quantization_config"]["quant_method"] == "olmoe-int8"
    relative = float((got - reference).norm() / reference.norm())
    # tiny random layers with large weights amplify rounding; the released shape's figure is in
    # the README (bench/cpu_inference.py measures it)
    assert 0 < relative < 4e-2


def test_int8_checkpoint_round_trip_keeps_int8_and_float32_scales(tmp_path):
    model = quantize_model(tiny_model(seed=3).to(torch.bfloat16))
    model.save_pretrained(tmp_path)
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.experts.down_proj.dtype == torch.int8
    assert loaded.lm_head.weight_scale.dtype == torch.float32
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_casting_a_quantised_model_keeps_scales_float32():
    model = quantize_model(tiny_model(seed=4))
    scale = model.lm_head.weight_scale.clone()
    model.to(torch.bfloat16)
    assert model.lm_head.weight_scale.dtype == torch.float32
    assert torch.equal(model.lm_head.weight_scale, scale)
    assert model.lm_head.weight.dtype == torch.int8


def test_quantize_at_load_time_equals_quantizing_after(tmp_path):
    tiny_model(seed=5).save_pretrained(tmp_path)
    at_load = OlmoeForCausalLM.from_pretrained(tmp_path, dtype="bfloat16", quantize="int8")
    after = quantize_model(OlmoeForCausalLM.from_pretrained(tmp_path, dtype="bfloat16"))
    for (name, a), (_, b) in zip(at_load.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="quantize"):
        OlmoeForCausalLM.from_pretrained(tmp_path, quantize="int4")


def test_quantised_model_generates_with_the_int8_path():
    model = quantize_model(tiny_model(seed=6, eos_token_id=None).to(torch.bfloat16))
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=10)
    assert out.shape == (1, 13)
