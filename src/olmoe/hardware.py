"""The CPU's matrix units, detected at run time, and the choices that follow from them.

Three kinds of x86 machine run olmoe, and bf16 matrix products differ by orders of magnitude
between them (docs/training.md#precision):

- AMX (Intel Xeon 4th generation on): tile instructions multiply bf16 and int8 matrices several
  times faster than float32. oneDNN, behind torch's matmuls, uses them itself; a process must
  first ask Linux for the tiles' register state (arch_prctl ARCH_REQ_XCOMP_PERM), which oneDNN
  does, and torch.cpu._init_amx does for code of its own. olmoe's native kernels (engine/cpu.cpp)
  use AVX-512 BF16/VNNI (or AVX2) instructions only, which need no such request.
- AVX-512 BF16 without AMX (AMD EPYC Zen 4 on): bf16 dot-product instructions; bf16 GEMMs run
  about twice as fast as float32 ones.
- neither (AVX2 only): bf16 is emulated; bf16 GEMMs run far slower than float32 (the engine's
  AVX2 back end multiplies bf16 operands in float32 instead).

`torch._C._cpu._get_cpu_capability` reads the CPU's feature flags (cpuinfo), the same source
oneDNN dispatches on.
"""

from __future__ import annotations

import functools

import torch

MATRIX_UNITS = ("amx", "avx512_bf16", "none")


@functools.cache
def cpu_capability() -> dict:
    """The CPU's feature flags as torch sees them ({} where torch cannot tell)."""
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        return {}


def matrix_units() -> str:
    """The matrix units: "amx" (AMX bf16 tiles), "avx512_bf16" (AVX-512 BF16, no AMX) or "none"."""
    flags = cpu_capability()
    if flags.get("amx_bf16") and flags.get("amx_tile"):
        return "amx"
    if flags.get("avx512_bf16"):
        return "avx512_bf16"
    return "none"


def training_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in: `precision` itself unless it is "auto", which is bf16
    autocast where bf16 matrix products are native (a CUDA GPU that supports bf16, a CPU with
    AMX or AVX-512 BF16) and float32 elsewhere (an AVX2 CPU emulates bf16)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if matrix_units() != "none" else "fp32"
