"""Helpers shared by the p2p tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from p2p import Host

MakeHost = Callable[..., Awaitable[Host]]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Errors logged so far; clears them so that the guard above accepts them."""
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    return records


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds (for effects of background tasks)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polls state that background tasks change
            await asyncio.sleep(0.01)
