"""Fixtures of the evaluation tests: the OLMo tokenizer and a small model (tests/eval/helpers.py);
a test module may define its own `model`."""

from __future__ import annotations

import pytest

from olmoe.tokenizer import Tokenizer
from tests.eval.helpers import small_model


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.olmo()


@pytest.fixture(scope="module")
def model():
    return small_model()
