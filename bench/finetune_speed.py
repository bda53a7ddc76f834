"""Fine-tuning throughput: one SFT step and one DPO step of olmoe's trainer against TRL's
SFTTrainer and DPOTrainer, on the same model, data, batch and precision.

    .venv/bin/python bench/finetune_speed.py                        # mid shape, sft and dpo, fp32
    .venv/bin/python bench/finetune_speed.py --objective dpo --repeats 3 --json dpo.json
    .venv/bin/python bench/finetune_speed.py --shape tiny --steps 2 --repeats 1   # smoke test

The model is a seeded random checkpoint of the chosen shape (`mid`: the shape bench/train_speed.py
calls mid, 0.17B parameters, 64 experts top-8; `tiny`: the OLMo vocabulary on a toy body, for
smoke tests), written once into --cache with the OLMo tokenizer (`olmoe.Tokenizer.olmo()`, its
Tulu chat template) beside it. The data is a synthetic chat (sft: one user and one assistant
message) or preference (dpo: a prompt and a chosen and a rejected answer) data set of seeded
random words from the tokenizer's vocabulary, every sequence exactly --seq tokens long once
rendered by the chat template (the prompt about half of it), written once as .jsonl into --cache
and read by both engines through their own data pipelines. Every sequence having the same
length, padding to the longest adds nothing; the tokens counted are still the non-padding ones
each engine processed (olmoe: its step's `tokens`, the summed sequence lengths; TRL: the sum of
the attention masks of the micro-batches its `training_step` received), prompt tokens included,
chosen and rejected both counted for DPO.

Each engine is built, warmed up and timed in a fresh process of its own, interleaved A B A B over
--repeats (so that a change in the machine's load hits both), with --threads torch threads:

  olmoe  `olmoe.train.Trainer` as `olmoe train` builds it from a config (objective sft|dpo,
         model.init_from the checkpoint, data.path the .jsonl; the process set up as the olmoe
         command sets it up, glibc keeping freed memory), each step one `Trainer.train_step()`:
         the micro-batches' forward and backward, clipping at 1.0, its fused AdamW. SFT: mean
         token CE on the assistant tokens (`preference.sft_reduction: mean`, the reduction TRL
         uses; olmoe's default, sum, costs the same). DPO: sigmoid loss, beta 0.1, reference
         log-probabilities computed before the first step (as olmoe always does). Load-balancing
         and z-loss coefficients 0, olmoe's fine-tuning default (it still computes both, and
         the routing statistics, for its log).
  trl    TRL's SFTTrainer / DPOTrainer on transformers' OlmoeForCausalLM (experts
         implementation grouped_mm, transformers' default, as bench/train_speed.py), set to do
         what olmoe does: no packing, not padding-free, padded to the longest sequence of the
         micro-batch, SFT `assistant_only_loss=True` (the Tulu template with `{% generation %}`
         markers around each assistant message's content and its eos: the tokens olmoe trains
         on; it renders the same text as the plain template, checked), DPO `loss_type=sigmoid`,
         `beta=0.1`, `precompute_ref_log_probs=True` (so neither side runs a reference forward
         in the timed steps), `router_aux_loss_coef=0.0`, no gradient checkpointing (TRL's
         default turns it on), the same gradient accumulation, clipping at 1.0, transformers'
         default optimizer (PyTorch's fused AdamW), `use_cpu=True`, bf16 only under
         --precision bf16; no evaluation, saving or logging (`report_to=[]`). The process is
         left as a user's script leaves it (`--trl-retain-freed-memory` gives it olmoe's
         allocator setting too). A TrainerCallback timestamps `on_step_end`: a step is the time
         from one optimizer step's end to the next's (fetching and collating the micro-batches,
         forward, backward, clipping, the optimizer step), the same span as olmoe's
         `train_step()`; `on_step_begin` to `on_step_end` (without the data fetch) is kept too.
         What TRL does in its step beyond that is its own and counts: its chunked log-prob LM
         head, and the metrics (entropy, token accuracy, rewards) it gathers every step.

A run is --warmup untimed steps and then --steps timed ones, on --batch examples per step
(pairs for DPO) in micro-batches of --micro (the same accumulation on both sides). Reported per
engine: the median seconds per step over every timed step of every round, tokens/s (the median
tokens per step over that median), olmoe's ratio to TRL, and the fraction of the machine's
matmul rate: the step's model FLOPs, 6 x (active parameters without the input embedding) per
token (attention scores not counted, under 1% here), per second, over the best rate of a
512 x 2048 x 2048 GEMM in the step's precision (fp32, or bf16 under --precision bf16), probed
with the same threads before and after the engines. `--json FILE` writes every raw number.

--precision bf16 (autocast over fp32 weights on both sides) needs a CPU with native bf16
(AVX-512 BF16 or AMX): on an AVX2-only CPU torch's bf16 GEMM falls back to a path hundreds of
times slower than fp32, and the script says so after its probe.

TRL is a benchmark-only dependency (pyproject.toml's `bench` extra pins trl==1.16.0, which
brings accelerate and datasets); install it without moving torch or transformers:

    .venv/bin/pip install "trl==1.16.0" "torch==2.13.0" "transformers==5.23.0"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_speed import SHAPES as TRAINING_SHAPES  # bench/ is on sys.path: run as a script

from olmoe import OlmoeConfig
from olmoe.benchmarks import engines
from olmoe.benchmarks.cpu_inference import MATMUL_SHAPE, machine_info

SHAPES = {
    "mid": TRAINING_SHAPES["mid"],  # bench/train_speed.py's (reference.md's training comparison)
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts": 8,
        "intermediate_size": 32,
        "num_experts_per_tok": 2,
        "vocab_size": 50304,
    },
}
ENGINES = ("olmoe", "trl")
OBJECTIVES = ("sft", "dpo")
TRL_VERSION = "1.16.0"  # the one pyproject.toml's bench extra pins
LEARNING_RATE = 1e-5  # both sides, constant (the value does not change a step's cost)
DATA_SEED = 0
MARGIN = 64  # the engines' max length is --seq + MARGIN: nothing is ever truncated
RESULT = "RESULT "

# The Tulu assistant turn as the OLMo tokenizer's template writes it, and the same with TRL's
# generation markers around what olmoe trains on (the content and the eos that closes it).
ASSISTANT_TURN = "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
ASSISTANT_TURN_MARKED = (
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}"
)


# ---------------------------------------------------------------------------- checkpoint, data
def shape_config(shape: str) -> OlmoeConfig:
    # eos and pad are the OLMo tokenizer's (<|endoftext|> 50279, <|padding|> 1)
    return OlmoeConfig(**SHAPES[shape], eos_token_id=50279, pad_token_id=1)


def ensure_checkpoint(cache: Path, shape: str) -> Path:
    """The seeded random checkpoint of `shape` (bf16 in the hub layout, the OLMo tokenizer
    beside it), written once by olmoe.benchmarks.engines.write_checkpoint."""
    directory = cache / f"finetune-{shape}"
    if not (directory / "config.json").is_file():
        print(f"writing the {shape} checkpoint to {directory} (once)", flush=True)
        engines.write_checkpoint(directory, shape_config(shape), tokenizer=True)
    return directory


class _Lengths:
    """Rendered token lengths with the OLMo tokenizer, as olmoe.data.chat encodes them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> int:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return len(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def vocabulary_words(tokenizer) -> list[str]:
    """Lowercase words of 3-10 letters that are one token after a space, sorted."""
    words = []
    for token in tokenizer.backend_tokenizer.get_vocab():
        word = token[1:]
        spaced = token.startswith("\u0120") and 3 <= len(word) <= 10
        if spaced and word.isascii() and word.isalpha() and word.islower():
            words.append(word)
    return sorted(words)


def fit(rng, words, length_of, target: int, prefix: list[str] | None = None) -> list[str]:
    """Random words whose text makes `length_of(words)` exactly `target` tokens (one word is
    almost always one token; a word that adds two is swapped for another)."""
    chosen = list(prefix or [])
    for _ in range(10 * target + 100):
        now = length_of(chosen)
        if now == target:
            return chosen
        if now < target:
            chosen += [rng.choice(words) for _ in range(max(1, (target - now) // 2))]
        else:
            chosen.pop()
    raise RuntimeError(f"could not fit random words to {target} tokens")


def ensure_data(cache: Path, objective: str, seq: int, count: int) -> tuple[Path, dict]:
    """`count` synthetic examples of `objective`, every sequence exactly `seq` tokens, as .jsonl
    (written once); the file and a summary of its lengths."""
    from olmoe import Tokenizer

    path = cache / "finetune-data" / f"{objective}-seq{seq}-n{count}-seed{DATA_SEED}.jsonl"
    tokenizer = Tokenizer.olmo()
    length = _Lengths(tokenizer)
    if not path.is_file():
        rng = random.Random(f"{DATA_SEED}-{objective}-{seq}")
        words = vocabulary_words(tokenizer)
        prompt_target = seq // 2
        records = []
        for _ in range(count):
            user = fit(rng, words, lambda w: length([_user(w)], True), prompt_target)
            prompt = [_user(user)]

            def answer_length(w, prompt=prompt):
                return length(prompt + [_assistant(w)])

            answers = [
                fit(rng, words, answer_length, seq, [rng.choice(words)])
                for _ in range(1 if objective == "sft" else 2)
            ]
            if objective == "sft":
                records.append({"messages": prompt + [_assistant(answers[0])]})
            else:
                records.append({"prompt": prompt, "chosen": [_assistant(answers[0])],
                                "rejected": [_assistant(answers[1])]})  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.rename(partial, path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if objective == "sft":
        lengths = [length(r["messages"]) for r in records]
        prompts = [length(r["messages"][:1], True) for r in records]
    else:
        lengths = [length(r["prompt"] + r[k]) for r in records for k in ("chosen", "rejected")]
        prompts = [length(r["prompt"], True) for r in records]
    summary = {
        "file": str(path),
        "examples": len(records),
        "sequences": len(lengths),
        "sequence_tokens": {"min": min(lengths), "max": max(lengths), "sum": sum(lengths)},
        "prompt_tokens": {"min": min(prompts), "max": max(prompts)},
    }
    return path, summary


def _user(words: list[str]) -> dict[str, str]:
    return {"role": "user", "content": " ".join(words)}


def _assistant(words: list[str]) -> dict[str, str]:
    return {"role": "assistant", "content": " ".join(words)}


# ---------------------------------------------------------------------------- matmul probe
def matmul_probe(precision: str, budget_s: float = 1.0) -> dict:
    """Best GEMM rate of torch at MATMUL_SHAPE in `precision` (GFLOP/s) with the current
    threads: one untimed call, then as many timed ones as fit in about `budget_s` (3 to 10).
    Only the step's precision is probed: a CPU without native bf16 (no AVX-512 BF16 or AMX)
    runs a bf16 GEMM of this size in tens of seconds."""
    m, k, n = MATMUL_SHAPE
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    start = time.perf_counter()
    torch.mm(a, b)  # oneDNN's set-up, page faults
    first = time.perf_counter() - start
    repeats = max(3, min(10, int(budget_s / max(first, 1e-6))))
    seconds = engines.best_seconds(lambda: torch.mm(a, b), repeats - 1)
    return {"precision": precision, "shape_mkn": list(MATMUL_SHAPE), "repeats": repeats,
            "gflop_s": 2 * m * k * n / seconds / 1e9}  # fmt: skip


def flops_per_token(config: OlmoeConfig) -> float:
    """Training FLOPs per token: 6 x the active parameters without the input embedding (the
    lm_head counted, the embedding lookup not; attention scores not counted)."""
    return 6.0 * (config.num_parameters(active_only=True) - config.vocab_size * config.hidden_size)


# ---------------------------------------------------------------------------- olmoe worker
def run_olmoe(args) -> dict:
    from olmoe.memory import retain_freed_memory

    retain_freed_memory()  # what the olmoe command does before it runs a job
    from olmoe.train.config import TrainConfig
    from olmoe.train.trainer import Trainer

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="finetune-olmoe-") as run_dir:
        config = TrainConfig.from_dict({
            "run_dir": run_dir,
            "objective": args.objective,
            "model": {"init_from": args.dir},
            "data": {"path": args.data, "seq_len": args.seq + MARGIN, "seed": DATA_SEED},
            "optim": {"lr": LEARNING_RATE, "grad_clip": 1.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "train": {"max_steps": total, "global_batch_examples": args.batch,
                      "micro_batch_size": args.micro, "precision": args.precision,
                      "threads": args.threads, "device": "cpu"},
            "eval": {"every": 0, "batches": 1, "unigram_baseline": False},
            "checkpoint": {"every": 0, "keep": 1},
            "preference": {"beta": 0.1, "loss_type": "sigmoid", "sft_reduction": "mean"},
        })  # fmt: skip
        started = time.perf_counter()
        trainer = Trainer(config, progress=False)  # prepares the data, DPO's reference log-probs
        setup_s = time.perf_counter() - started
        examples = trainer.objective.examples
        # the tokens its loss scores per step: every example has the same layout here
        trained = examples.metadata["trained_tokens"] / len(examples) * args.batch
        times, tokens, losses = [], [], []
        try:
            for _ in range(total):
                before = trainer.tokens_seen
                start = time.perf_counter()
                record = trainer.train_step()
                times.append(time.perf_counter() - start)
                tokens.append(trainer.tokens_seen - before)
                losses.append(record["loss"])
        finally:
            trainer.close()
    return {
        "label": "olmoe",
        "setup_s": setup_s,
        "step_s": times[args.warmup :],
        "tokens": tokens[args.warmup :],
        "warmup_step_s": times[: args.warmup],
        "trained_tokens": [trained] * total,
        "loss": losses,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------- TRL worker
def run_trl(args) -> dict:
    if args.trl_retain_freed_memory:
        from olmoe.memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl

    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.dir)
    if args.objective == "sft":
        plain = tokenizer.chat_template
        if ASSISTANT_TURN not in plain:
            raise RuntimeError("the tokenizer's chat template is not the Tulu one this expects")
        tokenizer.chat_template = plain.replace(ASSISTANT_TURN, ASSISTANT_TURN_MARKED)
        sample = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]
        rendered = [tokenizer.apply_chat_template(sample, tokenize=False, chat_template=t)
                    for t in (plain, tokenizer.chat_template)]  # fmt: skip
        if rendered[0] != rendered[1]:
            raise RuntimeError("the marked chat template renders other text than the plain one")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.dir, dtype=torch.float32, experts_implementation=args.experts
    )
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(records)

    clock = _trl_clock(transformers)
    with tempfile.TemporaryDirectory(prefix="finetune-trl-") as output_dir:
        common = {
            "output_dir": output_dir,
            "per_device_train_batch_size": args.micro,
            "gradient_accumulation_steps": args.batch // args.micro,
            "max_steps": args.warmup + args.steps,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "adam_epsilon": 1e-8,
            "weight_decay": 0.1,
            "max_grad_norm": 1.0,
            "bf16": args.precision == "bf16",
            "fp16": False,
            "use_cpu": True,
            "gradient_checkpointing": False,
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_strategy": "no",
            "report_to": [],
            "disable_tqdm": True,
            "seed": DATA_SEED,
            "dataloader_num_workers": 0,
            "max_length": args.seq + MARGIN,
            "router_aux_loss_coef": 0.0,
        }
        if args.objective == "sft":
            config = trl.SFTConfig(
                **common, packing=False, padding_free=False, assistant_only_loss=True,
                completion_only_loss=False, loss_type="nll",
            )  # fmt: skip
            base = trl.SFTTrainer
        else:
            config = trl.DPOConfig(
                **common, loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=True,
                precompute_ref_batch_size=args.micro,
            )  # fmt: skip
            base = trl.DPOTrainer

        class Counted(base):  # the non-padding tokens of each micro-batch the step trains on
            def training_step(self, *a, **kw):
                inputs = a[1] if len(a) > 1 else kw["inputs"]
                clock.pending_tokens += int(inputs["attention_mask"].sum())
                scored = (
                    inputs["labels"] != -100 if "labels" in inputs else inputs["completion_mask"]
                )
                clock.pending_trained += int(scored.sum())
                loss = super().training_step(*a, **kw)
                clock.pending_loss += float(loss.detach())
                return loss

        trainer = Counted(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[clock],
        )  # fmt: skip
        setup_s = time.perf_counter() - started  # TRL's tokenising and DPO's reference pass
        trainer.train()
    if len(clock.end) != args.warmup + args.steps:
        raise RuntimeError(f"TRL ran {len(clock.end)} steps, not {args.warmup + args.steps}")
    # one step = from the previous step's end (its first: from its own begin) to its end
    spans = [clock.end[0] - clock.begin[0]] + [b - a for a, b in zip(clock.end, clock.end[1:])]
    inner = [b - a for a, b in zip(clock.begin, clock.end)]
    return {
        "label": f"trl {trl.__version__} ({base.__name__}; transformers {transformers.__version__},"
        f" experts={args.experts})",
        "setup_s": setup_s,
        "step_s": spans[args.warmup :],
        "tokens": clock.tokens[args.warmup :],
        "warmup_step_s": spans[: args.warmup],
        "step_begin_to_end_s": inner[args.warmup :],
        # the tokens its loss scores (SFT: labels not -100; DPO: the completion mask)
        "trained_tokens": clock.trained,
        "loss": clock.losses,
        "threads": clock.threads,
        "bf16": bool(config.bf16),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "optim": str(config.optim),
    }


def _trl_clock(transformers):
    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.tokens, self.trained, self.losses = [], [], [], [], []
            self.pending_tokens, self.pending_trained, self.pending_loss = 0, 0, 0.0
            self.threads = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())
            self.threads = torch.get_num_threads()

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())
            self.tokens.append(self.pending_tokens)
            self.trained.append(self.pending_trained)
            self.losses.append(self.pending_loss)
            self.pending_tokens, self.pending_trained, self.pending_loss = 0, 0, 0.0

    return Clock()


WORKERS = {"olmoe": run_olmoe, "trl": run_trl}


# ---------------------------------------------------------------------------- parent
def worker_command(engine: str, objective: str, directory: Path, data: Path, args) -> list[str]:
    command = [
        sys.executable, __file__, "--worker", engine, "--objective", objective,
        "--dir", str(directory), "--data", str(data), "--precision", args.precision,
        "--batch", str(args.batch), "--micro", str(args.micro), "--seq", str(args.seq),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--experts", args.experts,
    ]  # fmt: skip
    if args.trl_retain_freed_memory:
        command.append("--trl-retain-freed-memory")
    return command


def measure_in_process(engine, objective, directory, data, args) -> dict:
    """One engine's run, in a fresh Python process (its allocator state its own)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
    }
    with tempfile.TemporaryDirectory(prefix="finetune-hf-") as hf_home:
        env["HF_HOME"] = hf_home  # TRL's dataset caches (reference log-probs) die with the run
        start = time.perf_counter()
        command = worker_command(engine, objective, directory, data, args)
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT):
            return {**json.loads(line[len(RESULT) :]), "wall_s": wall}
    raise SystemExit(
        f"{engine} {objective} worker exited {done.returncode}:\n{done.stderr[-4000:]}"
    )


def summarize(runs: list[dict], flops_token: float, matmul_gflop_s: float) -> dict:
    times = [t for run in runs for t in run["step_s"]]
    tokens = [n for run in runs for n in run["tokens"]]
    median_s = statistics.median(times)
    step_tokens = statistics.median(tokens)
    rate = step_tokens / median_s
    return {
        "label": runs[0]["label"],
        "median_step_s": median_s,
        "tokens_per_step": step_tokens,
        "tokens_per_s": rate,
        "model_gflop_s": rate * flops_token / 1e9,
        "matmul_fraction": rate * flops_token / 1e9 / matmul_gflop_s,
        "trained_tokens_per_step": statistics.median(
            n for run in runs for n in run["trained_tokens"]
        ),
        "step_s_min": min(times),
        "step_s_max": max(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objective", choices=(*OBJECTIVES, "both"), default="both")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=4, help="examples (pairs) per step")
    parser.add_argument("--micro", type=int, default=2, help="examples per micro-batch")
    parser.add_argument(
        "--seq", type=int, help="tokens per sequence (default 256; 64 for --shape tiny)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="A B rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument(
        "--experts", default="grouped_mm", help="transformers' experts implementation (TRL side)"
    )
    parser.add_argument(
        "--trl-retain-freed-memory", action="store_true",
        help="give TRL's process olmoe's allocator setting (glibc keeps freed memory) too",
    )  # fmt: skip
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache/olmoe/bench",
        help="where the checkpoint and the data are written once (default ~/.cache/olmoe/bench)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every raw number here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seq is None:
        args.seq = 64 if args.shape == "tiny" else 256
    if args.batch % args.micro:
        parser.error(f"--batch ({args.batch}) must be a multiple of --micro ({args.micro})")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (TRL's first step pays for its data loader)")
    if args.worker:  # one engine, in this fresh process: print its numbers as JSON
        result = WORKERS[args.worker](args)
        result["peak_rss_gb"] = engines.peak_rss_gb()
        print(RESULT + json.dumps(result), flush=True)
        return

    torch.set_num_threads(args.threads)
    objectives = list(OBJECTIVES) if args.objective == "both" else [args.objective]
    config = shape_config(args.shape)
    flops_token = flops_per_token(config)
    machine = machine_info(args.threads)
    report: dict = {
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "dir", "data")
        },
        "machine": machine,
        "shape": SHAPES[args.shape],
        "parameters": config.num_parameters(),
        "active_parameters": config.num_parameters(active_only=True),
        "flops_per_token": flops_token,
        "objectives": {},
    }
    started = time.perf_counter()
    directory = ensure_checkpoint(args.cache, args.shape)
    probes = [matmul_probe(args.precision)]
    print(
        f"shape {args.shape}: {config.num_parameters() / 1e6:.0f}M parameters "
        f"({config.num_parameters(active_only=True) / 1e6:.0f}M active); precision "
        f"{args.precision}; {args.threads} threads; {args.batch} examples per step in "
        f"micro-batches of {args.micro}; {args.seq}-token sequences; {args.warmup} warmup + "
        f"{args.steps} timed steps per run, {args.repeats} round(s); load average "
        f"{machine['load_average_1min']:.2f}",
        flush=True,
    )
    print(
        f"{args.precision} matmul {' x '.join(map(str, MATMUL_SHAPE))}: "
        f"{probes[0]['gflop_s']:.0f} GFLOP/s",
        flush=True,
    )
    if args.precision == "bf16" and probes[0]["gflop_s"] < 20:
        print(
            "warning: bf16 GEMMs run at a crawl on this CPU (no native bf16: AVX-512 BF16 or "
            "AMX); the steps will take very long. --precision fp32 measures what it can do.",
            flush=True,
        )
    count = args.batch * (args.warmup + args.steps)  # each example once per run
    for objective in objectives:
        data, data_summary = ensure_data(args.cache, objective, args.seq, count)
        runs: dict[str, list[dict]] = {engine: [] for engine in args.engines}
        for round_ in range(args.repeats):
            for engine in args.engines:
                run = measure_in_process(engine, objective, directory, data, args)
                run["round"] = round_ + 1
                runs[engine].append(run)
                print(
                    f"{objective} round {round_ + 1} {engine:<5} "
                    + " ".join(f"{t:.2f}s" for t in run["step_s"])
                    + f"  ({sum(run['tokens']) / len(run['tokens']):.0f} tokens/step, "
                    f"{run['threads']} threads, setup {run['setup_s']:.1f} s, "
                    f"peak RSS {run['peak_rss_gb']:.1f} GB)",
                    flush=True,
                )
        report["objectives"][objective] = {"data": data_summary, "runs": runs}
    probes.append(matmul_probe(args.precision))
    limit = max(p["gflop_s"] for p in probes)
    report["matmul"] = {"probes": probes, "gflop_s": limit, "precision": args.precision}
    report["load_average_1min_end"] = os.getloadavg()[0]
    report["wall_s"] = time.perf_counter() - started

    print()
    print(
        f"{args.precision} matmul rate {limit:.0f} GFLOP/s (best of the probes before and after); "
        f"model FLOPs = {flops_token / 1e9:.2f} GFLOP per token (6 x active parameters without "
        "the input embedding)"
    )
    for objective in objectives:
        entry = report["objectives"][objective]
        summary = {
            engine: summarize(runs, flops_token, limit) for engine, runs in entry["runs"].items()
        }
        entry["summary"] = summary
        lengths = entry["data"]["sequence_tokens"]
        print(
            f"\n{objective}: {args.batch} {'pairs' if objective == 'dpo' else 'examples'} per "
            f"step, sequences of {lengths['min']}-{lengths['max']} tokens "
            f"(medians over {args.steps * args.repeats} timed steps per engine)"
        )
        header = f"{'engine':<62} {'s/step':>8} {'tokens/step':>11} {'tokens/s':>9} {'matmul':>7}"
        print(header)
        print("-" * len(header))
        for s in summary.values():
            print(
                f"{s['label']:<62} {s['median_step_s']:8.2f} {s['tokens_per_step']:11.0f} "
                f"{s['tokens_per_s']:9.1f} {100 * s['matmul_fraction']:6.1f}%"
            )
        if {"olmoe", "trl"} <= summary.keys():
            ratio = summary["olmoe"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
            entry["ratio_olmoe_trl"] = ratio
            print(f"ratio olmoe / TRL (tokens/s): {ratio:.2f}x")
            if summary["olmoe"]["tokens_per_step"] != summary["trl"]["tokens_per_step"]:
                print("note: the engines counted different tokens per step (see --json)")
            scored = [summary[e]["trained_tokens_per_step"] for e in ("olmoe", "trl")]
            print(
                f"tokens the loss scores per step: olmoe {scored[0]:.0f}, TRL {scored[1]:.0f}"
                + ("" if scored[0] == scored[1] else " (the loss masks differ)")
            )
    print(
        f"\nwall {report['wall_s']:.0f} s; load average {machine['load_average_1min']:.2f} at the "
        f"start, {report['load_average_1min_end']:.2f} at the end"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
