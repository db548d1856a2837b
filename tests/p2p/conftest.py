"""Hosts on a private in-process hub, and a guard that no test logs an unexpected error."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from p2p import Host, HostLimits
from security import KeyPair
from tests.p2p.helpers import MakeHost
from transport._memory import MemoryHub, MemoryTransport
from transport._multiaddr import Multiaddr


@pytest.fixture
async def make_host() -> AsyncIterator[MakeHost]:
    """``await make_host(limits=..., listen=True)``: a started Host; all stop after the test."""
    hub = MemoryHub()
    hosts: list[Host] = []

    async def make(limits: HostLimits = HostLimits(), *, listen: bool = True) -> Host:  # noqa: B008
        identity = KeyPair.generate()
        host = Host(identity, [MemoryTransport(identity, hub=hub)], limits)
        await host.start([Multiaddr.for_memory("0")] if listen else [])
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        await host.stop()


@pytest.fixture
async def pair(make_host: MakeHost) -> tuple[Host, Host]:
    """Two started Hosts; the first is connected to the second."""
    a, b = await make_host(), await make_host()
    await a.connect(b.addrs[0])
    return a, b


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose code logged an error it did not expect (and then clear).

    Catches the event loop's exception handler too: asyncio logs there.
    """
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "unexpected errors logged:\n" + "\n".join(r.getMessage() for r in errors)
