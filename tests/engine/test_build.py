"""The kernels must build where they can run: a failed build only warns at run time (the engine
then leaves everything to PyTorch), so without this test a broken cpu.cpp would just skip the
kernel tests."""

import shutil

import pytest

from olmoe.engine import native


@pytest.mark.skipif(
    not set(native.REQUIRED_CPU_FLAGS) <= native.cpu_flags() or shutil.which("c++") is None,
    reason="no AVX-512 BF16/VNNI CPU or no C++ compiler: the kernels are not expected here",
)
def test_kernels_build_on_a_cpu_that_has_what_they_need(monkeypatch):
    monkeypatch.delenv("OLMOE_KERNELS", raising=False)
    assert native.compiled() is not None
