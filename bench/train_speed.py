"""Training throughput: olmoe against transformers' OlmoeForCausalLM on the same model and batch.

One training step = forward, backward and an AdamW step, in the precision `olmoe train` picks
here (`--precision auto`: bf16 autocast over fp32 weights where the CPU multiplies bf16
natively, float32 elsewhere), for both models.
Both models get the same random weights (olmoe's, saved and read back by transformers) and the
same token batch; each is built, warmed up and timed in a fresh process of its own (one model's
weights, gradients and AdamW state at a time; olmoe's process set up as `olmoe train` sets it
up, glibc keeping freed memory, and transformers' left as a user's script leaves it), in
A B A B order so that a change in the machine's load hits both. Reports the median step time
per engine, the ratio, and each step's share of the machine's matmul rate in that precision
(6 multiply-adds' worth per active weight and token, plus causal attention).

    .venv/bin/python bench/train_speed.py              # the mid-size shape of reference.md
    .venv/bin/python bench/train_speed.py --shape small --steps 3
    .venv/bin/python bench/train_speed.py --shape quickstart --batch 8 --seq 256

olmoe's step is what `olmoe train` runs (the LM head's cross-entropy without logits,
olmoe.head_loss, + 0.01 LB + 0.001 Z from olmoe.train.losses, and its fused AdamW);
transformers' is its own `loss` (CE + 0.01 aux_loss) with output_router_logits=True and
PyTorch's default AdamW.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM
from olmoe import engine as olmoe_engine
from olmoe.benchmarks.cpu_inference import matmul_gflop_s
from olmoe.hardware import training_precision
from olmoe.train.config import OptimSection
from olmoe.train.losses import megablocks_lb_loss, router_z_loss
from olmoe.train.optim import build_optimizer

SHAPES = {
    # reference.md's training comparison: transformers reached 82 tokens/s here (grouped_mm)
    "mid": {
        "hidden_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_experts": 64,
        "intermediate_size": 512,
        "num_experts_per_tok": 8,
        "vocab_size": 50304,
    },
    # configs/quickstart.yaml's model (run it with --batch 8 --seq 256, the quickstart's step)
    "quickstart": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_experts": 8,
        "intermediate_size": 256,
        "num_experts_per_tok": 2,
        "vocab_size": 50304,
    },
    # configs/quickstart-fp32.yaml's model, what `make demo` trains where bf16 is emulated
    "quickstart-fp32": {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_experts": 8,
        "intermediate_size": 256,
        "num_experts_per_tok": 2,
        "vocab_size": 50304,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts": 16,
        "intermediate_size": 256,
        "num_experts_per_tok": 4,
        "vocab_size": 50304,
    },
}


def precision_context(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def olmoe_step(model, optimizer, ids, precision):
    with precision_context(precision):
        out = model(
            input_ids=ids, labels=ids, skip_logits=True, output_routing=True, use_cache=False
        )
    loss = out.loss + 0.01 * megablocks_lb_loss(out.routing) + 0.001 * router_z_loss(out.routing)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def transformers_step(model, optimizer, ids, precision):
    with precision_context(precision):
        loss = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def training_flops_per_token(config: OlmoeConfig, seq: int) -> float:
    """Forward and backward: 6 FLOPs per active weight (the embedding lookup is no product)
    and causal attention's scores and weighted sums (6 * seq * hidden per layer)."""
    weights = config.num_parameters(active_only=True) - config.vocab_size * config.hidden_size
    return 6 * weights + 6 * config.num_hidden_layers * seq * config.hidden_size


def build(engine: str, directory: str):
    if engine == "olmoe":  # on the CPU engine, as the trainer runs it
        model = olmoe_engine.apply(OlmoeForCausalLM.from_pretrained(directory, dtype=torch.float32))
        step = olmoe_step
    else:
        import transformers

        model = transformers.OlmoeForCausalLM.from_pretrained(
            directory, dtype=torch.float32, experts_implementation="grouped_mm"
        )
        step = transformers_step
    model.train()
    if engine == "olmoe":  # the trainer's optimizer (fused AdamW)
        optimizer = build_optimizer(model, OptimSection())
    else:  # PyTorch's default AdamW implementation, as a user of transformers' model gets it
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=4e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
        )
    return model, optimizer, step


def measure(engine, directory, ids, steps, warmup, precision):
    if engine == "olmoe":
        from olmoe.memory import retain_freed_memory

        retain_freed_memory()  # what the olmoe command does before it runs a job
    model, optimizer, step = build(engine, directory)
    for _ in range(warmup):
        step(model, optimizer, ids, precision)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step(model, optimizer, ids, precision)
        times.append(time.perf_counter() - started)
    return times


def measure_in_process(engine, directory, ids_file, args) -> list[float]:
    """One engine's step times, from a fresh Python process (its allocator state its own)."""
    command = [
        sys.executable, __file__, "--worker", engine, "--dir", directory, "--ids", ids_file,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--shape", args.shape,
        "--precision", args.precision,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: what `olmoe train` picks on this machine",
    )
    parser.add_argument("--worker", choices=("olmoe", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precision = training_precision(args.precision, torch.device("cpu"))
    if args.worker:  # one engine, in this fresh process: print its step times as JSON
        ids = torch.load(args.ids)
        times = measure(args.worker, args.dir, ids, args.steps, args.warmup, args.precision)
        print(json.dumps(times))
        return

    torch.manual_seed(0)
    config = OlmoeConfig(**SHAPES[args.shape], max_position_embeddings=max(4096, args.seq))
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    tokens = ids.numel()
    print(
        f"shape {args.shape}: {config.num_parameters() / 1e6:.0f}M parameters; batch "
        f"{args.batch} x {args.seq} = {tokens} tokens; {torch.get_num_threads()} threads; "
        f"{args.precision}"
    )
    limit = matmul_gflop_s()
    print(f"matmul limit: {limit['gflop_s']:.0f} GFLOP/s ({limit['dtype']} torch.mm)")
    times = {"olmoe": [], "transformers": []}
    with tempfile.TemporaryDirectory() as directory:
        OlmoeForCausalLM(config).save_pretrained(directory)
        ids_file = f"{directory}/ids.pt"
        torch.save(ids, ids_file)
        for round_ in range(args.rounds):
            for engine in times:
                new = measure_in_process(engine, directory, ids_file, args)
                times[engine] += new
                print(
                    f"round {round_ + 1} {engine:<12} " + " ".join(f"{t:.2f}s" for t in new),
                    flush=True,
                )
    rates = {engine: tokens / statistics.median(t) for engine, t in times.items()}
    flops = training_flops_per_token(config, args.seq)
    for engine, rate in rates.items():
        share = rate * flops / 1e9 / limit["gflop_s"]
        print(
            f"{engine:<12} {rate:8.1f} training tokens/s (median step "
            f"{statistics.median(times[engine]):.2f} s), {share:.0%} of the matmul limit"
        )
    print(f"ratio olmoe / transformers: {rates['olmoe'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
