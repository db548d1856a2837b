"""Fixtures for the DHT tests, and a guard that no test logs an unexpected error."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.dht.dht_helpers import Cluster, FakeClock


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """An empty memory-transport cluster; every node in it is stopped after the test."""
    made = Cluster()
    yield made
    await made.close()


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose code logged an error (the event loop's handler included)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "unexpected errors logged:\n" + "\n".join(r.getMessage() for r in errors)
