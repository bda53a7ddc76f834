import resource
import sys
from pathlib import Path

import pytest
import torch

from olmoe.memory import HUGE_PAGE, advise_huge_pages, retain_freed_memory

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_SETTING.is_file() or "[never]" in THP_SETTING.read_text(),
    reason="no transparent huge pages on this system",
)
def test_large_tensors_are_advised_on_their_aligned_part_small_ones_not():
    large = torch.empty(6 * HUGE_PAGE, dtype=torch.uint8)
    advised = advise_huge_pages([large])
    # The 2 MB-aligned part of a 12 MB allocation: at least 10 MB, at most all of it.
    assert 5 * HUGE_PAGE <= advised <= 6 * HUGE_PAGE and advised % HUGE_PAGE == 0
    assert advise_huge_pages([torch.empty(HUGE_PAGE, dtype=torch.uint8)]) == 0
    large.fill_(1)  # the memory stays usable
    assert int(large.sum()) == large.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults():
    """After the switch, a freed 64 MB block stays with the process: a 48 MB block allocated
    next fits in it and costs no page faults (by default glibc unmaps blocks over 32 MB on
    free, and the 48 MB block would fault in all of its 12,288 pages again)."""
    assert retain_freed_memory()

    def minor_faults_to_fill(num_bytes):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(num_bytes, dtype=torch.uint8)
        block.fill_(1)  # touch every page
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    minor_faults_to_fill(64 << 20)
    assert minor_faults_to_fill(48 << 20) < 100
