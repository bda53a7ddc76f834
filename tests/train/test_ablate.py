"""`olmoe ablate`: a suite's variants trained on one data order, finished ones skipped,
interrupted ones resumed, and the comparison written; plus each switch trained a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from olmoe.cli import main
from olmoe.errors import ConfigError
from olmoe.train import load_config, train
from olmoe.train.ablate import _finished, load_suite, run_suite, summarize_run

STEPS = 6


def write_base(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    stream = np.tile(np.arange(2, 100, dtype=np.uint16), 40)
    stream[rng.random(stream.size) < 0.05] = 7
    np.save(folder / "train.npy", stream)
    np.save(folder / "valid.npy", np.tile(np.arange(2, 100, dtype=np.uint16), 4))
    base = folder / "base.yaml"
    base.write_text(
        f"""run_dir: unused
model: {{preset: tiny}}
data: {{path: {folder / "train.npy"}, valid_path: {folder / "valid.npy"}, seq_len: 16}}
optim: {{lr: 1.0e-2}}
schedule: {{warmup_steps: 2}}
train: {{max_steps: {STEPS}, global_batch_tokens: 64, micro_batch_size: 4, precision: fp32,
         threads: 1}}
eval: {{every: 3, batches: 1, unigram_baseline: false}}
checkpoint: {{every: 3, keep: 1}}
"""
    )
    return base


def write_suite(folder: Path, variants: dict, **extra) -> Path:
    write_base(folder)
    suite = {"name": "test suite", "paper": "a finding", "base": "base.yaml",
             "out_dir": str(folder / "out"), "variants": variants, **extra}  # fmt: skip
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_a_suite_trains_compares_and_skips_what_is_finished(tmp_path):
    path = write_suite(tmp_path, {"lb": {}, "no-lb": {"loss.lb_coef": 0.0},
                                  "dropping": {"model.config.moe_dropless": False,
                                               "model.config.moe_capacity_factor": 0.5}})  # fmt: skip
    suite = load_suite(path)
    paths = run_suite(suite, log=lambda line: None)
    assert [p.name for p in paths] == ["comparison.json", "comparison.md", "comparison.png"]
    record = json.loads(paths[0].read_text())
    rows = record["variants"]
    assert list(rows) == ["lb", "no-lb", "dropping"] and record["paper"] == "a finding"
    assert all(r["steps"] == STEPS and r["val_loss"] is not None for r in rows.values())
    assert rows["dropping"]["dropped"] > 0 and rows["lb"]["dropped"] is None
    assert len(rows["lb"]["dead_experts"]) == 2  # one count per MoE layer
    # the same data order and seed: step 1's CE is the same before the objectives diverge
    first = [json.loads((tmp_path / "out" / n / "log.jsonl").read_text().splitlines()[0])["ce"]
             for n in ("lb", "no-lb")]  # fmt: skip
    assert first[0] == first[1]
    table = paths[1].read_text()
    assert "| no-lb | 6 |" in table and "Paper: a finding" in table

    lines = []
    run_suite(suite, log=lines.append)
    assert all("finished, skipped" in line for line in lines)


def test_an_interrupted_variant_resumes_and_a_changed_one_is_refused(tmp_path):
    path = write_suite(tmp_path, {"only": {}})
    suite = load_suite(path)
    config = suite.config(suite.variants[0])
    config.train.max_steps = 3  # a run stopped at its step-3 checkpoint ...
    train(config, progress=False)
    (suite.run_dir(suite.variants[0]) / "config.yaml").write_text(
        yaml.safe_dump(suite.config(suite.variants[0]).to_dict(), sort_keys=False)
    )  # ... as the variant's own run would have left it
    lines = []
    run_suite(suite, log=lines.append)
    assert any("resuming" in line for line in lines)
    steps = summarize_run(suite.run_dir(suite.variants[0]))["steps"]
    assert steps == STEPS

    changed = write_suite(tmp_path, {"only": {"optim.lr": 0.5}})
    with pytest.raises(ConfigError, match="trained under another config"):
        run_suite(load_suite(changed), log=lambda line: None)


def test_upcycled_variant_starts_from_another(tmp_path):
    dense = {"model.config.mlp_only_layers": [0, 1], "model.config.dense_intermediate_size": 16,
             "loss.lb_coef": 0.0, "loss.z_coef": 0.0}  # fmt: skip
    path = write_suite(tmp_path, {"dense": dense,
                                  "upcycled": {"upcycle": {"from": "dense", "experts": 4,
                                                           "top_k": 2}}})  # fmt: skip
    rows = json.loads(run_suite(load_suite(path), log=lambda line: None)[0].read_text())
    assert rows["variants"]["dense"]["dead_experts"] == []
    init = tmp_path / "out" / "upcycled" / "upcycled-init" / "config.json"
    assert json.loads(init.read_text())["num_experts"] == 4


@pytest.mark.parametrize(
    "variants, message",
    [
        ({"a": {"optim.nope": 1}}, "variant a"),
        (
            {"up": {"upcycle": {"from": "later", "experts": 2, "top_k": 1}}, "later": {}},
            "must be a variant listed before it",
        ),
        ({"../x": {}}, "plain directory name"),
    ],
)
def test_bad_suites_say_what_to_change(tmp_path, variants, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(write_suite(tmp_path, variants))


def test_dry_run_prints_the_commands(tmp_path, capsys):
    path = write_suite(
        tmp_path,
        {
            "a": {},
            "b": {"upcycle": {"from": "a", "experts": 4, "top_k": 2, "norm_topk_prob": True}},
        },
    )
    assert main(["ablate", str(path), "--dry-run", "--nproc-per-node", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("torchrun --nproc_per_node 2 -m olmoe train ")
    assert lines[1].startswith("olmoe upcycle ") and "--norm-topk-prob" in lines[1]
    assert (tmp_path / "out" / "a" / "variant.yaml").is_file()


@pytest.mark.parametrize(
    "switches",
    [
        {"moe_routing": "expert_choice"},
        {"shared_expert_intermediate_size": 8, "shared_expert_weighted": True},
        {"qk_norm": False, "norm_type": "nonparametric_layernorm", "init_cutoff_factor": None},
        {"mlp_only_layers": [1]},
    ],
)
def test_each_switch_trains_and_saves(tmp_path, switches):
    base = write_base(tmp_path)
    overrides = [f"--model.config.{k}={json.dumps(v)}" for k, v in switches.items()]
    config = load_config(base, [*overrides, f"--run_dir={tmp_path / 'run'}",
                                "--eval.sample_prompt=ab"])  # fmt: skip
    with pytest.warns(UserWarning, match="cannot represent"):
        result = train(config, progress=False)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert all(saved[k] == v for k, v in switches.items())
    steps = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in steps if "loss" in r]).all()


SHIPPED = sorted(p for p in (Path(__file__).parents[2] / "configs" / "ablations").rglob("*.yaml")
                 if p.name != "base.yaml")  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_suites_validate(path):
    suite = load_suite(path)
    assert len(suite.variants) >= 2 and suite.paper


@pytest.mark.parametrize(
    ("log", "finished"),
    [
        ([{"step": 12, "loss": 1.0}], True),
        ([{"step": 7, "loss": 1.0}], False),
        ([{"step": 10, "max_steps": 7}, {"step": 7, "loss": 1.0}], True),  # a time budget's end
        ([{"step": 10, "max_steps": 9}, {"step": 7, "loss": 1.0}], False),
    ],
)
def test_a_run_is_finished_at_its_last_step(tmp_path, log, finished):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    config = load_config(write_base(tmp_path), ["--train.max_steps=12"])
    assert _finished(tmp_path, config) is finished
