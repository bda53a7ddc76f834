"""Fine-tuning runs (sft, dpo, kto) on a tiny model with the OLMo tokenizer: they learn what
their objective asks, DPO starts at ln 2, and a resumed run ends with the same weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer
from olmoe.errors import ConfigError, DataError
from olmoe.train import load_config, state, train

TORCHRUN = Path(sys.executable).parent / "torchrun"
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random model with OLMoE's vocabulary, its tokenizer (Tulu chat template) beside."""
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, pad_token_id=1)
    OlmoeForCausalLM(config).save_pretrained(directory)
    Tokenizer.olmo().save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records(count=16):
    return [
        {
            "messages": [
                {"role": "user", "content": f"Name colour {i % 8}."},
                {"role": "assistant", "content": COLOURS[i % 8]},
            ]
        }  # fmt: skip
        for i in range(count)
    ]


def dpo_records(count=16):
    return [
        {
            "prompt": f"Name colour {i % 8}.",
            "chosen": COLOURS[i % 8],
            "rejected": COLOURS[(i + 3) % 8],
        }  # fmt: skip
        for i in range(count)
    ]


def kto_records(count=16):
    return [
        {"prompt": f"Name colour {i % 8}.",
         "completion": COLOURS[i % 8] if i % 2 else COLOURS[(i + 3) % 8], "label": bool(i % 2)}
        for i in range(count)
    ]  # fmt: skip


def config_file(folder: Path, base: Path, objective: str, records, steps=6, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{objective}.jsonl", records)
    valid = write_jsonl(folder / f"{objective}-valid.jsonl", records[:4])
    lines = [
        f"run_dir: {folder / 'run'}",
        f"objective: {objective}",
        f"model: {{init_from: {base}}}",
        f"data: {{path: {data}, valid_path: {valid}, seq_len: 64}}",
        "optim: {lr: 1.0e-3, weight_decay: 0.0}",
        "schedule: {name: linear, warmup_ratio: 0.1, final_lr_ratio: 0.0}",
        f"train: {{max_steps: {steps}, global_batch_examples: 4, micro_batch_size: 2, "
        "precision: fp32, threads: 1}",
        "eval: {every: 0, batches: 1, unigram_baseline: false}",
        "checkpoint: {every: 3, keep: 0}",
        *extra.get("lines", []),
    ]
    path = folder / f"{objective}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def test_sft_learns_the_answers_and_saves_a_chat_model(base, tmp_path):
    result = train(load_config(config_file(tmp_path, base, "sft", sft_records(), steps=16,
                                           lines=["optim: {lr: 2.0e-2, weight_decay: 0.0}"])),
                   progress=False)  # fmt: skip
    steps, evaluations = log(result.run_dir)
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert steps[-1]["ce"] < steps[0]["ce"] - 1.0
    assert steps[0]["lb"] > 0 and all(r["z"] >= 0 for r in steps)  # logged, not added (coef 0)
    assert evaluations and evaluations[-1]["val_loss"] < steps[0]["ce"]
    tokenizer = Tokenizer.from_pretrained(result.run_dir)
    assert "<|assistant|>" in tokenizer.chat_template  # the chat template travels with it
    theirs = transformers.AutoTokenizer.from_pretrained(result.run_dir)
    chat = sft_records()[0]["messages"][:1]
    ours_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    their_ids = theirs.apply_chat_template(chat, add_generation_prompt=True)
    their_ids = their_ids if isinstance(their_ids, list) else their_ids["input_ids"]
    assert ours_ids == list(their_ids)
    assert transformers.OlmoeForCausalLM.from_pretrained(result.run_dir) is not None
    assert (result.run_dir / "data-train" / "metadata.json").is_file()


def test_dpo_starts_at_ln2_and_separates_chosen_from_rejected(base, tmp_path):
    config = load_config(config_file(tmp_path, base, "dpo", dpo_records(), steps=10))
    assert config.loss.lb_coef == 0 and config.loss.z_coef == 0  # the adaptation default
    result = train(config, progress=False)
    steps, evaluations = log(result.run_dir)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["loss"] < math.log(2)
    for key in ("rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in steps[-1]
    assert "val_rewards/accuracies" in evaluations[-1]
    assert (result.run_dir / "reference_logps.npy").is_file()


def test_kto_logs_its_kl_and_rewards(base, tmp_path):
    result = train(load_config(config_file(tmp_path, base, "kto", kto_records(), steps=4,
                                           lines=["optim: {name: rmsprop, lr: 1.0e-4}"])),
                   progress=False)  # fmt: skip
    steps, _ = log(result.run_dir)
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0) at the start
    assert all(r["kl"] >= 0 for r in steps)
    assert "rewards/chosen" in steps[-1] or "rewards/rejected" in steps[-1]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_resumed_run_reproduces_the_uninterrupted_one_exactly(base, tmp_path, objective):
    """Steps 4-6 resumed from the step-3 checkpoint (a copy of the run, its prepared data and
    reference log-probabilities included) come out bit for bit, in float32 on the CPU."""
    records = sft_records() if objective == "sft" else dpo_records()
    config = load_config(config_file(tmp_path, base, objective, records))
    straight = train(config, progress=False)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight.run_dir, resumed_dir)
    checkpoint = resumed_dir / "checkpoints" / state.checkpoint_name(3)
    config.run_dir = str(resumed_dir)
    resumed = train(config, resume=checkpoint, progress=False)
    a = load_file(straight.run_dir / "model.safetensors")
    b = load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    curve = [(r["step"], r["loss"], r["grad_norm"]) for r in log(straight.run_dir)[0]]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in log(resumed_dir)[0]] == curve


def test_wrong_data_and_missing_model_are_config_errors(base, tmp_path):
    path = config_file(tmp_path, base, "dpo", sft_records())
    with pytest.raises(DataError, match="dpo data"):
        train(load_config(path), progress=False)
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(None, ["--objective=sft", f"--data.path={path}"])


def test_a_fresh_run_reads_the_data_file_again(base, tmp_path):
    """A new (not resumed) run in a directory an earlier run used, on a data file that changed
    since: it prepares the new file and computes its reference log-probabilities afresh, so DPO
    starts at ln 2 again on the new pairs (chosen and rejected swapped here)."""
    first = train(load_config(config_file(tmp_path, base, "dpo", dpo_records(), steps=1)),
                  progress=False)  # fmt: skip
    before = log(first.run_dir)[0][0]
    swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in dpo_records()]
    second = train(load_config(config_file(tmp_path, base, "dpo", swapped, steps=1)),
                   progress=False)  # fmt: skip
    assert first.run_dir == second.run_dir
    after = log(second.run_dir)[0][0]
    assert after["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert after["logps/chosen"] == pytest.approx(before["logps/rejected"], rel=1e-5)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_processes_match_one(base, tmp_path, objective):
    """torchrun with 2 FSDP ranks of 2 examples each against one process accumulating the same
    two micro-batches per step: the same losses within float32 summation order."""
    records = sft_records() if objective == "sft" else dpo_records()
    config_path = config_file(tmp_path, base, objective, records, steps=4)
    one = train(load_config(config_path, [f"--run_dir={tmp_path / 'one'}"]), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "olmoe", "train"]
    command += [str(config_path), f"--run_dir={tmp_path / 'two'}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ones, twos = log(one.run_dir)[0], log(tmp_path / "two")[0]
    assert [r["step"] for r in twos] == [1, 2, 3, 4]
    keys = ["loss", "grad_norm", "lr"] + (["ce"] if objective == "sft" else ["rewards/margins"])
    for a, b in zip(ones, twos):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_padding_is_left_out_of_the_routing_statistics(base, tmp_path):
    """Examples of different lengths in one micro-batch: the expert counts cover exactly the
    real tokens of the step, not the padding."""
    records = sft_records(4)
    records[0]["messages"][1]["content"] = "a much longer answer " * 5
    config = load_config(config_file(tmp_path, base, "sft", records[:4], steps=1))
    result = train(config, progress=False)
    step = log(result.run_dir)[0][0]
    tokens = step["tokens"]  # the real tokens of the step's four examples
    k = 2  # OlmoeConfig.tiny's top-k
    assert all(sum(layer) == tokens * k for layer in step["expert_counts"])


def test_plot_draws_the_preference_metrics(base, tmp_path):
    from olmoe.train.plot import plot_run

    result = train(load_config(config_file(tmp_path, base, "dpo", dpo_records(), steps=2)),
                   progress=False)  # fmt: skip
    written = plot_run(result.run_dir, tmp_path / "plots")
    assert [p.name for p in written] == ["curves.png", "expert_load.png", "preference.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_packing_computes_each_example_as_alone():
    """Packed rows with a block-diagonal mask and restarting positions give each example the
    log-probabilities it gets padded on its own row."""
    from olmoe.train.adaptation import pack_batch, pad_batch
    from olmoe.train.preference import token_logps

    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig.tiny()).eval()
    rng = torch.Generator().manual_seed(1)
    sequences = []
    for length in (5, 9, 3, 7):
        ids = torch.randint(2, 128, (length,), generator=rng).numpy()
        labels = ids.copy()
        labels[: length // 2] = -100
        sequences.append((ids, labels))
    with torch.no_grad():
        ids, labels = pad_batch(sequences, pad_id=1)
        padded = token_logps(model(ids).logits, labels)[0].sum()
        ids, labels, positions, mask, lengths = pack_batch(sequences, 16, pad_id=1)
        assert ids.shape[0] == 2 and lengths.tolist() == [14, 10]  # 5 + 9, then 3 + 7
        out = model(ids, attention_mask=mask, position_ids=positions).logits
        packed = token_logps(out, labels)[0].sum()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


def test_sft_with_packing_trains_on_the_same_tokens(base, tmp_path):
    path = config_file(tmp_path / "p", base, "sft", sft_records(), steps=2)
    packed = train(load_config(path, ["--data.packing=true"]), progress=False)
    padded = train(load_config(config_file(tmp_path / "q", base, "sft", sft_records(), steps=2)),
                   progress=False)  # fmt: skip
    a, b = log(packed.run_dir)[0], log(padded.run_dir)[0]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert a[0]["ce"] == pytest.approx(b[0]["ce"], rel=1e-5)  # the same first step
