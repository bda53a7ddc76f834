"""The native CPU decode kernels against float64 formulas and against the PyTorch path.

Their numerics: bf16 inputs, float32 products and sums, one bf16 rounding of each result (and of
the expert activation before the down projection). So the formulas below round at the same
places and the tolerance is a bf16 unit in the last place, not a loose percentage.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from olmoe import kernels
from olmoe.generation import generate_tokens
from olmoe.moe import route
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(
    kernels.native() is None, reason="needs an x86 CPU with AVX-512 BF16 and a C++ compiler"
)
BF16_ULP = dict(rtol=2**-7, atol=1e-6)  # one bf16 rounding of a float32-exact result


def bf16(*shape, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).bfloat16()


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
    got = kernels.linear(x, weight, b)
    expected = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out_features)
    assert_close(got.double(), expected.bfloat16().double(), **BF16_ULP)


def test_linear_keeps_leading_dimensions():
    x = bf16(2, 3, 64)
    weight = bf16(32, 64, scale=0.1, seed=4)
    assert_close(kernels.linear(x, weight), F.linear(x, weight), rtol=2**-7, atol=1e-3)


def moe_formula(x, gate_up, down, indices, weights):
    """float64 experts, the activation rounded to bf16 where the kernel rounds it."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = down.shape[2]
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            gate_up_out = gate_up[e].double() @ x[t].double()
            act = F.silu(gate_up_out[:inter]) * gate_up_out[inter:]
            out[t] += weights[t, k].double() * (down[e].double() @ act.bfloat16().double())
    return out


def random_routing(tokens, experts, top_k, seed, only=None):
    """Router output for random logits; `only` restricts the choice to those experts."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    if only is not None:
        blocked = torch.ones(experts, dtype=torch.bool)
        blocked[only] = False
        logits = logits.masked_fill(blocked, -1e4)
    return route(logits.bfloat16(), top_k)


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
    got = kernels.moe(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    expected = moe_formula(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    assert got.dtype == torch.bfloat16
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-6, atol=1e-4)


def test_moe_silu_holds_for_large_and_tiny_gate_values():
    """The kernel's own vectorised exp inside SiLU, over gates from about -400 to 400 (beyond
    float32's exp range in both directions) and near zero."""
    x = bf16(2, 32, seed=14)
    gate_up = bf16(4, 32, 32, scale=1.0, seed=15)
    gate_up[:, :16] *= torch.logspace(-3, 2, 16).bfloat16()[:, None]  # gate rows, many scales
    down = bf16(4, 32, 16, scale=0.1, seed=16)
    routing = random_routing(2, 4, 2, seed=17)
    got = kernels.moe(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    expected = moe_formula(x, gate_up, down, routing.top_k_indices, routing.top_k_weights)
    assert torch.isfinite(got).all()
    assert_close(got.double(), expected.bfloat16().double(), rtol=2**-6, atol=1e-3)


def test_moe_matches_the_pytorch_experts(monkeypatch):
    """The same layer through the grouped-GEMM path (kernels off) and the kernel."""
    model = tiny_model().to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    x = bf16(7, model.config.hidden_size, seed=9)
    routing = random_routing(7, model.config.num_experts, model.config.num_experts_per_tok, 10)
    with torch.no_grad():
        fast = experts(x, routing)
        monkeypatch.setattr(kernels, "applies", lambda *args: False)
        reference = experts(x, routing)
    relative = (fast.float() - reference.float()).norm() / reference.float().norm()
    assert relative < 1e-2


def logits_per_step(model, prompt, steps=6):
    """Greedy decoding by hand: the prompt's last logits, then each new token's."""
    out = []
    with torch.inference_mode():
        cache, ids = None, prompt
        for _ in range(steps):
            result = model(ids, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            out.append(result.logits[:, -1].float())
            ids = result.logits[:, -1:].argmax(-1)
    return torch.cat(out)


def count_calls(monkeypatch, names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_decoding_uses_the_kernels_and_matches_pytorch(monkeypatch):
    model = tiny_model(seed=2).to(torch.bfloat16)
    calls = count_calls(monkeypatch, ["linear", "moe", "decode_layers"])
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    fast = logits_per_step(model, prompt)
    layers = model.config.num_hidden_layers
    # the 6-token prompt through the per-operation kernels (q, k, v, o, the router; the
    # experts), each of the 5 new tokens through one fused call for all layers; the LM head 6
    # times
    assert calls["moe"] == layers and calls["linear"] == 5 * layers + 6
    assert calls["decode_layers"] == 5
    monkeypatch.setattr(kernels, "applies", lambda *args: False)
    monkeypatch.setattr(kernels, "small_bf16", lambda *args: False)
    reference = logits_per_step(model, prompt)
    relative = (fast - reference).norm() / reference.norm()
    assert relative < 2e-2


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_decode_layer_equals_the_per_operation_kernels_exactly(monkeypatch, int8, padded):
    """Same operations, same roundings: the fused layer must reproduce the per-operation path
    bit for bit, with bf16 or int8 experts, with and without a padding mask."""
    from olmoe.model import OlmoeModel
    from olmoe.quantize import quantize_model

    model = tiny_model(seed=3, num_key_value_heads=2).to(torch.bfloat16)
    if int8:
        quantize_model(model)
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3], [1, 1, 8, 9, 10, 11]])

    def run():
        if not padded:
            return logits_per_step(model, prompt)
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
        with torch.inference_mode():
            return torch.stack([logits.float() for logits in _steps(model, prompt, mask)])

    calls = count_calls(monkeypatch, ["decode_layers"])
    fused = run()
    steps = calls["decode_layers"]
    assert steps > 0
    monkeypatch.setattr(OlmoeModel, "_decode_fused", lambda *args: None)
    assert torch.equal(fused, run())
    assert calls["decode_layers"] == steps  # the per-operation path ran


def test_decode_weights_are_gathered_once_and_again_after_a_change(monkeypatch):
    """The native decode step reuses the weights it gathered until a module changes: a
    replaced parameter is used from the next step on, and a cast falls back to PyTorch."""
    from olmoe.model import OlmoeDecoderLayer

    model = tiny_model(seed=4).to(torch.bfloat16)
    gathered = {"layers": 0}
    original = OlmoeDecoderLayer.decode_arguments

    def counted(self):
        gathered["layers"] += 1
        return original(self)

    monkeypatch.setattr(OlmoeDecoderLayer, "decode_arguments", counted)
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    first = logits_per_step(model, prompt)  # 5 decode steps, one gathering
    layers = model.config.num_hidden_layers
    assert gathered["layers"] == layers
    assert torch.equal(first, logits_per_step(model, prompt))
    assert gathered["layers"] == layers

    proj = model.model.layers[1].self_attn.o_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 2)
    changed = logits_per_step(model, prompt)
    assert gathered["layers"] == 2 * layers
    fresh = tiny_model(seed=4).to(torch.bfloat16)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(changed, logits_per_step(fresh, prompt))
    assert not torch.equal(changed, first)

    model.float()  # the gathered bf16 weights no longer fit: PyTorch decodes
    calls = count_calls(monkeypatch, ["decode_layers"])
    assert torch.equal(logits_per_step(model, prompt), logits_per_step(fresh.float(), prompt))
    assert calls["decode_layers"] == 1  # refused once, before writing anything
    model.bfloat16()
    assert torch.equal(logits_per_step(model, prompt), changed)
    assert calls["decode_layers"] == 1 + 5


def _steps(model, prompt, mask, steps=5):
    """Logits (B, V) of a left-padded batch: the prompt's last, then each greedy step's."""
    from olmoe import KVCache
    from olmoe.generation import decode_step, prefill

    cache = KVCache(model.config.num_hidden_layers, capacity=prompt.shape[1] + steps)
    logits = prefill(model, prompt, cache, mask)
    yield logits
    for _ in range(steps - 1):
        tokens = logits.argmax(-1)  # (B,)
        positions = mask.sum(dim=1)  # each sequence's count of real tokens so far
        mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)
        logits = decode_step(model, tokens, positions, cache, mask)
        yield logits


def test_kernels_stay_out_of_training_and_float32():
    model = tiny_model()
    x = torch.randn(1, 3, model.config.hidden_size)
    assert not kernels.applies(x, model.lm_head.weight)  # float32
    model = model.to(torch.bfloat16)
    assert kernels.applies(x.bfloat16(), model.lm_head.weight) is False  # needs a gradient
    with torch.no_grad():
        assert kernels.applies(x.bfloat16(), model.lm_head.weight)
        big = torch.randn(1, kernels.MAX_TOKENS + 1, model.config.hidden_size).bfloat16()
        assert not kernels.applies(big, model.lm_head.weight)  # prefill: a GEMM


def test_greedy_generation_in_bf16_with_kernels_runs_to_length():
    model = tiny_model(seed=4, eos_token_id=None).to(torch.bfloat16)
    steps = list(generate_tokens(model, torch.tensor([[1, 2, 3]]), 20))
    assert len(steps) == 20


def test_read_all_touches_every_byte():
    buffer = torch.zeros(1 << 16, dtype=torch.uint8)
    empty = kernels.read_all(buffer)
    buffer[12345] = 7  # a change anywhere changes the checksum
    assert kernels.read_all(buffer) != empty


def test_rms_norm_rounds_like_the_pytorch_module(monkeypatch):
    from olmoe.model import OlmoeRMSNorm

    norm = OlmoeRMSNorm(96).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(bf16(96, seed=11) + 1)
    x = bf16(2, 3, 96, scale=3.0, seed=12)
    with torch.no_grad():
        fast = norm(x)
        monkeypatch.setattr(kernels, "small_bf16", lambda *args: False)
        reference = norm(x)
    # the same two roundings; float32 sums in another order may move a value by one bf16 step
    assert_close(fast, reference, rtol=2**-7, atol=0)
    assert (fast == reference).float().mean() > 0.95


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
    got = kernels.decode_attention(q, k, v, mask, dim**-0.5)
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
    got = kernels.GroupedLinear.apply(x, weight, counts)
    got.backward(grad)
    x_ref, weight_ref = x.detach().requires_grad_(), weight.detach().requires_grad_()
    chunks = torch.split(x_ref, counts.tolist())
    expected = torch.cat([chunk @ weight_ref[e].T for e, chunk in enumerate(chunks)])
    expected.backward(grad)
    assert got.shape == (x.shape[0], 24)
    assert torch.equal(got, expected)
    assert torch.equal(x.grad, x_ref.grad)
    assert_close(weight.grad, weight_ref.grad, rtol=0, atol=0)


def test_experts_run_side_by_side_only_for_bf16_with_threads():
    weight = bf16(4, 8, 16)
    x = bf16(5, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kernels.grouped_applies(x, weight)
        assert not kernels.grouped_applies(x.float(), weight.float())
        torch.set_num_threads(1)  # one thread: nothing to run side by side
        assert not kernels.grouped_applies(x, weight)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("routing_kind", ["random", "few experts", "one token"])
@pytest.mark.parametrize("int8", [False, True])
def test_fused_prefill_experts_equal_the_separate_steps_exactly(monkeypatch, routing_kind, int8):
    """A prefill's experts in one native pass per expert give the bits of the separate grouped
    steps (gather, GEMM, SiLU, GEMM, scatter, weighting), idle experts included."""
    from olmoe.moe import grouped_experts
    from olmoe.quantize import quantize_rows

    experts, tokens, top_k, hidden, inter = 6, 9, 2, 40, 24
    if routing_kind == "one token":
        tokens = 1
    x = bf16(tokens, hidden, seed=21)
    gate_up = bf16(experts, 2 * inter, hidden, scale=0.2, seed=22)
    down = bf16(experts, hidden, inter, scale=0.2, seed=23)
    logits = bf16(tokens, experts, seed=24)
    if routing_kind == "few experts":  # every token to experts 1 and 4; the others idle
        logits[:, [1, 4]] += 20
    routing = route(logits, top_k)
    scales = None
    if int8:
        (gate_up, gate_up_scale), (down, down_scale) = quantize_rows(gate_up), quantize_rows(down)
        scales = (gate_up_scale, down_scale)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            assert kernels.fused_experts_applies(x, gate_up)
            fused = grouped_experts(x, routing, gate_up, down, scales=scales)
            monkeypatch.setattr(kernels, "fused_experts_applies", lambda *args: False)
            separate = grouped_experts(x, routing, gate_up, down, scales=scales)
    finally:
        torch.set_num_threads(threads)
    assert fused.shape == (tokens, hidden)
    assert torch.equal(fused, separate)


def test_fused_prefill_experts_stay_out_of_training():
    x, weight = bf16(5, 16), bf16(4, 8, 16).requires_grad_()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not kernels.fused_experts_applies(x, weight)  # a graph is recorded for weight
        with torch.no_grad():
            assert kernels.fused_experts_applies(x, weight)
    finally:
        torch.set_num_threads(threads)
