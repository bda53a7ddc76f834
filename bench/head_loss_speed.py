"""The LM head's training loss with both gradients, as `olmoe train` computes it
(olmoe.head_loss.linear_cross_entropy, chunk by chunk, no logits kept, each chunk's logits
exponentiated in the engine's native pass), against the same without the native pass
(OLMOE_KERNELS=0), the unfused path (the whole float32 logits, F.cross_entropy and its
backward, as transformers computes it), and optionally olmoe's head_loss.py at an earlier
commit (a before/after measurement).

    .venv/bin/python bench/head_loss_speed.py --hidden 32
    .venv/bin/python bench/head_loss_speed.py --hidden 128 --against 0123abc

Random float32 hidden states and head weights at OLMoE's 50,304-id vocabulary, the positions of
one quickstart step (2,048); the contenders alternated (A B C A B C) so that the machine's phases
hurt all alike. Prints each one's median seconds, its ratio to olmoe's, and the share of the
machine's float32 matmul rate its three matmuls (6 x positions x hidden x vocabulary FLOPs)
would take.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from at_revision import module_at

from olmoe import head_loss
from olmoe.benchmarks.cpu_inference import matmul_gflop_s
from olmoe.engine import native
from olmoe.engine.layers import CpuLinear
from olmoe.memory import retain_freed_memory


def unfused(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets)


def time_once(loss_fn, hidden, weight, targets) -> float:
    hidden.grad = weight.grad = None
    started = time.perf_counter()
    loss_fn(hidden, weight, targets).backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hidden", type=int, default=32, help="hidden size (the quickstarts': 32, 128)"
    )
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds after 2 warm-up ones")
    parser.add_argument("--against", metavar="REV", help="also time head_loss.py at git REV")
    args = parser.parse_args()
    retain_freed_memory()  # as the olmoe command does before it trains

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.positions, args.hidden, generator=generator).requires_grad_()
    weight = (0.05 * torch.randn(args.vocab, args.hidden, generator=generator)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.positions,), generator=generator)
    contenders = {"olmoe": head_loss.linear_cross_entropy}
    if native.compiled() is not None:
        contenders["olmoe"] = functools.partial(
            head_loss.linear_cross_entropy, exp_logits=CpuLinear.exp_logits
        )
        contenders["olmoe without kernels"] = head_loss.linear_cross_entropy
    contenders["unfused"] = unfused
    if args.against:
        then = module_at(args.against, "src/olmoe/head_loss.py", "head_loss_before")
        contenders[f"olmoe@{args.against}"] = then.linear_cross_entropy

    times = {name: [] for name in contenders}
    for round_ in range(args.rounds + 2):
        for name, loss_fn in contenders.items():
            seconds = time_once(loss_fn, hidden, weight, targets)
            if round_ >= 2:
                times[name].append(seconds)

    flops = 6 * args.positions * args.hidden * args.vocab
    rate = matmul_gflop_s()["gflop_s"] * 1e9
    print(
        f"{args.positions} positions, hidden {args.hidden}, vocabulary {args.vocab}, "
        f"{torch.get_num_threads()} threads; float32 matmul limit {rate / 1e9:.0f} GFLOP/s, "
        f"so the three matmuls take at least {flops / rate:.3f} s"
    )
    ours = statistics.median(times["olmoe"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:>20}: {median:.3f} s (min {min(values):.3f}), {median / ours:.2f}x olmoe's, "
            f"matmul share {flops / rate / median:.0%}"
        )


if __name__ == "__main__":
    main()
