"""The released adaptation recipes (configs/OLMoE-1B-7B-0924-{SFT,DPO,KTO}.yaml) validate, carry
the numbers of the runs that trained OLMoE-1B-7B-0924-SFT and -Instruct (allenai/OLMoE README and
logs, trl 0.9.6 for KTO), and run as written once the model, data and sizes are scaled down."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer
from olmoe.train import load_config, train
from olmoe.train.schedule import learning_rate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def recipe(name: str, overrides: list[str] = ()):
    return load_config(CONFIGS / f"OLMoE-1B-7B-0924-{name}.yaml", list(overrides))


def steps(examples: int, batch: int, epochs: int) -> int:
    """Optimizer steps of a run that takes every example once per epoch, the last batch short."""
    return epochs * math.ceil(examples / batch)


def lr_at(config, step: int) -> float:
    return learning_rate(step, config.optim.lr, config.schedule, config.train.max_steps)


def test_sft_recipe_is_the_released_run():
    config = recipe("SFT")
    assert config.objective == "sft" and config.model.init_from == "allenai/OLMoE-1B-7B-0924"
    assert config.train.global_batch_examples == 128
    assert config.train.micro_batch_size == 2  # as released: the summed loss scales with it
    assert config.train.max_steps == steps(607_950, 128, epochs=2) == 9500
    assert config.optim.name == "adamw" and config.optim.lr == 2e-5
    assert config.optim.betas == (0.9, 0.999) and config.optim.eps == 1e-8
    assert config.optim.weight_decay == 0 and config.optim.grad_clip == 1.0
    assert config.schedule.name == "linear" and config.schedule.warmup_ratio == 0.03
    assert lr_at(config, 285) == pytest.approx(2e-5)  # 3% of 9,500 steps of warmup
    assert lr_at(config, 9500) == 0
    assert config.data.seq_len == 4096 and config.preference.sft_reduction == "sum"
    assert config.train.precision == "bf16"
    assert config.loss.lb_coef == 0 and config.loss.z_coef == 0
    assert config.data.path.endswith(".jsonl")  # a placeholder for the downloaded mix


def test_dpo_recipe_is_the_released_run():
    config = recipe("DPO")
    assert config.objective == "dpo" and config.model.init_from == "allenai/OLMoE-1B-7B-0924-SFT"
    assert config.train.global_batch_examples == 32
    assert config.train.max_steps == steps(60_917, 32, epochs=3) == 5712
    assert config.optim.name == "adamw" and config.optim.lr == 5e-7
    assert config.optim.betas == (0.9, 0.999) and config.optim.weight_decay == 0
    assert config.optim.grad_clip == 1.0
    assert config.schedule.name == "linear" and config.schedule.warmup_ratio == 0.1
    assert lr_at(config, 571) == pytest.approx(5e-7) and lr_at(config, 5712) == 0
    pref = config.preference
    assert pref.beta == 0.1 and pref.loss_type == "sigmoid" and pref.label_smoothing == 0
    assert pref.reference is None  # the starting (SFT) model
    assert config.data.seq_len == 4096 and config.train.precision == "bf16"
    assert config.loss.lb_coef == 0 and config.loss.z_coef == 0


def test_kto_recipe_is_the_released_run():
    config = recipe("KTO")
    assert config.objective == "kto" and config.model.init_from == "allenai/OLMoE-1B-7B-0924-SFT"
    assert config.optim.name == "rmsprop" and config.optim.lr == 5e-7
    assert config.optim.weight_decay == 0 and config.optim.grad_clip == 1.0
    assert config.preference.beta == 0.1
    assert config.preference.desirable_weight == config.preference.undesirable_weight == 1
    assert config.train.global_batch_examples == 32 and config.train.max_steps == 5000
    # trl's default schedule: linear from the first step to 0 at the end of 3 epochs of the
    # pairs' 2 x 61,135 rows, of which the released checkpoint ran 5,000 steps
    assert config.schedule.decay_steps == steps(2 * 61_135, 32, epochs=3) == 11463
    assert lr_at(config, 1) == pytest.approx(5e-7 * (1 - 1 / 11463))
    assert lr_at(config, 5000) == pytest.approx(5e-7 * (1 - 5000 / 11463))
    assert config.data.seq_len == 512  # trl 0.9.6's max_length when none is given
    assert config.loss.lb_coef == 0 and config.loss.z_coef == 0


@pytest.mark.parametrize("name", ["SFT", "DPO", "KTO"])
def test_recipe_headers_say_how_to_run_them(name):
    text = (CONFIGS / f"OLMoE-1B-7B-0924-{name}.yaml").read_text()
    header = text[: text.index("\nrun_dir:")]
    assert f"-m olmoe train configs/OLMoE-1B-7B-0924-{name}.yaml" in header
    assert "torchrun" in header and "load_dataset(" in header and "olmoe data chat" in header
    assert all(len(line) <= 100 for line in text.splitlines())


RECORDS = {
    "SFT": [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(map(str, range(i)))}]}
            for i in range(1, 9)],
    "DPO": [{"prompt": f"Count to {i}.", "chosen": " ".join(map(str, range(i))),
             "rejected": "No."} for i in range(1, 9)],
    "KTO": [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(i))) if i % 2
             else "No.", "label": bool(i % 2)} for i in range(1, 9)],
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, pad_token_id=1)
    OlmoeForCausalLM(config).save_pretrained(directory)
    Tokenizer.olmo().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", ["SFT", "DPO", "KTO"])
def test_recipe_runs_scaled_down(name, tiny_model, tmp_path):
    """Everything but the model, the data and the sizes as the recipe says: bf16 autocast, its
    optimizer, schedule and objective."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS[name]))
    config = recipe(name, [
        f"--run_dir={tmp_path / 'run'}", f"--model.init_from={tiny_model}",
        f"--data.path={data}", "--data.seq_len=64", "--train.max_steps=2",
        "--train.global_batch_examples=4", "--train.micro_batch_size=2", "--train.threads=1",
        "--train.device=cpu", "--checkpoint.every=0",
    ])  # fmt: skip
    result = train(config, progress=False)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in log)
    if name == "DPO":
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # bf16 log-probs
    if name == "KTO":
        assert log[0]["loss"] == pytest.approx(0.5, abs=1e-3)
