"""The engines `olmoe bench` (`olmoe.benchmarks.cpu_inference`) compares, and the checkpoint
they all read.

Each `run_*` function loads one engine from the cached checkpoint and measures it the same way:
load seconds, a short warm-up, prefill of three different 512-token prompts (the median rate:
one prefill alone swung by 10-20% here, and each new prompt routes its tokens to experts in new
proportions, so an engine that prepares work per shape pays it as a real prompt would), then
greedy decoding of 128 new tokens after a 16-token prompt at batch 1 and batch 8, eos ignored.
Decode time runs from the first new token (prefill and its sampling excluded) to the last, so
tok/s = B * (steps - 1) / seconds counts only the steps that fed one token per sequence through
the model.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM
from olmoe.hardware import matrix_units

PREFILL_TOKENS = 512
PREFILL_PROMPTS = 3
DECODE_PROMPT_TOKENS = 16
DECODE_NEW_TOKENS = 128
DECODE_BATCHES = (1, 8)
# Prompt ids stay below the tokenizer's 50280 real tokens, so every engine sees ordinary tokens
# (llama.cpp pads the vocabulary to the model's 50304 with unusable entries).
PROMPT_ID_RANGE = (100, 50000)
SEED = 0

SHAPES: dict[str, Callable[[], OlmoeConfig]] = {
    "released": OlmoeConfig.olmoe_1b_7b,
    # The released vocabulary, expert count and top-k at a thirteenth of its weights (1 GB in
    # bf16): one engine's load, prefill and decodes take about 20 s on 2 cores.
    "small": lambda: OlmoeConfig.olmoe_1b_7b(
        hidden_size=1024, num_hidden_layers=4, intermediate_size=512
    ),
}

LLAMA_CPP_SRC_ENV = "LLAMA_CPP_SRC"
LLAMA_CPP_FETCH_HELP = """\
llama.cpp's converter (convert_hf_to_gguf.py) was not found. It ships in the llama-cpp-python
source archive; fetch the one matching the installed package and point the benchmark at it:

    .venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python=={version} -d /tmp/lcp
    mkdir -p {default}
    tar xzf /tmp/lcp/llama_cpp_python-{version}.tar.gz -C {default} --strip-components=1

(or pass --llama-cpp-src DIR / set {env}=DIR to an unpacked archive or a llama.cpp checkout)."""


# ---------------------------------------------------------------------------- checkpoint
def write_checkpoint(directory: Path, config: OlmoeConfig, tokenizer: bool = True) -> None:
    """Write a seeded random bf16 checkpoint of `config`'s shape in the hub layout.

    The model is built on the meta device and materialised straight in bf16, so the released
    shape never needs a float32 copy (27 GB). Everything goes to a staging directory that is
    renamed into place at the end: an interrupted run never leaves a half-written cache.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    with torch.device("meta"):
        model = OlmoeForCausalLM(config)
    model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    try:
        model.save_pretrained(staging, max_shard_size="5GB")
        del model
        gc.collect()
        if tokenizer:
            # llama.cpp's converter builds the GGUF vocabulary from these files.
            from olmoe.tokenizer import Tokenizer

            Tokenizer.olmo().save_pretrained(staging)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # an empty target (e.g. made by mkdir) is not a checkpoint
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_checkpoint(directory: Path, shape: str) -> bool:
    """Write the checkpoint unless a complete one is there; True when it was written now."""
    if (directory / "config.json").is_file():
        return False
    write_checkpoint(directory, SHAPES[shape]())
    return True


# ---------------------------------------------------------------------------- llama.cpp GGUF
def find_converter(source: str | None) -> Path:
    """convert_hf_to_gguf.py inside an unpacked llama-cpp-python sdist or a llama.cpp checkout."""
    default = Path.home() / ".cache/olmoe/bench/llama-cpp-src"
    candidates = [Path(p) for p in (source, os.environ.get(LLAMA_CPP_SRC_ENV)) if p] + [default]
    for root in candidates:
        for script in (
            root / "convert_hf_to_gguf.py",
            root / "vendor/llama.cpp/convert_hf_to_gguf.py",
        ):
            if script.is_file():
                return script
    try:
        from importlib.metadata import version

        installed = version("llama-cpp-python")
    except Exception:  # noqa: BLE001 -- only a hint in a message; any failure means "unknown"
        installed = "<version>"
    raise FileNotFoundError(
        LLAMA_CPP_FETCH_HELP.format(version=installed, default=default, env=LLAMA_CPP_SRC_ENV)
    )


def gguf_path(checkpoint: Path, outtype: str) -> Path:
    return checkpoint / "gguf" / f"model-{outtype}.gguf"


# llama.cpp's own quantisation types (llama-quantize's names), made from the bf16 GGUF.
QUANTIZED_GGUF = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def ensure_gguf(checkpoint: Path, outtype: str, llama_cpp_src: str | None = None) -> Path:
    """Convert the checkpoint once with llama.cpp's own converter (bf16, q8_0), or quantise
    its bf16 GGUF with llama.cpp's quantiser (q4_0, q4_k_m, as `llama-quantize` does); cached
    beside the weights (the converter is only looked for when there is something to convert)."""
    target = gguf_path(checkpoint, outtype)
    if target.is_file():
        return target
    if outtype in QUANTIZED_GGUF:
        return quantize_gguf(ensure_gguf(checkpoint, "bf16", llama_cpp_src), target, outtype)
    converter = find_converter(llama_cpp_src)
    target.parent.mkdir(exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    command = [sys.executable, str(converter), str(checkpoint), "--outtype", outtype]
    try:
        done = subprocess.run(
            [*command, "--outfile", str(partial)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")
        os.rename(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def quantize_gguf(source: Path, target: Path, outtype: str) -> Path:
    """llama.cpp's quantiser (the library call behind `llama-quantize`) from `source` into
    `target`, through a partial file renamed into place."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_GGUF[outtype])
    params.nthread = os.cpu_count() or 1
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not quantise {source} to {outtype} ({status})")
        os.rename(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------- measurements
def peak_rss_gb() -> float:
    """The process's peak resident set (VmHWM), which mmap-loaded weights count once touched."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / 1e9


def random_prompt(batch: int, length: int, variant: int = 0) -> torch.Tensor:
    """The same seeded token ids for every engine: (batch, length) int64; `variant` picks
    another prompt of that shape."""
    generator = torch.Generator().manual_seed(SEED + 1000 * batch + length + 100_000 * variant)
    low, high = PROMPT_ID_RANGE
    return torch.randint(low, high, (batch, length), generator=generator)


def decode_rate(stamps: list[float], batch: int) -> float:
    """tok/s over the steps after the first new token (that one comes out of prefill)."""
    steps = len(stamps) - 1
    return batch * steps / (stamps[-1] - stamps[0])


# ---------------------------------------------------------------------------- read bandwidth
# This machine's read bandwidth moves in phases of seconds to minutes (32 to 60 GB/s seen within
# one process), so a rate measured minutes apart in another process is no fair limit. Each worker
# also reads this much just before and just after each decode measurement.
ADJACENT_PROBE_BYTES = 512 << 20  # far beyond the 32 MB L3: every read comes from DRAM


def probe_buffer(nbytes: int, huge_pages: bool) -> torch.Tensor:
    """A buffer of random bytes to read. Random, not constant: a page of one repeated value read
    at 60 GB/s here, presumably merged with its twins by the host."""
    buffer = torch.empty(nbytes // 4, dtype=torch.int32)
    if huge_pages:
        from olmoe.memory import advise_huge_pages

        advise_huge_pages([buffer])  # before the first touch, as olmoe's loader does
    return buffer.random_()


def readers() -> dict[str, Callable[[torch.Tensor], object]]:
    """Ways to read a buffer once on all threads: torch.sum (reads only its input, keeps up with
    the memory on 2 cores) and olmoe's AVX-512 read kernel where it builds."""
    found = {"torch_sum": lambda buffer: buffer.view(torch.float32).sum()}
    try:
        import olmoe.engine

        if olmoe.engine.available():
            found["olmoe_kernels"] = olmoe.engine.native.read_all
    except Exception:  # noqa: BLE001 -- a broken kernel build must not stop the benchmark
        pass
    return found


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls of `fn`, after one untimed (page faults, thread pool)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_gb_s(buffer: torch.Tensor, read, repeats: int) -> float:
    """Fastest of `repeats` reads of `buffer` (after one untimed), in GB/s."""
    return buffer.nbytes / best_seconds(lambda: read(buffer), repeats) / 1e9


# ---------------------------------------------------------------------------- matmul rate
# The compute rate moves in phases too (a best-of-10 GEMM read 38 GFLOP/s at one run's start
# and 62-67 most other times), so each worker also times a GEMM just before and just after its
# prefills, and the fastest rate any probe saw is the prefill limit.
MATMUL_SHAPE = (512, 2048, 2048)  # (M, K, N): a prefill-sized GEMM of the released width


def matmul_dtype() -> torch.dtype:
    """What the prefill limit multiplies in: bf16 where the CPU multiplies bf16 natively, else
    float32, which is what olmoe's engine multiplies a bf16 model's prefill in there (PyTorch's
    emulated bf16 GEMM is no limit)."""
    return torch.bfloat16 if matrix_units() != "none" else torch.float32


class Probe:
    """A rate measurement to repeat during a worker's life, and the bytes its buffers keep
    resident all along: the worker's peak RSS leaves them out, as they are the benchmark's, not
    the engine's."""

    def __init__(self, rate: Callable[[], float], *buffers: torch.Tensor):
        self.rate = rate
        self.resident_bytes = sum(buffer.nbytes for buffer in buffers)

    def __call__(self) -> float:
        return self.rate()


def matmul_probe(repeats: int) -> Probe:
    """A GEMM-rate probe: torch's (oneDNN's) GFLOP/s at MATMUL_SHAPE in `matmul_dtype()`, the
    fastest of `repeats` products."""
    m, k, n = MATMUL_SHAPE
    dtype, generator = matmul_dtype(), torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    return Probe(lambda: 2 * m * k * n / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9, a, b)


def adjacent_probe() -> Probe:
    """A read-bandwidth probe for the worker's decode measurements: olmoe's read kernel where
    it builds (else torch.sum) on a 2 MB page buffer, best of 3."""
    buffer = probe_buffer(ADJACENT_PROBE_BYTES, huge_pages=True)
    read = list(readers().values())[-1]
    return Probe(lambda: read_gb_s(buffer, read, repeats=3), buffer)


def measure(load, prefill, decode, batches=DECODE_BATCHES, prepare=None) -> dict:
    """The common protocol: `load()` returns the engine; `prepare(engine)`, untimed, settles
    options; `prefill(engine, ids)` runs a prompt; `decode(engine, ids, n)` returns one
    timestamp per new token. Returns the worker's metrics, with the read bandwidth around each
    decode measurement (the mean of one probe before and one after), the faster of two GEMM
    rates, one just before the prefills and one just after, and the peak RSS without the
    probes' buffers (`probe_rss_gb`, resident from before the load to the end)."""
    probe, gemm = adjacent_probe(), matmul_probe(repeats=3)
    start = time.perf_counter()
    engine = load()
    result: dict = {"load_s": time.perf_counter() - start}
    if prepare is not None:
        prepare(engine)
    # One short generation first: the first call of every engine pays for allocations and
    # thread-pool start-up that steady-state tokens do not.
    decode(engine, random_prompt(1, DECODE_PROMPT_TOKENS), 4)
    rates, gflop_s = [], gemm()
    for variant in range(PREFILL_PROMPTS):
        ids = random_prompt(1, PREFILL_TOKENS, variant)
        start = time.perf_counter()
        prefill(engine, ids)
        rates.append(PREFILL_TOKENS / (time.perf_counter() - start))
    result["prefill_tok_s"] = statistics.median(rates)
    result["prefill_matmul_gflop_s"] = max(gflop_s, gemm())
    for batch in DECODE_BATCHES:
        key = f"decode_b{batch}_tok_s"
        if batch not in batches:
            result[key] = None
            continue
        before = probe()
        stamps = decode(engine, random_prompt(batch, DECODE_PROMPT_TOKENS), DECODE_NEW_TOKENS)
        result[key] = decode_rate(stamps, batch)
        result[f"decode_b{batch}_read_gb_s"] = (before + probe()) / 2
    probes_gb = (probe.resident_bytes + gemm.resident_bytes) / 1e9
    result["peak_rss_gb"] = peak_rss_gb() - probes_gb
    result["probe_rss_gb"] = probes_gb
    return result


# ---------------------------------------------------------------------------- olmoe
def quantized_path(checkpoint: Path, method: str) -> Path:
    return checkpoint / method


def ensure_quantized(checkpoint: Path, method: str) -> Path:
    """Write the checkpoint's quantised copy once, as `olmoe quantize` does (the worker then
    loads it straight from disk, as a user would); again when the format has changed since."""
    from olmoe.quantize import quantization_config

    target = quantized_path(checkpoint, method)
    config = target / "config.json"
    current = config.is_file() and json.loads(config.read_text()).get("quantization_config")
    if current != quantization_config(method):
        model = OlmoeForCausalLM.from_pretrained(checkpoint, quantize=method)
        model.save_pretrained(target)  # staged and moved into place by save_pretrained
    return target


def run_olmoe(directory: Path, quantize: str | None = None, **_) -> dict:
    import olmoe.engine
    from olmoe import KVCache, generation

    source = quantized_path(directory, quantize) if quantize else directory

    def load():
        return olmoe.engine.apply(OlmoeForCausalLM.from_pretrained(source, dtype=torch.bfloat16))

    @torch.inference_mode()
    def prefill(model, ids):
        cache = KVCache(model.config.num_hidden_layers, capacity=ids.shape[1])
        generation.prefill(model, ids, cache)

    def decode(model, ids, new_tokens):
        steps = generation.generate_tokens(model, ids, new_tokens, eos_token_id=[])
        return [time.perf_counter() for _ in steps]

    result = measure(load, prefill, decode)
    result["label"] = f"olmoe ({quantize or 'bf16'})"
    result["weights"] = quantize or "bf16"
    return result


# ---------------------------------------------------------------------------- transformers
# transformers' own default first (reference.md: grouped_mm decodes the released shape at 4.2
# tok/s, its eager loop at 3.8), then the eager loop. Never batched_mm as a fallback: it gathers
# one weight copy per (token, expert) pair, 13 GB for a 512-token prefill of the small shape and
# 51 GB for the released one.
TRANSFORMERS_EXPERTS = ("grouped_mm", "eager")


class _StepClock:
    """A transformers streamer that only timestamps: `generate` calls `put` once with the prompt,
    then once per new token (all sequences of the batch at once)."""

    def __init__(self):
        self.stamps: list[float] = []
        self.calls = 0

    def put(self, value) -> None:
        if self.calls:
            self.stamps.append(time.perf_counter())
        self.calls += 1

    def end(self) -> None:
        pass


def _pick_experts(model, experts: str | None) -> str:
    """Switch the loaded model to the first experts implementation that runs a forward here, in
    TRANSFORMERS_EXPERTS order (or only `experts` when given); its name."""
    errors = []
    for name in [experts] if experts else TRANSFORMERS_EXPERTS:
        try:
            model.set_experts_implementation(name)
            with torch.inference_mode():
                model(random_prompt(1, 4))
            return model.config._experts_implementation
        except Exception as error:  # noqa: BLE001 -- one this torch/CPU cannot run: try the next
            errors.append(f"{name}: {type(error).__name__}: {error}")
    raise RuntimeError("no experts implementation ran: " + "; ".join(errors))


def run_transformers(directory: Path, experts: str | None = None, **_) -> dict:
    import transformers

    def load():
        model = transformers.OlmoeForCausalLM.from_pretrained(
            directory, dtype=torch.bfloat16, experts_implementation=experts or "grouped_mm"
        )
        return model.eval()

    def prefill(model, ids):
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)

    def decode(model, ids, new_tokens):
        clock = _StepClock()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                # eos can never end a sequence early: every run decodes the same number of steps
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=model.config.pad_token_id,
                streamer=clock,
            )
        return clock.stamps

    chosen = []
    result = measure(
        load, prefill, decode, prepare=lambda m: chosen.append(_pick_experts(m, experts))
    )
    result["label"] = f"transformers {transformers.__version__} (experts={chosen[0]})"
    result["weights"] = "bf16"
    result["experts_implementation"] = chosen[0]
    return result


# ---------------------------------------------------------------------------- llama.cpp
def run_llamacpp(directory: Path, outtype: str = "bf16", threads: int = 2, **_) -> dict:
    import llama_cpp
    import numpy as np

    gguf = gguf_path(directory, outtype)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing (the parent converts it before the workers)")

    def load():
        return llama_cpp.Llama(
            model_path=str(gguf),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=1024,
            n_batch=PREFILL_TOKENS,
            n_ubatch=PREFILL_TOKENS,
            logits_all=False,
            verbose=False,
        )

    def prefill(llm, ids):
        llm.reset()
        llm.eval(ids[0].tolist())

    sequences = {}  # the decode context, made once: the Llama class has one sequence only

    def decode(llm, ids, new_tokens):
        if not sequences:
            sequences["ctx"] = multi_sequence_context(llm, max(DECODE_BATCHES), threads)
        ctx, (batch, length) = sequences["ctx"], ids.shape
        vocab = llm.n_vocab()

        def greedy(row) -> int:
            # A row's logits straight from the context: one argmax, no sampler chain.
            logits = llama_cpp.llama_get_logits_ith(ctx, row)
            return int(np.ctypeslib.as_array(logits, shape=(vocab,)).argmax())

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        step = llama_cpp.llama_batch_init(batch * length, 0, batch)
        try:
            fill = [
                (b, t, int(ids[b, t]), t == length - 1) for b in range(batch) for t in range(length)
            ]
            run_batch(ctx, step, fill)
            tokens = [greedy(b * length + length - 1) for b in range(batch)]
            stamps = [time.perf_counter()]
            for position in range(length, length + new_tokens - 1):
                run_batch(ctx, step, [(b, position, tokens[b], True) for b in range(batch)])
                tokens = [greedy(b) for b in range(batch)]
                stamps.append(time.perf_counter())
        finally:
            llama_cpp.llama_batch_free(step)
        return stamps

    result = measure(load, prefill, decode)
    result["label"] = f"llama.cpp {llama_cpp.__version__} ({outtype} GGUF)"
    result["weights"] = outtype
    return result


def multi_sequence_context(llm, sequences: int, threads: int):
    """A second llama.cpp context on the loaded model with room for `sequences` sequences (the
    low-level API, as llama.cpp's batched examples use it)."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = sequences * 256
    params.n_batch = params.n_ubatch = PREFILL_TOKENS
    params.n_seq_max = sequences
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not make a context for batched decoding")
    return ctx


def run_batch(ctx, batch, entries) -> None:
    """One llama_decode of `entries` (sequence, position, token, wants logits)."""
    import llama_cpp

    for i, (sequence, position, token, logits) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.logits[i] = token, position, logits
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
    batch.n_tokens = len(entries)
    status = llama_cpp.llama_decode(ctx, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode failed ({status})")


# Engine name -> (runner, keyword arguments). Ours first; the rest are peers.
ENGINES: dict[str, tuple[Callable[..., dict], dict]] = {
    "olmoe": (run_olmoe, {}),
    "olmoe-int8": (run_olmoe, {"quantize": "int8"}),
    "olmoe-int4": (run_olmoe, {"quantize": "int4"}),
    "transformers": (run_transformers, {}),
    # Not run by default: to check that the default really is transformers' fastest here.
    "transformers-batched_mm": (run_transformers, {"experts": "batched_mm"}),
    "transformers-eager": (run_transformers, {"experts": "eager"}),
    "llamacpp": (run_llamacpp, {"outtype": "bf16"}),
    "llamacpp-q8": (run_llamacpp, {"outtype": "q8_0"}),
    "llamacpp-q4_0": (run_llamacpp, {"outtype": "q4_0"}),
    "llamacpp-q4_k_m": (run_llamacpp, {"outtype": "q4_k_m"}),
}
OURS = ("olmoe", "olmoe-int8", "olmoe-int4")
GGUF_TYPES = {"llamacpp": "bf16", "llamacpp-q8": "q8_0", "llamacpp-q4_0": "q4_0",
              "llamacpp-q4_k_m": "q4_k_m"}  # fmt: skip


def available(name: str) -> bool:
    """Whether an engine's package is importable here (checked without importing it)."""
    from importlib.util import find_spec

    if name.startswith("transformers"):
        return find_spec("transformers") is not None
    if name.startswith("llamacpp"):
        return find_spec("llama_cpp") is not None
    return True
