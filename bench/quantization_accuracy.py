"""What quantisation costs: olmoe's int8 and int4 against bf16, next to llama.cpp's Q4_0 and Q4_K_M.

    .venv/bin/python bench/quantization_accuracy.py perplexity runs/quickstart --data data/stdlib
    .venv/bin/python bench/quantization_accuracy.py logits [--dir ~/.cache/olmoe/bench/released]

`perplexity MODEL --data DIR`: a trained checkpoint's perplexity on the first --windows windows
of a prepared dataset's validation split, on the same tokens for every format: olmoe bf16, int8
and int4, each through the prefill path (one forward over the window: GEMMs on dequantised
weights) and through the decode kernels (one token at a time: int4 also rounds activations to 8
bits per group of 32); then llama.cpp's bf16, Q4_0 and Q4_K_M GGUFs of the same checkpoint, made
by llama.cpp's own converter and quantiser (needs llama-cpp-python and its converter, as
`olmoe bench` does). The copies live in ~/.cache/olmoe/bench/accuracy/.

`logits`: the relative error ||q - bf16|| / ||bf16|| of int8 and int4 logits on the random
released-shape checkpoint that `olmoe bench` writes (prefill-512 and 32 decode steps), one model
in memory at a time.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

import olmoe.engine
from olmoe import OlmoeForCausalLM
from olmoe.benchmarks import engines

CACHE = Path.home() / ".cache/olmoe/bench/accuracy"
OLMOE_FORMATS = ("bf16", "int8", "int4")
GGUF_FORMATS = ("bf16", "q4_0", "q4_k_m")


# ---------------------------------------------------------------------------- perplexity
def working_copy(model: Path) -> Path:
    """The checkpoint's weights, config and tokenizer copied once into the cache, where its
    quantised copies and GGUFs are written beside it (not into a run directory). Keyed by the
    path and the weight files' sizes and times: a retrained model gets a fresh copy."""
    stamps = [str(model.resolve())] + [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(model.glob("*.safetensors"))
    ]
    key = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:12]
    target = CACHE / f"{model.name}-{key}"
    target.mkdir(parents=True, exist_ok=True)
    for file in model.iterdir():
        wanted = file.suffix in (".json", ".safetensors", ".jinja") or file.name.startswith("tok")
        if file.is_file() and wanted and not (target / file.name).is_file():
            shutil.copy2(file, target / file.name)
    return target


def windows(data: Path, length: int, count: int) -> torch.Tensor:
    """The first `count` windows of `length` tokens of the validation split: (count, length)."""
    tokens = np.load(data / "valid.npy", mmap_mode="r")
    if len(tokens) < length * count:
        raise SystemExit(
            f"{data} has {len(tokens)} validation tokens, fewer than {count} x {length}"
        )
    return torch.from_numpy(np.asarray(tokens[: length * count], dtype=np.int64)).view(
        count, length
    )


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of `targets` (n,) under `logits` (n, V), in float64."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return float(-log_probs.gather(-1, targets[:, None]).sum())


def load(directory: Path):
    return olmoe.engine.apply(OlmoeForCausalLM.from_pretrained(directory, dtype=torch.bfloat16))


@torch.inference_mode()
def both_paths(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one sequence `ids` (L,) through both of olmoe's paths: one forward over it
    (the GEMMs), (L, V); and its first `steps` tokens one per call (the decode kernels),
    (steps, V)."""
    prefill = model(ids[None]).logits[0]
    out = model(ids[None, :1], use_cache=True)
    cache, decoded = out.past_key_values, [out.logits[0, -1]]
    for t in range(1, steps):
        out = model(ids[None, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        decoded.append(out.logits[0, -1])
    return prefill, torch.stack(decoded)


def olmoe_nll(directory: Path, batches: torch.Tensor) -> dict[str, float]:
    model = load(directory)
    prefill = decode = 0.0
    for ids in batches:
        whole, stepwise = both_paths(model, ids, len(ids) - 1)
        prefill += nll(whole[:-1], ids[1:])
        decode += nll(stepwise, ids[1:])
    return {"prefill": prefill, "decode": decode}


def llamacpp_logits(gguf: Path, batches: torch.Tensor, threads: int):
    """llama.cpp's logits (length, V) for each window in turn."""
    import llama_cpp

    length = batches.shape[1]
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    for ids in batches:
        llm.reset()
        llm.eval(ids.tolist())
        yield torch.from_numpy(np.array(llm.scores[:length]))
    del llm


def llamacpp_nll(gguf: Path, batches: torch.Tensor, threads: int) -> float:
    logits = llamacpp_logits(gguf, batches, threads)
    return sum(nll(window[:-1], ids[1:]) for window, ids in zip(logits, batches))


def perplexity(args) -> dict:
    work = working_copy(args.model)
    config = json.loads((work / "config.json").read_text())
    length = min(args.length, config["max_position_embeddings"])
    batches = windows(args.data, length, args.windows)
    predicted = batches.numel() - len(batches)
    rows = {}
    for fmt in OLMOE_FORMATS:
        source = work if fmt == "bf16" else engines.ensure_quantized(work, fmt)
        for path, total in olmoe_nll(source, batches).items():
            rows[f"olmoe {fmt} ({path})"] = math.exp(total / predicted)
        print(f"olmoe {fmt} done", flush=True)
    if engines.available("llamacpp"):
        for fmt in GGUF_FORMATS:
            gguf = engines.ensure_gguf(work, fmt, args.llama_cpp_src)
            rows[f"llama.cpp {fmt}"] = math.exp(
                llamacpp_nll(gguf, batches, args.threads) / predicted
            )
            print(f"llama.cpp {fmt} done", flush=True)
    base = rows["olmoe bf16 (prefill)"]
    print(f"\n{args.model}: {args.windows} windows x {length} tokens of {args.data}/valid.npy")
    print(f"{'format':<28} {'perplexity':>10} {'vs olmoe bf16':>14}")
    for name, value in rows.items():
        print(f"{name:<28} {value:>10.3f} {value / base - 1:>+13.2%}")
    return {"model": str(args.model), "windows": args.windows, "length": length, "perplexity": rows}


# ---------------------------------------------------------------------------- logits
def released_logits(directory: Path, prompt: torch.Tensor, steps: int):
    model = load(directory)
    prefill, decoded = both_paths(model, prompt[0], steps)
    del model
    gc.collect()
    return prefill.float(), decoded.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(args) -> dict:
    prompt = torch.randint(0, 50000, (1, 512), generator=torch.Generator().manual_seed(0))
    bf16 = released_logits(args.dir, prompt, args.steps)
    found = {}
    for fmt in ("int8", "int4"):
        quantised = released_logits(engines.ensure_quantized(args.dir, fmt), prompt, args.steps)
        found[fmt] = {
            "prefill": relative(quantised[0], bf16[0]),
            "decode": relative(quantised[1], bf16[1]),
        }
        print(
            f"{fmt} vs bf16 logits, relative error: prefill-512 {found[fmt]['prefill']:.4f}, "
            f"decode {found[fmt]['decode']:.4f}",
            flush=True,
        )
    if engines.available("llamacpp"):  # llama.cpp's own formats against its own bf16
        reference = None
        for fmt in GGUF_FORMATS:
            gguf = engines.ensure_gguf(args.dir, fmt, args.llama_cpp_src)
            (window,) = llamacpp_logits(gguf, prompt, torch.get_num_threads())
            if reference is None:
                reference = window
                continue
            found[f"llama.cpp {fmt}"] = {"prefill": relative(window, reference)}
            print(f"llama.cpp {fmt} vs llama.cpp bf16 logits, relative error: prefill-512 "
                  f"{found[f'llama.cpp {fmt}']['prefill']:.4f}", flush=True)  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("perplexity", help="perplexity of a trained checkpoint per format")
    ppl.add_argument("model", type=Path, help="a trained olmoe checkpoint (bf16 or fp32)")
    ppl.add_argument("--data", type=Path, required=True, help="prepared dataset (olmoe data)")
    ppl.add_argument("--windows", type=int, default=16)
    ppl.add_argument(
        "--length", type=int, default=512, help="tokens per window (at most the context)"
    )
    ppl.add_argument("--threads", type=int, default=2)
    ppl.add_argument("--llama-cpp-src", help="unpacked llama-cpp-python sdist (see olmoe bench)")
    lg = commands.add_parser("logits", help="logit error on the random released-shape checkpoint")
    lg.add_argument("--dir", type=Path, default=Path.home() / ".cache/olmoe/bench/released")
    lg.add_argument("--steps", type=int, default=32)
    lg.add_argument("--llama-cpp-src", help="unpacked llama-cpp-python sdist (see olmoe bench)")
    for sub in (ppl, lg):
        sub.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", torch.get_num_threads()))
    result = perplexity(args) if args.command == "perplexity" else logits(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
