"""Matrix-unit detection and the training precision that follows from it."""

from __future__ import annotations

import pytest
import torch

from olmoe import hardware

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "flags, units",
    [
        ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, "amx"),
        ({"amx_bf16": False, "amx_tile": False, "avx512_bf16": True}, "avx512_bf16"),
        ({"avx2": True}, "none"),
        ({}, "none"),  # torch could not tell
    ],
)
def test_matrix_units_follow_the_cpu_flags(monkeypatch, flags, units):
    monkeypatch.setattr(hardware, "cpu_capability", lambda: flags)
    assert hardware.matrix_units() == units


@pytest.mark.parametrize("units, precision", [("amx", "bf16"), ("avx512_bf16", "bf16"),
                                              ("none", "fp32")])  # fmt: skip
def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch, units, precision):
    monkeypatch.setattr(hardware, "matrix_units", lambda: units)
    assert hardware.training_precision("auto", CPU) == precision
    assert hardware.training_precision("fp32", CPU) == "fp32"  # an explicit choice stands
    assert hardware.training_precision("bf16", CPU) == "bf16"


def test_this_machine_is_described():
    assert hardware.matrix_units() in hardware.MATRIX_UNITS
    assert isinstance(hardware.cpu_capability(), dict)
