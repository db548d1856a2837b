"""Bootstrap retries with exponential backoff; sleeping is mocked, dialing is real."""

from __future__ import annotations

import pytest

from p2p import BootstrapError, DialFailed, Host, HostLimits
from p2p._bootstrap import backoff_delays
from security import KeyPair
from transport._memory import MemoryHub, MemoryTransport
from transport._multiaddr import Multiaddr

pytestmark = pytest.mark.timeout(30)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert backoff_delays(5, 0.5, 3.0) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delays(0, 0.5, 3.0) == []


async def make(hub: MemoryHub, name: str | None = None) -> Host:
    identity = KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=hub)], HostLimits())
    await host.start([Multiaddr.for_memory(name)] if name else [])
    return host


async def test_retries_until_the_peer_comes_up() -> None:
    hub = MemoryHub()
    client = await make(hub)
    late_identity = KeyPair.generate()
    late = Host(late_identity, [MemoryTransport(late_identity, hub=hub)])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:  # the peer starts listening during the second wait
            await late.start([Multiaddr.for_memory("late")])

    target = Multiaddr.for_memory("late").with_p2p(late.peer_id)
    try:
        result = await client.bootstrap([target], retries=5, backoff=0.25, sleep=sleep)
        assert slept == [0.25, 0.5]
        assert result.joined == ((target, late.peer_id),) and result.failures == ()
        assert client.connected_peers() == [late.peer_id]
    finally:
        await client.stop()
        await late.stop()


async def test_one_good_address_is_enough_and_failures_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = MemoryHub()
    client, server = await make(hub), await make(hub, "up")
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    dead = Multiaddr.for_memory("down")
    try:
        result = await client.bootstrap(
            [dead, server.addrs[0]], retries=2, backoff=1.0, sleep=sleep
        )
        assert slept == [1.0, 2.0]
        assert [peer for _, peer in result.joined] == [server.peer_id]
        ((addr, error),) = result.failures
        assert addr == dead and isinstance(error, DialFailed)
        assert "down" in caplog.text
    finally:
        await client.stop()
        await server.stop()


async def test_all_failing_raises_a_report_of_each_address() -> None:
    hub = MemoryHub()
    client = await make(hub)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    addrs = [Multiaddr.for_memory("gone-1"), Multiaddr.for_memory("gone-2")]
    try:
        with pytest.raises(BootstrapError) as caught:
            await client.bootstrap(addrs, retries=3, backoff=0.1, sleep=sleep)
        assert sorted(slept) == sorted([0.1, 0.2, 0.4] * 2)
        assert [addr for addr, _ in caught.value.failures] == addrs
        message = str(caught.value)
        assert "/memory/gone-1" in message and "/memory/gone-2" in message
        assert "no memory listener" in message
    finally:
        await client.stop()
