"""Training's parts on their own: losses against float64 formulas, schedule, optimizer groups,
config validation and overrides."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM, route, switch_aux_loss
from olmoe.errors import ConfigError
from olmoe.train.budget import CALIBRATION_STEPS
from olmoe.train.config import ScheduleSection, TrainConfig, load_config, parse_overrides
from olmoe.train.losses import megablocks_lb_loss, router_z_loss, routing_statistics
from olmoe.train.optim import build_optimizer
from olmoe.train.schedule import learning_rate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _random_logits(layers=3, tokens=40, experts=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(tokens, experts, generator=generator) * 2).requires_grad_()
        for _ in range(layers)
    ]


def _routing(logits, k):
    return [route(z, k) for z in logits]


def _lb_reference(logits64, k):
    """megablocks' batched form: E / (L * T * K) * sum over layers of counts . mean probs."""
    layers, (tokens, experts) = len(logits64), logits64[0].shape
    total = 0
    for z in logits64:
        probs = torch.softmax(z, dim=-1)
        counts = torch.zeros(experts, dtype=torch.float64)
        counts.scatter_add_(0, probs.topk(k).indices.reshape(-1), torch.ones(tokens * k).double())
        total = total + counts @ probs.mean(dim=0)
    return experts / (layers * tokens * k) * total


@pytest.mark.parametrize("k", [1, 2, 3])
def test_megablocks_lb_loss_equals_float64_formula(k):
    logits = _random_logits()
    ours = megablocks_lb_loss(_routing(logits, k))
    ours.backward()
    logits64 = [z.detach().double().requires_grad_() for z in logits]
    reference = _lb_reference(logits64, k)
    reference.backward()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=0)
    for z, z64 in zip(logits, logits64):  # float32 rounding, relative to the largest entry
        atol = 1e-5 * z64.grad.abs().max().item()
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=atol)


def test_megablocks_lb_loss_is_one_under_perfect_balance_and_more_when_collapsed():
    experts, k = 8, 2
    # token t prefers experts t and t+1: every expert gets exactly T*K/E slots, and by symmetry
    # every expert's mean probability is 1/E
    logits = torch.zeros(experts, experts)
    for t in range(experts):
        logits[t, t] = logits[t, (t + 1) % experts] = 3.0
    assert megablocks_lb_loss(_routing([logits, logits], k)).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(16, experts)
    collapsed[:, :2] = 5.0  # every token picks experts 0 and 1
    assert megablocks_lb_loss(_routing([collapsed], k)).item() > 3.5  # approaches E / K = 4
    # transformers' aux_loss (the model's output) has minimum K, not 1: a different quantity
    assert switch_aux_loss(_routing([logits], k), experts).item() == pytest.approx(k, abs=1e-6)


@pytest.mark.parametrize("per_slot", [True, False])
def test_router_z_loss_equals_float64_formula(per_slot):
    k = 2
    logits = _random_logits(layers=2, tokens=30)
    ours = router_z_loss(_routing(logits, k), per_slot=per_slot)
    ours.backward()
    logits64 = [z.detach().double().requires_grad_() for z in logits]
    layers, tokens = len(logits64), logits64[0].shape[0]
    squares = sum((torch.log(torch.exp(z).sum(-1)) ** 2).sum() for z in logits64)
    reference = squares / (layers * tokens * (k if per_slot else 1))
    reference.backward()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=0)
    for z, z64 in zip(logits, logits64):  # float32 rounding, relative to the largest entry
        atol = 1e-5 * z64.grad.abs().max().item()
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=atol)


def test_routing_statistics_counts_the_models_choices():
    logits = _random_logits(layers=2, tokens=10, experts=4)
    stats = routing_statistics(_routing(logits, 2), num_experts=4)
    assert stats.shape == (2, 4 + 3)  # expert counts, entropy, tokens, dropped slots
    for layer, z in enumerate(logits):
        chosen = z.detach().topk(2).indices.reshape(-1)
        assert stats[layer, :4].tolist() == torch.bincount(chosen, minlength=4).double().tolist()
        p = torch.softmax(z.detach().double(), -1)
        assert stats[layer, 4].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
        assert stats[layer, 5:].tolist() == [10.0, 0.0]
    assert routing_statistics([], num_experts=4).shape == (0, 7)  # a dense model


def test_losses_of_a_model_without_experts_are_zero():
    assert megablocks_lb_loss([]).item() == 0 and router_z_loss([]).item() == 0


# ---------------------------------------------------------------------------- schedule
def test_cosine_schedule_warmup_middle_end():
    s = ScheduleSection(name="cosine", warmup_steps=100, decay_steps=1100, final_lr_ratio=0.1)
    peak = 4e-4
    assert learning_rate(1, peak, s, 2000) == pytest.approx(peak / 100)
    assert learning_rate(50, peak, s, 2000) == pytest.approx(peak / 2)
    assert learning_rate(100, peak, s, 2000) == pytest.approx(peak)  # warmup end
    assert learning_rate(600, peak, s, 2000) == pytest.approx((peak + 0.1 * peak) / 2)  # middle
    quarter = 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi / 4))
    assert learning_rate(350, peak, s, 2000) == pytest.approx(quarter)
    assert learning_rate(1100, peak, s, 2000) == pytest.approx(0.1 * peak)  # decay end
    assert learning_rate(2000, peak, s, 2000) == pytest.approx(0.1 * peak)  # constant after
    with pytest.raises(ValueError):
        learning_rate(0, peak, s, 2000)


def test_linear_annealing_and_decay_to_max_steps():
    anneal = ScheduleSection(name="linear", warmup_steps=0, final_lr_ratio=0.0)
    peak = 4e-5
    assert learning_rate(1, peak, anneal, 100) == pytest.approx(peak * 0.99)
    assert learning_rate(50, peak, anneal, 100) == pytest.approx(peak / 2)
    assert learning_rate(100, peak, anneal, 100) == pytest.approx(0.0, abs=1e-18)
    constant = ScheduleSection(name="constant", warmup_steps=10)
    assert learning_rate(5, 1.0, constant, 100) == pytest.approx(0.5)
    assert learning_rate(90, 1.0, constant, 100) == 1.0


def test_released_recipe_config():
    config = load_config(CONFIGS / "OLMoE-1B-7B-0924.yaml")
    assert (config.optim.lr, config.optim.betas, config.optim.eps) == (4e-4, (0.9, 0.95), 1e-8)
    assert config.optim.weight_decay == 0.1 and config.optim.grad_clip == 1.0
    assert config.train.global_batch_tokens == 1024 * 4096 and config.data.seq_len == 4096
    assert (config.loss.lb_coef, config.loss.z_coef) == (0.01, 0.001)
    peak, steps = config.optim.lr, config.train.max_steps
    assert learning_rate(2500, peak, config.schedule, steps) == pytest.approx(4e-4)
    assert learning_rate(steps, peak, config.schedule, steps) == pytest.approx(4e-5)
    assert config.model.build().num_parameters() == 6_919_161_856
    anneal = load_config(CONFIGS / "OLMoE-1B-7B-0924-anneal.yaml")
    assert anneal.model.init_optimizer and anneal.data.seed == 42
    assert learning_rate(1, 4e-5, anneal.schedule, 23842) == pytest.approx(4e-5, rel=1e-4)
    assert learning_rate(23842, 4e-5, anneal.schedule, 23842) == pytest.approx(0, abs=1e-15)
    quickstart = load_config(CONFIGS / "quickstart.yaml")
    model = quickstart.model.build()
    assert model.num_experts >= 8 and model.num_experts_per_tok >= 2
    # A 10-minute budget whose timed steps all fall in the warmup, where max_steps plays no part
    assert quickstart.train.max_minutes == 10 and quickstart.schedule.warmup_ratio is None
    assert quickstart.schedule.warmup_steps > CALIBRATION_STEPS


def test_the_float32_quickstart_differs_from_the_quickstart_only_in_width_and_precision():
    """`make demo` trains configs/quickstart-fp32.yaml where bf16 is emulated: the same run
    (the file's base) but narrower, in float32."""
    quickstart = load_config(CONFIGS / "quickstart.yaml").to_dict()
    narrow = load_config(CONFIGS / "quickstart-fp32.yaml").to_dict()
    assert quickstart["train"].pop("precision") == "auto"
    assert narrow["train"].pop("precision") == "fp32"
    widths = {}
    for config in (quickstart, narrow):
        model = config["model"]["config"]
        widths[model.pop("hidden_size")] = model.pop("num_attention_heads")
    assert widths == {128: 4, 32: 2} and narrow == quickstart


# ---------------------------------------------------------------------------- optimizer
def test_adamw_param_groups_as_configured():
    model = OlmoeForCausalLM(OlmoeConfig.tiny())
    config = TrainConfig.from_dict({"data": {"path": "x"}, "optim": {"lr": 1e-3}})
    optimizer = build_optimizer(model, config.optim)
    assert len(optimizer.param_groups) == 1  # OLMoE decays everything
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
    assert len(group["params"]) == len(list(model.parameters()))

    config = TrainConfig.from_dict({"data": {"path": "x"}, "optim": {"no_decay": ["norm"]}})
    decay, no_decay = build_optimizer(model, config.optim).param_groups
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert {id(p) for p in no_decay["params"]} == norms and no_decay["weight_decay"] == 0.0
    assert not norms & {id(p) for p in decay["params"]} and decay["weight_decay"] == 0.1


# ---------------------------------------------------------------------------- config
def test_overrides_apply_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: tokens}\ntrain: {max_steps: 10}\n")
    config = load_config(
        path,
        [
            "--train.max_steps=20",
            "--optim.lr",
            "1e-3",  # YAML reads 1e-3 as a string; the float field takes it
            "--optim.betas=[0.8, 0.9]",
            "--model.preset=tiny",
            "--model.config.hidden_size=64",
            "--loss.z_loss_per_slot=false",
        ],
    )
    assert config.train.max_steps == 20 and config.optim.lr == 1e-3
    assert config.optim.betas == (0.8, 0.9) and not config.loss.z_loss_per_slot
    assert config.model.build().hidden_size == 64 and config.data.path == "tokens"
    assert load_config(None, config_args := ["--data.path=x"]).data.path == "x"
    assert parse_overrides(config_args) == [("data.path", "x")]


def test_a_config_with_a_base_lays_its_settings_over_the_base(tmp_path):
    (tmp_path / "root.yaml").write_text(
        "data: {path: tokens, seq_len: 64}\noptim: {lr: 1.0e-3, betas: [0.8, 0.9]}\n"
        "model: {preset: tiny, config: {hidden_size: 64, num_hidden_layers: 3}}\n"
    )
    (tmp_path / "mid.yaml").write_text("base: root.yaml\nmodel: {config: {hidden_size: 32}}\n")
    (tmp_path / "leaf.yaml").write_text("base: mid.yaml\noptim: {betas: [0.7, 0.8]}\n")
    config = load_config(tmp_path / "leaf.yaml", ["--data.seq_len=32"])
    assert (config.data.path, config.data.seq_len) == ("tokens", 32)
    assert config.optim.lr == 1e-3 and config.optim.betas == (0.7, 0.8)  # a list is one value
    assert config.model.config == {"hidden_size": 32, "num_hidden_layers": 3}

    (tmp_path / "loop.yaml").write_text("base: again.yaml\n")
    (tmp_path / "again.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="base loop.yaml leads back to a file that names it"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "odd.yaml").write_text("base: [root.yaml]\n")
    with pytest.raises(ConfigError, match="base must name a config file, got"):
        load_config(tmp_path / "odd.yaml")
    (tmp_path / "lost.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="no config file at .*missing.yaml"):
        load_config(tmp_path / "lost.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.max_stepz=3"], "did you mean 'max_steps'"),
        (["--trian.max_steps=3"], "did you mean 'train'"),
        (["--train.max_steps=abc"], "train.max_steps must be an integer"),
        (["--train.max_steps=2.5"], "train.max_steps must be an integer"),
        (["--optim.lr=-1"], "optim.lr must be > 0"),
        (["--optim.betas=[0.9]"], "optim.betas must have 2 entries"),
        (["--train.precision=fp8"], "train.precision must be one of"),
        (["--schedule.name=step"], "schedule.name must be one of"),
        (["--model.config.hidden_sise=3"], "did you mean 'hidden_size'"),
        (["--model.config.num_experts_per_tok=99"], "num_experts_per_tok"),
        (["--data.path="], "data.path is required"),
        (["--loss.z_loss_per_slot=maybe"], "must be true or false"),
        (["train.max_steps=3"], "overrides look like --section.key=value"),
        (["--train.max_steps"], "needs a value"),
    ],
)
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, ["--data.path=tokens", *overrides])


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: {max_steps: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "section.yaml").write_text("data: {path: x}\ntrain: 3\n")
    with pytest.raises(ValueError, match="train must be a mapping"):
        load_config(tmp_path / "section.yaml")
