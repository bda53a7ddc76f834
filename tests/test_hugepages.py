from pathlib import Path

import pytest
import torch

from olmoe.hugepages import HUGE_PAGE, advise_huge_pages

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
