"""How close int8 logits are to bf16 on the cached released-shape checkpoint (random weights).

    .venv/bin/python bench/int8_accuracy.py [--dir ~/.cache/olmoe/bench/released]

Runs the same prompts through the bf16 checkpoint and its int8 copy (written by
`olmoe bench`, or `olmoe quantize DIR DIR/int8`), one model in memory at a time, and
prints the relative error ||int8 - bf16|| / ||bf16|| of the logits at every position, for the
prefill path (512 tokens) and the decode path (one token at a time through the kernels).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

import olmoe.engine
from olmoe import OlmoeForCausalLM


@torch.inference_mode()
def logits(directory: Path, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = olmoe.engine.apply(OlmoeForCausalLM.from_pretrained(directory, dtype=torch.bfloat16))
    prefill = model(prompt).logits.float()  # (1, L, V): the GEMM path
    out = model(prompt[:, :1], use_cache=True)
    cache, decoded = out.past_key_values, [out.logits[:, -1].float()]
    for t in range(1, steps):  # one token per call: the decode kernels
        out = model(prompt[:, t : t + 1], past_key_values=cache, use_cache=True)
        decoded.append(out.logits[:, -1].float())
    del model
    gc.collect()
    return prefill, torch.cat(decoded)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache/olmoe/bench/released")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    prompt = torch.randint(0, 50000, (1, 512), generator=torch.Generator().manual_seed(0))
    bf16 = logits(args.dir, prompt, args.steps)
    int8 = logits(args.dir / "int8", prompt, args.steps)
    print(
        f"int8 vs bf16 logits, relative error: prefill-512 {relative(int8[0], bf16[0]):.4f}, "
        f"decode {relative(int8[1], bf16[1]):.4f}"
    )


if __name__ == "__main__":
    main()
