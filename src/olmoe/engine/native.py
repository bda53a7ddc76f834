"""The native CPU kernels (cpu.cpp), compiled on first use, and thin typed wrappers around them.

Only the engine's modules call these; which of them runs when is decided in olmoe/engine/layers.py.
The build (about a minute, once per machine and torch version) lands in `~/.cache/olmoe/kernels`.
`OLMOE_KERNELS=0` disables them: then the engine leaves every call to the reference PyTorch code.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
HEADERS = ("cpu_layout.h", "cpu_avx512.h", "cpu_avx2.h")  # cpu.cpp includes one back end's
# The back ends, best first: (CPU flags it needs, compiler flags). cpu.cpp includes the one the
# compiler flags enable. -fopenmp makes at::parallel_for use threads (without it the kernels run
# on one core); no -fopenmp at link time, so that the OpenMP runtime is torch's own, not a
# second one whose threads would fight torch's.
BACK_ENDS = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"),
        ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mavx512vnni"],
    ),
    "avx2": (("avx2", "fma", "f16c"), ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]),
}  # fmt: skip


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def back_end() -> str | None:
    """The best kernel back end this CPU runs ("avx512" or "avx2"), or None."""
    flags = cpu_flags()
    return next((name for name, (needs, _) in BACK_ENDS.items() if set(needs) <= flags), None)


@functools.cache
def compiled():
    """The compiled kernel module, or None where it cannot run here: neither AVX-512 BF16/VNNI
    nor AVX2 with FMA and F16C, no compiler, or OLMOE_KERNELS=0."""
    if os.environ.get("OLMOE_KERNELS", "1") == "0":
        return None
    name = back_end()
    if name is None:
        return None
    library = library_path(name)
    build = library.parent
    try:
        return _import(library) if library.exists() else _build(name, build, library)
    except Exception as exc:  # no compiler, no ninja, a failed build: PyTorch still works
        warnings.warn(
            f"olmoe's CPU kernels could not be built ({type(exc).__name__}: {exc}); decoding "
            "falls back to PyTorch, which is several times slower",
            stacklevel=2,
        )
        return None


def library_path(name: str) -> Path:
    """Where the library of back end `name` built from these sources and this torch lives (it
    may not exist)."""
    from olmoe.assets import cache_dir

    flags = BACK_ENDS[name][1]
    sources = [SOURCE, *(SOURCE.with_name(header) for header in HEADERS)]
    recipe = b"".join(path.read_bytes() for path in sources)
    recipe += torch.__version__.encode() + " ".join(flags).encode()
    digest = hashlib.sha256(recipe).hexdigest()[:12]
    return cache_dir() / "kernels" / digest / f"olmoe_cpu_{name}_{digest}.so"


def _build(name: str, build: Path, library: Path):
    """Compile cpu.cpp with back end `name` into `library`, one process at a time, and return
    the module.

    The lock is an flock, which the OS drops when its holder dies: torch's own build lock is a
    file that a process killed mid-build leaves behind, after which every later build would wait
    on it forever (so torch's runs only in a staging folder that the holder of ours empties).
    The library is built there and renamed into place, so a killed build never leaves a
    half-written one that later processes would try to import."""
    from torch.utils.cpp_extension import load

    build.mkdir(parents=True, exist_ok=True)
    with open(build / "build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # another process built it while this one waited
            return _import(library)
        print("olmoe: compiling the CPU decode kernels (once, about a minute)...", file=sys.stderr)
        staging = build / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        module = load(
            name=library.stem, sources=[str(SOURCE)], build_directory=str(staging),
            extra_cflags=BACK_ENDS[name][1], verbose=False,
        )  # fmt: skip
        os.replace(staging / library.name, library)
        shutil.rmtree(staging, ignore_errors=True)
        return module


def _import(library: Path):
    """Import the built extension module straight from its file: no rebuild check, no lock."""
    spec = importlib.util.spec_from_file_location(library.stem, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    row_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear` for a few bf16 rows. x: (..., K); weight: (N, K) bf16, int8 (N, K) with its
    per-row float32 `scale` and int32 `row_sum`, or packed int4 (N, Kp / 2) uint8 with its
    float16 `scale` (N, Kp / 32) (see olmoe.quantize)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (T, K)
    out = compiled().linear(rows, weight, bias, scale, row_sum)  # (T, N)
    return out.view(*x.shape[:-1], weight.shape[0])


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` for many bf16 rows (a prefill) and a quantised weight: int8 (N, K) with its
    float32 `scale` (N,), or packed int4 with its float16 `scale` (see olmoe.quantize). The
    weight is dequantised a tile at a time (as olmoe.quantize rounds) into the GEMM."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = compiled().quantized_linear(rows, weight, scale, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def prefill_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` for many bf16 rows and a bf16 weight through float32's GEMM, rounded once (as
    a bf16 GEMM rounds): for CPUs whose bf16 GEMMs are emulated (see `bf16_gemm`)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = compiled().prefill_linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def bf16_gemm() -> bool:
    """Whether this back end hands bf16 GEMMs to oneDNN as they are: false for AVX2, where
    oneDNN emulates bf16 products hundreds of times slower than float32 ones and the kernels
    multiply in float32 instead (and so must the engine's prefill linear layers)."""
    return compiled().bf16_gemm


def moe(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    gate_up_sum: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    down_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE block's expert part for a few bf16 tokens: x (T, H), gate_up (E, 2I, H),
    down (E, H, I) (bf16, int8 with per-row scales and sums, or packed int4 with group scales
    and no sums), indices and weights (T, K) from the router; returns (T, H)."""
    return compiled().moe(
        x.contiguous(), gate_up, down, indices, weights,
        gate_up_scale, gate_up_sum, down_scale, down_sum,
    )  # fmt: skip


def grouped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    slot_order: torch.Tensor,
    counts: torch.Tensor,
    top_k_weights: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A prefill's SiLU experts, each expert's slots in one pass on one thread, the experts side
    by side: x (T, H) bf16; gate_up (E, 2I, H), down (E, H, I), bf16, or int8 or packed int4
    with `scales` (each expert dequantised to bf16 by its thread);
    slot_order (T * K,) the flat routing slots sorted by expert, counts (E,) per expert;
    top_k_weights (T, K) bf16. Returns (T * K, H): slot s holds its expert's output times the
    slot's weight (see cpu.cpp)."""
    gate_up_scale, down_scale = scales or (None, None)
    return compiled().grouped_experts(
        x.contiguous(), gate_up, down, slot_order, counts, top_k_weights, gate_up_scale, down_scale
    )


class GroupedLinear(torch.autograd.Function):
    """`x @ weight[e].T` for consecutive row groups of x (group e: counts[e] rows), each group
    a whole GEMM on one thread, forward and backward. x (S, K), weight (E, N, K), counts (E,)
    -> (S, N)."""

    @staticmethod
    def forward(ctx, x, weight, counts):
        ctx.save_for_backward(x, weight, counts)
        return compiled().grouped_linear(x.contiguous(), weight, counts, None)

    @staticmethod
    def backward(ctx, grad):
        x, weight, counts = ctx.saved_tensors
        grad = grad.contiguous()  # a .sum() loss hands down an expanded gradient
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # group e: grad_e @ weight[e]
            grad_x = compiled().grouped_linear(grad, weight.transpose(1, 2), counts, None)
        if ctx.needs_input_grad[1]:
            grad_weight = compiled().grouped_weight_grad(grad, x.contiguous(), counts)
        return grad_x, grad_weight, None


def exp_logits(
    h: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """exp(h @ weight.T - shift[:, None]) (R, V), its row sums (R,) and the largest exponent,
    in one pass without the logits: float32 h (R, K), weight (V, K), shift (R,)."""
    return compiled().exp_logits(h.contiguous(), weight.contiguous(), shift.contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of a few bf16 rows (see OlmoeRMSNorm)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return compiled().rms_norm(rows, weight, eps).view(x.shape)


def decode_attention(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one query per sequence: q (B, N, 1, D); k, v
    (B, G, P, D), views of the cache; mask (B, 1, 1, P) additive or None -> (B, N, 1, D)."""
    b, n, _, d = q.shape
    flat_mask = None if mask is None else mask.reshape(b, -1)
    return compiled().decode_attention(q.reshape(b, n, d), k, v, flat_mask, scale).view(b, n, 1, d)


def decode_layers(x: torch.Tensor, weights, keys, values, *state):
    """Every decoder layer for one new token per sequence, in one native call (see
    olmoe/engine/decode.py): the last layer's output and each layer's router logits, or None
    when the weights do not fit the kernel (nothing has been written then). weights: every
    layer's `LayerWeights`, one flat list; keys, values: per layer, the cache buffers."""
    result = compiled().decode_layers(x.contiguous(), weights, keys, values, *state)
    if not result:
        return None
    return result[0], result[1:]


def read_all(buffer: torch.Tensor) -> int:
    """Read every byte of `buffer` once on all threads (a memory read bandwidth probe)."""
    return compiled().read_all(buffer)
