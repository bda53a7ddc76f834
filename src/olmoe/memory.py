"""How olmoe asks the operating system for memory: huge pages for the weights, and freed blocks
kept for reuse.

Huge pages. Decoding streams every active weight from memory once per token. With 4 KB pages
that is one TLB miss per page, and a 4 KB row of an expert matrix is a page of its own; with
2 MB pages the same kernels stream faster (docs/inference.md has the measurements). Linux gives huge pages to memory that asks for them (`madvise(MADV_HUGEPAGE)`) before
it is first touched, which is why the loader advises the freshly allocated, still untouched
weight storage before reading into it. Only the weights ask: PyTorch's global switch
(THP_MEM_ALLOC_ENABLE) also gives huge pages to every short-lived activation, and decoding then
runs several times slower.

Freed memory. glibc hands every block above 32 MB (and, after a trim, the top of its heap) back
to the kernel when it is freed, so a training step that allocates and frees the same gigabytes
of activations and gradients every step faults each page in again, zeroed: 2.6-2.9 s of kernel
time per step of bench/train_speed.py's mid shape on one thread, against 7 s of compute.
`retain_freed_memory()` tells glibc to keep freed blocks (up to 1 GB each) for reuse; the step
then spends 0.3-0.6 s in the kernel. The price: the process keeps its high-water mark of memory
until it exits, which olmoe's commands (one job per process) can afford. The CLI calls it.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line calls retain_freed_memory before it has imported torch
    import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return function


_MADVISE = _madvise()


def advise_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Ask for huge pages under the 2 MB-aligned part of each CPU tensor's storage; returns the
    bytes advised. Best effort: where the system has no transparent huge pages (or is not
    Linux) nothing changes and nothing fails."""
    if _MADVISE is None:
        return 0
    advised = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() < 2 * HUGE_PAGE:
            continue
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last > first and _MADVISE(first, last - first, MADV_HUGEPAGE) == 0:
            advised += last - first
    return advised


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
KEEP_BLOCKS_UP_TO = 1 << 30


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (see the
    module doc). Process-wide and permanent; returns whether it applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )
