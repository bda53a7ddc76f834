"""Weight-only quantisation (int8 and int4): the rounding rules, the int4 layout, the reference
modules against float64 formulas, the quantised model against bf16, and quantised checkpoints.
(The kernels are tested in tests/engine.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from olmoe import OlmoeForCausalLM
from olmoe.errors import ConfigError
from olmoe.quantize import (
    Int4Experts,
    Int4Linear,
    Int8Experts,
    Int8Linear,
    dequantize,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    quantize_model,
    quantize_rows,
    unpack_int4,
)
from tests.conftest import tiny_model
from tests.engine.helpers import bf16, moe_formula, random_routing


def test_quantize_rows_is_symmetric_per_row_and_within_half_a_step():
    weight = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1, 10, 100, 0]).unsqueeze(1)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert int(q.abs().max()) == 127  # each nonzero row uses the full range
    assert_close(scale[:5], weight[:5].abs().amax(1) / 127)
    assert scale[5] == 1 and not q[5].any()  # an all-zero row
    error = (dequantize(q, scale, torch.float32) - weight).abs()
    assert bool((error <= scale.unsqueeze(1) / 2 + 1e-6).all())


def test_int8_reference_modules_equal_their_dequantised_formulas():
    model = quantize_model(tiny_model(seed=1).to(torch.bfloat16))
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.experts, Int8Experts) and isinstance(model.lm_head, Int8Linear)
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16  # attention stays bf16
    x = bf16(5, model.config.hidden_size, seed=3)
    routing = random_routing(5, model.config.num_experts, model.config.num_experts_per_tok, 4)
    experts = layer.mlp.experts
    with torch.no_grad():
        got = experts(x, routing)
        head = model.lm_head(x)
    expected = moe_formula(
        x,
        dequantize(experts.gate_up_proj, experts.gate_up_proj_scale, torch.bfloat16),
        dequantize(experts.down_proj, experts.down_proj_scale, torch.bfloat16),
        routing.top_k_indices,
        routing.top_k_weights,
    )
    assert_close(got.double(), expected, rtol=2**-6, atol=2e-3)
    lm = model.lm_head
    expected_head = x.double() @ dequantize(lm.weight, lm.weight_scale, torch.bfloat16).double().T
    assert_close(head.double(), expected_head, rtol=2**-7, atol=1e-3)


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
    # bench/README.md (bench/quantization_accuracy.py logits measures it)
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
        OlmoeForCausalLM.from_pretrained(tmp_path, quantize="int3")


def test_quantised_model_generates_with_the_int8_path():
    model = quantize_model(tiny_model(seed=6, eos_token_id=None).to(torch.bfloat16))
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=10)
    assert out.shape == (1, 13)


# ---------------------------------------------------------------------------- int4
def test_int4_layout_puts_group_l_in_lane_l_of_every_register():
    """pack_int4's order: input 32 l + 4 r + i of a block is byte 4 l + i of register r; register
    2p is chunk p's low nibbles, 2p + 1 its high ones; the nibble is q + 8."""
    q = torch.randint(-8, 8, (3, 1024), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, 512) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    for block, group, register, i in [(0, 0, 0, 0), (0, 5, 3, 2), (1, 15, 7, 3), (1, 9, 4, 1)]:
        column = 512 * block + 32 * group + 4 * register + i
        byte = packed[1, 256 * block + 64 * (register // 2) + 4 * group + i]
        nibble = (byte >> 4) if register % 2 else (byte & 15)
        assert int(nibble) - 8 == int(q[1, column])


def q4_0_error(weight: torch.Tensor) -> torch.Tensor:
    """Squared error per group of 32 under llama.cpp's Q4_0 rule: scale = the largest-magnitude
    value / -8 (float16), q = round(w / scale) clamped to [-8, 7]."""
    groups = weight.unflatten(-1, (-1, 32))
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    scale = (extreme / -8).half().float()
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe).clamp(-8, 7)
    return (groups - q * scale).square().sum(-1)


@pytest.mark.parametrize("scale", [0.02, 1.0, 300.0])
def test_int4_rounding_is_never_worse_than_q4_0(scale):
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * scale
    weight[3, :32] = 0  # an all-zero group
    weight[5, 64:96] = scale  # a constant group: exact
    packed, scales = quantize_int4(weight)
    assert packed.shape == (64, 256) and scales.shape == (64, 16) and scales.dtype == torch.float16
    ours = (dequantize_int4(packed, scales, 512, torch.float32) - weight).unflatten(-1, (-1, 32))
    ours = ours.square().sum(-1)
    theirs = q4_0_error(weight)
    assert float(ours[3, 0]) == 0 and float(ours[5, 2]) < 1e-5 * scale**2
    assert bool((ours <= theirs * (1 + 2e-3) + 1e-5 * scale**2).all())  # up to float16 rounding
    assert float(ours.sum()) < 0.93 * float(theirs.sum())  # and clearly better overall


def test_int4_pads_rows_to_whole_blocks_with_zeros():
    weight = torch.randn(4, 100)
    packed, scales = quantize_int4(weight)
    assert packed.shape == (4, 256) and scales.shape == (4, 16)
    assert not scales[:, 4:].any()  # groups past the 100 inputs (rounded up to 128) are zero
    restored = dequantize_int4(packed, scales, 100, torch.float32)
    assert restored.shape == (4, 100)
    assert float((restored - weight).norm() / weight.norm()) < 0.12


def test_int4_reference_modules_equal_their_dequantised_formulas():
    model = quantize_model(tiny_model(seed=1).to(torch.bfloat16), "int4")
    experts, head = model.model.layers[0].mlp.experts, model.model.layers[0].self_attn.q_proj
    assert isinstance(experts, Int4Experts) and isinstance(head, Int4Linear)
    assert experts.gate_up_proj.dtype == torch.uint8 and head.weight_scale.dtype == torch.float16
    assert isinstance(model.lm_head, Int8Linear)  # the LM head stays at 8 bits
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    x = bf16(5, hidden, seed=3)
    routing = random_routing(5, model.config.num_experts, model.config.num_experts_per_tok, 4)
    with torch.no_grad():
        got, got_head = experts(x, routing), head(x)
    weights = [
        dequantize_int4(experts.gate_up_proj, experts.gate_up_proj_scale, hidden, torch.bfloat16),
        dequantize_int4(experts.down_proj, experts.down_proj_scale, inter, torch.bfloat16),
    ]
    expected = moe_formula(x, *weights, routing.top_k_indices, routing.top_k_weights)
    assert_close(got.double(), expected, rtol=2**-6, atol=5e-3)
    lm = dequantize_int4(head.weight, head.weight_scale, hidden, torch.bfloat16)
    assert_close(got_head.double(), x.double() @ lm.double().T, rtol=2**-7, atol=1e-3)


def test_int4_checkpoint_round_trip_keeps_packed_bytes_and_float16_scales(tmp_path):
    model = quantize_model(tiny_model(seed=3).to(torch.bfloat16), "int4")
    model.save_pretrained(tmp_path)
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.extra["quantization_config"]["quant_method"] == "olmoe-int4"
    assert loaded.model.layers[1].mlp.experts.down_proj.dtype == torch.uint8
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    loaded.to(torch.float32)  # a cast leaves the scales float16 (and the LM head's float32)
    assert loaded.model.layers[0].self_attn.o_proj.weight_scale.dtype == torch.float16
    assert loaded.lm_head.weight_scale.dtype == torch.float32


def test_int4_errs_more_than_int8_and_a_quantised_model_is_not_requantised():
    reference = tiny_model(seed=2).to(torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64]])
    errors = {}
    with torch.no_grad():
        logits = reference(ids).logits.float()
        for method in ("int8", "int4"):
            got = quantize_model(copy.deepcopy(reference), method)(ids).logits.float()
            errors[method] = float((got - logits).norm() / logits.norm())
    # tiny random layers amplify rounding; trained models: bench/quantization_accuracy.py
    assert 0 < errors["int8"] < errors["int4"] < 0.5
    with pytest.raises(ConfigError, match="already quantised as int8"):
        quantize_model(quantize_model(copy.deepcopy(reference)), "int4")


def test_loading_a_quantised_checkpoint_runs_no_quantiser(tmp_path, monkeypatch):
    """The loader builds the int4 modules on the meta device and reads them from the file: the
    scale search must not run there (on meta tensors it took minutes at the released shape)."""
    from olmoe import quantize

    quantize_model(tiny_model(seed=6).to(torch.bfloat16), "int4").save_pretrained(tmp_path)

    def refuse(weight):
        raise AssertionError("quantize_int4 ran while loading")

    monkeypatch.setattr(quantize, "quantize_int4", refuse)
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.uint8
