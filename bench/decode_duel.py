"""olmoe against llama.cpp at batch-1 decoding, one token each in turn in one process.

    .venv/bin/python bench/decode_duel.py                  # 250 tokens each, about 3 minutes
    .venv/bin/python bench/decode_duel.py --weights int8   # olmoe int8 against llama.cpp Q8_0
    .venv/bin/python bench/decode_duel.py --weights int4   # olmoe int4 against Q4_0 (--peer q4_k_m)
    .venv/bin/python bench/decode_duel.py --weights int4 --dir ~/.cache/olmoe/bench/released
                                                           # the whole released shape (any
                                                           # checkpoint: --dir is read as is)

This machine's memory bandwidth moves in phases (see bench/README.md), so
engines measured minutes apart in separate processes can each draw a different one. Here both
decode side by side, token for token, and see the same phases. Both must fit in memory at once,
so the checkpoint is the released architecture cut to 8 of its 16 layers (6.9 GB of bf16
weights, written and converted to a bf16 GGUF once into ~/.cache/olmoe/bench/half; with
--weights int8 or int4, olmoe reads its quantised copy, written once beside it as `olmoe
quantize` writes it, and llama.cpp a Q8_0 or Q4_0 GGUF made from it by llama.cpp's converter or
quantiser). 4-bit weights fit the whole released shape twice: pass --dir with a released-shape
checkpoint, such as the one `olmoe bench --shape released` writes. Prints each
engine's median and mean tok/s and the per-token time ratios (>1: olmoe is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import olmoe.engine
from olmoe import OlmoeConfig, OlmoeForCausalLM, generation
from olmoe.benchmarks import engines

# olmoe's weights -> llama.cpp's GGUF type of about the same size.
PEERS = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def half_released() -> OlmoeConfig:
    config = OlmoeConfig.olmoe_1b_7b()
    config.num_hidden_layers = 8
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache/olmoe/bench/half")
    parser.add_argument("--llama-cpp-src", help="as for olmoe bench")
    parser.add_argument("--weights", choices=sorted(PEERS), default="bf16",
                        help="olmoe's weights (default bf16)")  # fmt: skip
    parser.add_argument("--peer", choices=["bf16", "q8_0", "q4_0", "q4_k_m"],
                        help="llama.cpp's GGUF type (default: bf16, q8_0, q4_0 for olmoe's bf16, "
                        "int8, int4)")  # fmt: skip
    args = parser.parse_args(argv)
    peer = args.peer or PEERS[args.weights]
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python (see olmoe.benchmarks.cpu_inference's doc)", file=sys.stderr)
        return 2
    if not (args.dir / "config.json").is_file():
        print(f"writing the 8-layer checkpoint to {args.dir} (once) ...", flush=True)
        engines.write_checkpoint(args.dir, half_released())
    gguf = engines.ensure_gguf(args.dir, peer, args.llama_cpp_src)
    torch.set_num_threads(args.threads)
    source = args.dir
    if args.weights != "bf16":
        print(f"olmoe's {args.weights} copy of {args.dir} ...", flush=True)
        source = engines.ensure_quantized(args.dir, args.weights)
    model = olmoe.engine.apply(OlmoeForCausalLM.from_pretrained(source, dtype=torch.bfloat16))
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
        logits_all=False, verbose=False,
    )  # fmt: skip

    def llama_next() -> int:
        logits = llama_cpp.llama_get_logits(llm.ctx)
        return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())

    prompt = engines.random_prompt(1, engines.DECODE_PROMPT_TOKENS)
    ours = generation.generate_tokens(model, prompt, args.tokens + 2, eos_token_id=[])
    next(ours), next(ours)  # prefill and one step: warm
    llm.eval(prompt[0].tolist())
    token = llama_next()
    llm.eval([token])
    token = llama_next()
    theirs_s, ours_s = [], []
    for _ in range(args.tokens):
        start = time.perf_counter()
        llm.eval([token])
        token = llama_next()
        theirs_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        next(ours)
        ours_s.append(time.perf_counter() - start)
    per_token = [t / o for t, o in zip(theirs_s, ours_s)]
    quartiles = ", ".join(f"{q:.3f}" for q in statistics.quantiles(per_token, n=4))
    ours_name = f"olmoe {args.weights}"
    theirs_name = f"llama.cpp {llama_cpp.__version__} {peer.upper()}"
    for name, seconds in ((ours_name, ours_s), (theirs_name, theirs_s)):
        print(
            f"{name}: median {1 / statistics.median(seconds):.2f} tok/s, "
            f"mean {len(seconds) / sum(seconds):.2f} tok/s"
        )
    print(f"olmoe / llama.cpp: {sum(theirs_s) / sum(ours_s):.3f}x over {args.tokens} tokens; "
          f"per-token time ratio quartiles {quartiles}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
