"""Scoring strategies of `olmoe eval`, timed on the same questions: packed (shared prefixes and
contexts, the default), flat (one sequence per choice), and optionally the runner as it was at
an earlier commit (a before/after measurement).

    .venv/bin/python bench/eval_strategies.py --shape tiny
    .venv/bin/python bench/eval_strategies.py --shape tiny --tasks paper --limit 20 --against a5c4196^
    .venv/bin/python bench/eval_strategies.py --shape mid --limit 16

Random weights with OLMoE's vocabulary; the OLMo tokenizer; the same questions for every
strategy, alternated (A B C A B C) so that a busy machine hurts all alike. Prints seconds per
strategy, each one's ratio to packed, and whether all gave the same scores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# As `olmoe eval` runs (olmoe.cli.common.wait_passively); libgomp reads it when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from at_revision import module_at

from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer
from olmoe.cli.eval import expand_tasks
from olmoe.eval import evaluation, load_task, runner

SHAPES = {
    # OlmoeConfig.tiny with the real vocabulary: the model of the tests.
    "tiny": {"hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2},
    # A mid-size MoE (0.52B parameters; 67M active per token besides the embeddings): 64
    # experts of width 512, top-8, in each of 4 layers.
    "mid": {"hidden_size": 1024, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tasks", default="hellaswag,arc_challenge", help="as olmoe eval --tasks")
    parser.add_argument("--limit", type=int, default=40, help="questions per task (MMLU subject)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-flat", action="store_true", help="skip the flat strategy")
    parser.add_argument("--against", metavar="REV", help="also time the runner at git REV")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config = OlmoeConfig(
        vocab_size=50304, eos_token_id=50279, pad_token_id=1, max_position_embeddings=4096,
        **SHAPES[args.shape],
    )  # fmt: skip
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config).to(getattr(torch, args.dtype)).to(args.device).eval()
    tokenizer = Tokenizer.olmo()
    tasks = [load_task(name) for name in expand_tasks(args.tasks)]
    # name -> (strategy, score_requests)
    contenders = {"packed": ("packed", runner.score_requests)}
    if not args.no_flat:
        contenders["flat"] = ("flat", runner.score_requests)
    if args.against:
        runner_then = module_at(args.against, "src/olmoe/eval/runner.py", "runner_before")
        contenders[f"packed@{args.against}"] = ("packed", runner_then.score_requests)
    print(
        f"shape {args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads; tasks "
        f"{[t.name for t in tasks]}, limit {args.limit}, batch size {args.batch_size}"
    )
    times: dict[str, list[float]] = {name: [] for name in contenders}
    scores = {}
    evaluation.evaluate(model, tokenizer, tasks, limit=1, progress=False)  # warm-up
    for _ in range(args.repeats):
        for name, (strategy, score_requests) in contenders.items():
            evaluation.score_requests = score_requests  # what evaluate() calls
            started = time.perf_counter()
            result = evaluation.evaluate(
                model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                strategy=strategy, progress=False,
            )  # fmt: skip
            times[name].append(time.perf_counter() - started)
            scores[name] = {
                (t, f): r["metrics"]
                for t, task in result["tasks"].items()
                for f, r in task["formats"].items()
            }
    evaluation.score_requests = runner.score_requests
    packed = statistics.median(times["packed"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"{name:>24}: {median:8.2f} s (median of {args.repeats}), {median / packed:5.2f}x packed"
        )
    same = all(s == scores["packed"] for s in scores.values())
    print("same scores from all" if same else f"scores differ: {scores}")


if __name__ == "__main__":
    main()
