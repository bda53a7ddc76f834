"""Fixtures of the server's tests."""

from __future__ import annotations

import pytest

from olmoe.serve.engine import Engine


@pytest.fixture
def engine_factory():
    engines = []

    def make(model, **kwargs):
        engine = Engine(model, None, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
