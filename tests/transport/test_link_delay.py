"""The link-delay wrapper (``transport._delay``): conformance, added latency, order, env.

The whole transport conformance suite runs over the wrapper (memory and TCP inside):
a delayed link must behave as any link, only later. Then a round trip over loopback
TCP with the wrapper on both ends must grow by about twice the one-way delay, and a
burst of writes must arrive intact, in order, about one delay after it was written.
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial

import pytest

from security import KeyPair
from tests.transport.conformance import (
    WAIT_S,
    Net,
    TransportCase,
    TransportConformance,
    TransportMaker,
    open_pair,
    read_all,
    serve_echo,
)
from transport import DelayTransport, link_delay_from_env
from transport._limits import TransportLimits
from transport._memory import MemoryHub, MemoryTransport
from transport._tcp import TcpTransport

CONFORMANCE_DELAY_S = 0.003
DELAY_S = 0.04


def delayed_memory_world() -> TransportMaker:
    hub = MemoryHub()
    return lambda identity: DelayTransport(MemoryTransport(identity, hub=hub), CONFORMANCE_DELAY_S)


def delayed_tcp(delay_s: float, identity: KeyPair) -> DelayTransport:
    return DelayTransport(TcpTransport(identity, limits=TransportLimits()), delay_s)


CASES = [
    TransportCase("memory", "/memory/0", delayed_memory_world),
    TransportCase("tcp", "/ip4/127.0.0.1/tcp/0", lambda: partial(delayed_tcp, CONFORMANCE_DELAY_S)),
]


@pytest.fixture(params=CASES, ids=lambda case: f"delayed-{case.name}")
def transport_case(request: pytest.FixtureRequest) -> TransportCase:
    return request.param


class TestDelayedConformance(TransportConformance):
    pass


async def round_trip_s(net: Net, size: int) -> float:
    """Median time for ``size`` bytes to go to an echo server and back on one stream."""
    link = await net.connect(serve_echo)
    stream = await link.dialer.open_stream()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        await stream.write(b"x" * size)
        async with asyncio.timeout(WAIT_S):
            assert await stream.readexactly(size) == b"x" * size
        samples.append(time.perf_counter() - started)
    await stream.close()
    return sorted(samples)[len(samples) // 2]


@pytest.mark.timeout(30)
async def test_a_round_trip_grows_by_twice_the_delay() -> None:
    plain = Net(TransportCase("tcp", "/ip4/127.0.0.1/tcp/0", lambda: TcpTransport))
    delayed = Net(
        TransportCase("tcp", "/ip4/127.0.0.1/tcp/0", lambda: partial(delayed_tcp, DELAY_S))
    )
    try:
        base = await round_trip_s(plain, 100)
        slow = await round_trip_s(delayed, 100)
    finally:
        await plain.aclose()
        await delayed.aclose()
    added = slow - base
    assert 2 * DELAY_S * 0.9 <= added <= 2 * DELAY_S + 0.05, (base, slow)


@pytest.mark.timeout(30)
async def test_a_burst_arrives_intact_in_order_one_delay_later() -> None:
    net = Net(TransportCase("tcp", "/ip4/127.0.0.1/tcp/0", lambda: partial(delayed_tcp, DELAY_S)))
    try:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        chunks = [os.urandom(1 + 997 * i % 20_000) for i in range(200)]
        started = time.perf_counter()
        for chunk in chunks:
            await local.write(chunk)
        written_s = time.perf_counter() - started
        await local.close_write()
        first = await asyncio.wait_for(remote.readexactly(len(chunks[0])), WAIT_S)
        first_s = time.perf_counter() - started
        rest = await asyncio.wait_for(read_all(remote), WAIT_S)
        all_s = time.perf_counter() - started
    finally:
        await net.aclose()
    assert first + rest == b"".join(chunks)
    assert written_s < DELAY_S / 2, "writes must not wait for the delay"
    assert DELAY_S * 0.9 <= first_s
    assert all_s < 3 * DELAY_S, "a burst is delayed once, not once per write"


async def test_link_delay_from_env() -> None:
    tcp = TcpTransport(KeyPair.generate())
    assert link_delay_from_env([tcp], {}) == [tcp]
    assert link_delay_from_env([tcp], {"SWARM_LINK_DELAY_MS": "0"}) == [tcp]
    (wrapped,) = link_delay_from_env([tcp], {"SWARM_LINK_DELAY_MS": "20"})
    assert isinstance(wrapped, DelayTransport)
    assert wrapped.inner is tcp and wrapped.delay_s == pytest.approx(0.02)
    assert wrapped.name == tcp.name
    for bad in ("fast", "-3"):
        with pytest.raises(ValueError, match="SWARM_LINK_DELAY_MS"):
            link_delay_from_env([tcp], {"SWARM_LINK_DELAY_MS": bad})
    await tcp.close()


@pytest.mark.timeout(30)
async def test_hosts_over_delayed_links_ping_twice_the_delay_slower() -> None:
    from p2p import Host
    from transport import Multiaddr

    keys = [KeyPair.generate(), KeyPair.generate()]
    hosts = [Host(key, [delayed_tcp(DELAY_S, key)]) for key in keys]
    try:
        for host in hosts:
            await host.start([Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")])
        await hosts[0].connect(hosts[1].addrs[0])
        rtts = sorted([await hosts[0].ping(hosts[1].peer_id) for _ in range(3)])
    finally:
        for host in hosts:
            await host.stop()
    assert 2 * DELAY_S * 0.9 <= rtts[1] <= 2 * DELAY_S + 0.05, rtts
