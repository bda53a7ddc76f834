"""The CPU engine against the reference model: which calls go native, that they get what the
kernels expect, and that the results are the reference's.

Where the compiled kernels run these tests use them; elsewhere they use the PyTorch stand-in
(tests/engine/standin.py), which has the kernels' signatures, so the engine's wiring is tested on
every machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from olmoe import engine
from olmoe.engine import decode, layers, native
from olmoe.generation import decode_step, generate_tokens, prefill
from olmoe.model import OlmoeAttention, OlmoeModel, OlmoeRMSNorm
from olmoe.moe import grouped_experts, route
from olmoe.quantize import Int4Experts, Int8Experts, Int8Linear, quantize_model
from tests.conftest import tiny_model
from tests.engine import standin
from tests.engine.helpers import bf16, random_routing


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The compiled kernels where they run, the stand-in elsewhere; yields the module used."""
    compiled = native.compiled()
    if compiled is None:
        monkeypatch.setattr(native, "compiled", lambda: standin)
        compiled = standin
    return compiled


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def count_calls(monkeypatch, names):
    """Count calls of the engine's native entry points `names`."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(native, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(native, name, counted)
    return calls


def count_plans(monkeypatch):
    made = {"plans": 0}
    original = decode._make_plan

    def counted(model):
        made["plans"] += 1
        return original(model)

    monkeypatch.setattr(decode, "_make_plan", counted)
    return made


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


def padded_steps(model, prompt, mask, steps=5):
    """Logits (B, V) of a left-padded batch: the prompt's last, then each greedy step's."""
    from olmoe import KVCache

    cache = KVCache(model.config.num_hidden_layers, capacity=prompt.shape[1] + steps)
    with torch.inference_mode():
        logits = prefill(model, prompt, cache, mask)
        out = [logits.float()]
        for _ in range(steps - 1):
            tokens = logits.argmax(-1)  # (B,)
            positions = mask.sum(dim=1)  # each sequence's count of real tokens so far
            mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)
            logits = decode_step(model, tokens, positions, cache, mask)
            out.append(logits.float())
    return torch.stack(out)


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------- apply / remove
def test_apply_swaps_classes_in_place_and_remove_gives_the_reference_back():
    model = tiny_model().to(torch.bfloat16)
    parameters = dict(model.named_parameters())
    assert engine.apply(model) is model and engine.applied(model)
    assert type(model.model) is decode.CpuOlmoeModel
    assert type(model.lm_head) is layers.CpuLinear
    assert type(model.model.layers[0].mlp.experts) is layers.CpuExperts
    assert type(model.model.layers[0].self_attn) is layers.CpuAttention
    # the same Parameter objects under the same names: optimizers and checkpoints see no change
    assert dict(model.named_parameters()) == parameters
    engine.apply(model)  # again: nothing changes
    assert type(model.model) is decode.CpuOlmoeModel
    engine.remove(model)
    assert not engine.applied(model)
    assert type(model.model) is OlmoeModel
    assert type(model.model.layers[0].self_attn) is OlmoeAttention
    assert type(model.model.norm) is OlmoeRMSNorm
    assert type(model.lm_head) is torch.nn.Linear


def test_apply_changes_nothing_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(native, "compiled", lambda: None)
    model = engine.apply(tiny_model())
    assert not engine.applied(model)


@pytest.mark.parametrize("switch", [{"moe_dropless": False}, {"qk_norm": False},
                                    {"mlp_only_layers": [0]}])  # fmt: skip
def test_apply_leaves_a_model_with_design_switches_to_the_reference(switch):
    """The engine's modules implement the released design only."""
    model = engine.apply(tiny_model(**switch).to(torch.bfloat16))
    assert not engine.applied(model)
    assert engine.applied(engine.apply(tiny_model(init_cutoff_factor=None).to(torch.bfloat16)))


def test_a_users_subclass_keeps_its_forward():
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_model()
    model.lm_head = Doubled(model.config.hidden_size, model.config.vocab_size, bias=False)
    engine.apply(model)
    assert type(model.lm_head) is Doubled


def test_apply_after_quantising_gives_the_int8_modules_their_engine_classes():
    model = quantize_model(engine.apply(tiny_model().to(torch.bfloat16)))
    assert type(model.lm_head) is Int8Linear  # swapped in by quantize_model, after apply
    engine.apply(model)
    assert type(model.lm_head) is layers.CpuInt8Linear
    assert type(model.model.layers[1].mlp.experts) is layers.CpuInt8Experts
    engine.remove(model)
    assert type(model.model.layers[1].mlp.experts) is Int8Experts


def test_apply_gives_the_int4_modules_their_engine_classes():
    model = engine.apply(quantize_model(tiny_model().to(torch.bfloat16), "int4"))
    assert type(model.model.layers[1].self_attn.v_proj) is layers.CpuInt4Linear
    assert type(model.model.layers[1].mlp.experts) is layers.CpuInt4Experts
    assert type(model.lm_head) is layers.CpuInt8Linear
    engine.remove(model)
    assert type(model.model.layers[1].mlp.experts) is Int4Experts


# ---------------------------------------------------------------------------- the rules
def test_kernels_stay_out_of_training_and_float32():
    x = torch.randn(1, 3, 32)
    weight = torch.randn(64, 32)
    assert not layers.streams(x, weight)  # float32
    weight = weight.bfloat16().requires_grad_()
    assert not layers.streams(x.bfloat16(), weight)  # a gradient is recorded
    with torch.no_grad():
        assert layers.streams(x.bfloat16(), weight)
        big = torch.randn(1, layers.MAX_TOKENS + 1, 32).bfloat16()
        assert not layers.streams(big, weight)  # a prefill: a GEMM


def test_experts_run_side_by_side_only_for_bf16_with_threads(monkeypatch, two_threads):
    weight, x = bf16(4, 8, 16), bf16(5, 16)
    assert layers.side_by_side(x, weight)
    assert not layers.side_by_side(x.float(), weight.float())
    for quantised in (
        torch.zeros(4, 8, 16, dtype=torch.int8),
        torch.zeros(4, 8, 8, dtype=torch.uint8),
    ):
        assert layers.side_by_side(x, quantised)
        assert not layers.side_by_side(x.requires_grad_(), quantised)  # no backward here
        x = x.detach()
    torch.set_num_threads(1)  # one thread: nothing to run side by side...
    monkeypatch.setattr(native, "bf16_gemm", lambda: True)
    assert not layers.side_by_side(x.detach(), weight)
    monkeypatch.setattr(native, "bf16_gemm", lambda: False)
    assert layers.side_by_side(x.detach(), weight)  # ...but PyTorch would emulate bf16 there


def test_prefill_gemms_go_native_in_float32_only_where_bf16_gemms_are_emulated(monkeypatch):
    """Without bf16 instructions (the AVX2 back end) a prefill's bf16 linear layers and router
    multiply natively in float32; elsewhere they stay oneDNN's bf16 GEMMs. Both give the
    reference's logits."""
    model = tiny_model(seed=11).bfloat16().eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = model(ids).logits
    engine.apply(model)
    for emulated in (False, True):
        monkeypatch.setattr(native, "bf16_gemm", lambda e=emulated: not e)
        calls = count_calls(monkeypatch, ["prefill_linear"])
        with torch.no_grad():
            got = model(ids).logits
        layers_count = model.config.num_hidden_layers
        # q, k, v, o and the router per layer, and the LM head
        assert calls["prefill_linear"] == (5 * layers_count + 1 if emulated else 0)
        assert_close(got.float(), expected.float(), rtol=2**-6, atol=2**-6)


# ---------------------------------------------------------------------------- decoding
def test_decoding_uses_the_kernels_and_matches_the_reference(monkeypatch):
    reference = tiny_model(seed=2).to(torch.bfloat16)
    model = engine.apply(copy.deepcopy(reference))
    calls = count_calls(monkeypatch, ["linear", "moe", "decode_layers"])
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    fast = logits_per_step(model, prompt)
    layer_count = model.config.num_hidden_layers
    # the 6-token prompt through the per-module kernels (q, k, v, o, the router; the experts),
    # each of the 5 new tokens through one call for all layers; the LM head 6 times
    assert calls["moe"] == layer_count and calls["linear"] == 5 * layer_count + 6
    assert calls["decode_layers"] == 5
    assert relative_error(fast, logits_per_step(reference, prompt)) < 2e-2


@pytest.mark.parametrize("experts", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("padded", [False, True])
def test_one_call_decoding_equals_the_per_module_kernels_exactly(monkeypatch, experts, padded):
    """Same operations, same roundings: the one-call step must reproduce the per-module path
    bit for bit, with bf16, int8 or int4 experts, with and without a padding mask."""
    model = tiny_model(seed=3, num_key_value_heads=2).to(torch.bfloat16)
    if experts != "bf16":
        quantize_model(model, experts)
    engine.apply(model)
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3], [1, 1, 8, 9, 10, 11]])

    def run():
        if not padded:
            return logits_per_step(model, prompt)
        return padded_steps(model, prompt, torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))

    calls = count_calls(monkeypatch, ["decode_layers"])
    one_call = run()
    steps = calls["decode_layers"]
    assert steps > 0
    monkeypatch.setattr(decode, "decode_step", lambda *args: None)
    assert torch.equal(one_call, run())
    assert calls["decode_layers"] == steps  # the per-module path ran


def test_decoding_sees_a_replaced_parameter_and_a_cast(monkeypatch):
    """The plan is made once and kept while the model's modules and parameters stay in place: a
    replaced parameter or module is used from the next step on; after a cast to float32 the
    reference decodes, and after a cast back the same plan serves again."""
    model = engine.apply(tiny_model(seed=4).to(torch.bfloat16))
    made = count_plans(monkeypatch)
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    first = logits_per_step(model, prompt)
    assert torch.equal(first, logits_per_step(model, prompt))
    assert made["plans"] == 1  # one plan for all ten decode steps
    proj = model.model.layers[1].self_attn.o_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 2)
    changed = logits_per_step(model, prompt)
    assert made["plans"] == 2
    model.model.layers[0].mlp.experts = copy.deepcopy(model.model.layers[0].mlp.experts)
    assert torch.equal(logits_per_step(model, prompt), changed)
    assert made["plans"] == 3  # a replaced module is seen too
    fresh = engine.apply(tiny_model(seed=4).to(torch.bfloat16))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(changed, logits_per_step(fresh, prompt))
    assert not torch.equal(changed, first)

    model.float()
    calls = count_calls(monkeypatch, ["decode_layers", "linear"])
    reference = engine.remove(copy.deepcopy(fresh)).float()
    assert torch.equal(logits_per_step(model, prompt), logits_per_step(reference, prompt))
    assert calls == {"decode_layers": 0, "linear": 0}
    model.bfloat16()
    assert torch.equal(logits_per_step(model, prompt), changed)


def test_the_kernel_refusing_its_weights_falls_back_before_writing(monkeypatch):
    """A weight the kernel does not take (here: not contiguous) makes it return nothing, and
    the step runs through the per-module path with the cache untouched."""
    model = engine.apply(tiny_model(seed=5).to(torch.bfloat16))
    prompt = torch.tensor([[5, 17, 42, 7]])
    expected = logits_per_step(model, prompt)
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().T.contiguous().T)  # same values
    assert not proj.weight.is_contiguous()
    if native.compiled() is standin:  # the stand-in takes any layout: make it refuse as cpu.cpp
        monkeypatch.setattr(standin, "_fits", lambda weights: False)
    calls = count_calls(monkeypatch, ["decode_layers"])
    assert torch.equal(logits_per_step(model, prompt), expected)
    assert calls["decode_layers"] == 5  # asked at each step, refused each time


def test_routing_is_returned_from_one_call_decoding():
    reference = tiny_model(seed=6).to(torch.bfloat16)
    model = engine.apply(copy.deepcopy(reference))
    prompt = torch.tensor([[5, 17, 42, 7]])
    with torch.inference_mode():
        outs = []
        for m in (model, reference):
            cache = m(prompt, use_cache=True).past_key_values
            outs.append(m(torch.tensor([[9]]), past_key_values=cache, output_routing=True))
    fast, slow = outs
    assert len(fast.routing) == model.config.num_hidden_layers
    for a, b in zip(fast.routing, slow.routing):
        assert (
            a.top_k_indices.shape == b.top_k_indices.shape == (1, model.config.num_experts_per_tok)
        )
        assert int(a.tokens_per_expert.sum()) == model.config.num_experts_per_tok


def test_greedy_generation_runs_to_length_on_the_engine():
    model = tiny_model(seed=4, eos_token_id=None).to(torch.bfloat16)
    steps = list(generate_tokens(model, torch.tensor([[1, 2, 3]]), 20))
    assert len(steps) == 20
    assert engine.applied(model)  # generation applied it


# ---------------------------------------------------------------------------- modules
def test_rms_norm_rounds_like_the_reference():
    norm = OlmoeRMSNorm(96).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(bf16(96, seed=11) + 1)
    x = bf16(2, 3, 96, scale=3.0, seed=12)
    fast_norm = engine.apply(copy.deepcopy(norm))
    with torch.no_grad():
        fast, reference = fast_norm(x), norm(x)
    # the same two roundings; float32 sums in another order may move a value by one bf16 step
    assert_close(fast, reference, rtol=2**-7, atol=0)
    assert (fast == reference).float().mean() > 0.95


def test_decode_sized_experts_match_the_reference():
    model = tiny_model().to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    fast_experts = engine.apply(copy.deepcopy(experts))
    x = bf16(7, model.config.hidden_size, seed=9)
    routing = random_routing(7, model.config.num_experts, model.config.num_experts_per_tok, 10)
    with torch.no_grad():
        assert relative_error(fast_experts(x, routing), experts(x, routing)) < 1e-2


@pytest.mark.parametrize("routing_kind", ["random", "few experts", "one token"])
def test_fused_prefill_experts_equal_the_separate_grouped_steps_exactly(
    monkeypatch, two_threads, routing_kind
):
    """A prefill's experts in one native pass per expert give the bits of the separate grouped
    steps (gather, GEMM, SiLU, GEMM, scatter, weighting), idle experts included."""
    e, tokens, top_k, hidden, inter = 6, 9 if routing_kind != "one token" else 1, 2, 40, 24
    x = bf16(tokens, hidden, seed=21)
    gate_up = bf16(e, 2 * inter, hidden, scale=0.2, seed=22)
    down = bf16(e, hidden, inter, scale=0.2, seed=23)
    logits = bf16(tokens, e, seed=24)
    if routing_kind == "few experts":  # every token to experts 1 and 4; the others idle
        logits[:, [1, 4]] += 20
    routing = route(logits, top_k)
    calls = count_calls(monkeypatch, ["grouped_experts"])
    with torch.inference_mode():
        fused = layers.fused_experts(x, routing, gate_up, down)
        separate = grouped_experts(x, routing, gate_up, down, F.silu, native.GroupedLinear.apply)
    assert calls["grouped_experts"] == 1
    assert fused.shape == (tokens, hidden)
    assert torch.equal(fused, separate)


def test_prefill_experts_take_the_fused_pass_without_a_gradient_and_autograd_with_one(
    monkeypatch, two_threads
):
    model = tiny_model(seed=7)
    experts = engine.apply(copy.deepcopy(model.model.layers[0].mlp.experts)).to(torch.bfloat16)
    x = bf16(30, model.config.hidden_size, seed=3)
    routing = random_routing(30, model.config.num_experts, model.config.num_experts_per_tok, 4)
    calls = count_calls(monkeypatch, ["grouped_experts"])
    grouped = []
    monkeypatch.setattr(
        native.GroupedLinear,
        "apply",
        lambda *a, _o=native.GroupedLinear.apply: grouped.append(1) or _o(*a),
    )
    with torch.no_grad():
        experts(x, routing)
    assert calls["grouped_experts"] == 1 and not grouped
    out = experts(x, routing)  # the weights require gradients: autograd's grouped GEMMs
    out.float().sum().backward()
    assert calls["grouped_experts"] == 1 and len(grouped) == 2
    assert experts.gate_up_proj.grad is not None


def test_training_under_autocast_runs_the_experts_in_bf16_side_by_side(monkeypatch, two_threads):
    """float32 weights under bf16 autocast: the experts cast themselves and then run as grouped
    GEMMs side by side, with float32 gradients for the float32 weights."""
    model = engine.apply(tiny_model(seed=8)).train()
    seen = []
    original = native.GroupedLinear.apply

    def spy(x, weight, counts):
        seen.append((x.dtype, weight.dtype))
        return original(x, weight, counts)

    monkeypatch.setattr(native.GroupedLinear, "apply", spy)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)
    grad = model.model.layers[0].mlp.experts.gate_up_proj.grad
    assert grad is not None and grad.dtype == torch.float32


def test_a_float32_training_loss_exponentiates_on_the_engine_and_matches_the_reference(
    monkeypatch,
):
    """A float32 model's training loss (skip_logits) takes each chunk's exponentials from the
    engine's pass, with the reference model's loss and gradients; under bf16 autocast the
    head's operands are bf16 and the loss stays with PyTorch's softmax."""
    model = tiny_model(seed=9).train()
    reference = copy.deepcopy(model)
    engine.apply(model)
    calls = count_calls(monkeypatch, ["exp_logits"])
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=generator)
    losses = []
    for m in (model, reference):
        losses.append(m(input_ids=ids, labels=ids, skip_logits=True).loss)
        losses[-1].backward()
    assert calls["exp_logits"] == 1  # 18 positions: one chunk
    assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6 * theirs.grad.abs().max().item(),
                     msg=name)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids, skip_logits=True).loss.backward()
    assert calls["exp_logits"] == 1


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantised_modules_on_the_engine_match_the_reference(two_threads, method):
    reference = quantize_model(tiny_model(seed=1).to(torch.bfloat16), method)
    model = engine.apply(copy.deepcopy(reference))
    x = bf16(5, model.config.hidden_size, seed=3)
    routing = random_routing(5, model.config.num_experts, model.config.num_experts_per_tok, 4)
    prefill_x = bf16(40, model.config.hidden_size, seed=5)
    prefill_routing = random_routing(
        40, model.config.num_experts, model.config.num_experts_per_tok, 6, only=[1, 2, 5]
    )
    with torch.no_grad():
        for module, args in (
            ("lm_head", (x,)),
            ("self_attn.o_proj", (x,)),  # int4: the streaming kernel
            ("self_attn.o_proj", (prefill_x,)),  # int4: dequantised, one GEMM
            ("mlp.experts", (x, routing)),  # decode-sized: the streaming kernel
            ("mlp.experts", (prefill_x, prefill_routing)),  # a prefill: one pass per expert
        ):
            name = module if module == "lm_head" else f"model.layers.0.{module}"
            fast, slow = model.get_submodule(name), reference.get_submodule(name)
            # int4's decode kernels quantise activations to 8 bits per group of 32 (as
            # llama.cpp's Q8_0); int8's to 15 bits per row
            limit = 3e-2 if method == "int4" and len(args[0]) <= layers.MAX_TOKENS else 1e-2
            assert relative_error(fast(*args), slow(*args)) < limit, module


def test_row_sums_follow_the_weights():
    experts = engine.apply(quantize_model(tiny_model(seed=2).to(torch.bfloat16))).model.layers[0]
    int8 = experts.mlp.experts
    first = layers.row_sum(int8, "down_proj")
    assert torch.equal(first, int8.down_proj.sum(-1, dtype=torch.int32))
    assert layers.row_sum(int8, "down_proj") is first  # kept while the weight stands still
    with torch.no_grad():
        int8.down_proj[0, 0, 0] += 1  # written in place
    assert torch.equal(layers.row_sum(int8, "down_proj"), int8.down_proj.sum(-1, dtype=torch.int32))


def test_decoding_sees_int8_weights_written_in_place(monkeypatch):
    """int8 row sums come from the weights: loading other weights in place makes a new plan."""
    model = engine.apply(quantize_model(tiny_model(seed=9).to(torch.bfloat16)))
    other = engine.apply(quantize_model(tiny_model(seed=10).to(torch.bfloat16)))
    made = count_plans(monkeypatch)
    prompt = torch.tensor([[5, 17, 42, 7]])
    logits_per_step(model, prompt)
    model.load_state_dict(other.state_dict())  # copies into the same tensors
    assert torch.equal(logits_per_step(model, prompt), logits_per_step(other, prompt))
    assert made["plans"] == 3  # model's first, model's after the load, other's


def test_a_model_in_training_mode_decodes_through_the_modules(monkeypatch):
    """train() (attention dropout may be on) keeps the one-call step out even without grad."""
    model = engine.apply(tiny_model(seed=11, attention_dropout=0.0).to(torch.bfloat16)).train()
    calls = count_calls(monkeypatch, ["decode_layers"])
    logits_per_step(model, torch.tensor([[5, 17, 42, 7]]), steps=3)
    assert calls["decode_layers"] == 0


def test_int8_weights_made_under_inference_mode_decode():
    """Inference tensors keep no version counter: the row sums and the plan then follow the
    tensors themselves (this raised before)."""
    prompt = torch.tensor([[5, 17, 42, 7]])
    reference = logits_per_step(
        engine.apply(quantize_model(tiny_model(seed=12).bfloat16())), prompt
    )
    with torch.inference_mode():
        model = engine.apply(quantize_model(tiny_model(seed=12).bfloat16()))
    assert model.lm_head.weight.is_inference()
    assert torch.equal(logits_per_step(model, prompt), reference)
