"""Hole punching: the protocol on loopback, then two NATed homes through a public relay in
network namespaces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from p2p import Host, Relay
from p2p.nat import HolePuncher, punch_delay
from security import KeyPair
from tests.netlab._lab import Lab, Node
from tests.netlab._peers import PeerError, PeerProcess
from tests.netlab.conftest import Spawn
from transport import Multiaddr, QuicTransport


def test_sync_lands_half_a_round_trip_after_it_is_sent() -> None:
    assert punch_delay(10.0, 10.2) == pytest.approx((0.2, 0.1))
    assert punch_delay(10.0, 9.0) == (0.0, 0.0)


@pytest.fixture
async def punchers() -> AsyncIterator[list[tuple[Host, Relay, HolePuncher]]]:
    made: list[tuple[Host, Relay, HolePuncher]] = []
    yield made
    for host, relay, puncher in reversed(made):
        await puncher.stop()
        await relay.stop()
        await host.stop()


async def _punching_node(made: list[tuple[Host, Relay, HolePuncher]], serve: bool) -> Host:
    identity = KeyPair.generate()
    quic = QuicTransport(identity)
    host = Host(identity, [quic])
    await host.start([Multiaddr.for_quic("127.0.0.1", 0)])
    relay = Relay(host, identity, serve=serve)
    puncher = HolePuncher(host, quic, relay)
    made.append((host, relay, puncher))
    await relay.start()
    await puncher.start()
    return host


@pytest.mark.timeout(30)
async def test_relayed_connection_is_replaced_by_a_direct_one(
    punchers: list[tuple[Host, Relay, HolePuncher]],
) -> None:
    relay_host = await _punching_node(punchers, serve=True)
    target = await _punching_node(punchers, serve=False)
    dialer = await _punching_node(punchers, serve=False)
    reservation = await punchers[1][1].reserve(relay_host.addrs[0])
    await dialer.connect(reservation.addr.with_p2p(target.peer_id))
    async with asyncio.timeout(10):
        while [c.transport_name for c in dialer.connections(target.peer_id)] != ["quic"]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    (result,) = punchers[1][2].results  # recorded before the relayed connection closes
    assert (result.peer, result.direct, result.attempts) == (dialer.peer_id, True, 1)
    assert await dialer.ping(target.peer_id) < 1.0


async def _relayed_pair(
    spawn: Spawn, relay: PeerProcess, a: Node, b: Node
) -> tuple[PeerProcess, PeerProcess]:
    """A peer in ``b`` reserved on ``relay`` and one in ``a`` connected to it through it."""
    target, dialer = await asyncio.gather(spawn(b), spawn(a))
    circuit = f"{await target.request('reserve', relay=relay.addr)}/p2p/{target.peer_id}"
    assert await dialer.request("connect", addr=circuit) == target.peer_id
    return dialer, target


@pytest.mark.netns
@pytest.mark.timeout(150)
async def test_port_restricted_nats_are_punched(lab: Lab, spawn: Spawn) -> None:
    # a killed peer's reservation lasts until the relay's connection to it times out
    relay = await spawn(lab.public_host("relay"), "--relay-server", "--relay-per-ip=16")
    a, b = lab.lan_host(lab.home()), lab.lan_host(lab.home())
    punched: list[float] = []
    for attempt in range(10):
        dialer, target = await _relayed_pair(spawn, relay, a, b)
        try:
            punched.append(await dialer.request("wait_direct", peer=target.peer_id, timeout=8))
        except PeerError:
            pass
        if attempt < 9:
            await asyncio.gather(dialer.kill(), target.kill())
    print(f"punched {len(punched)}/10, seconds after the relayed connect: {punched}")
    assert len(punched) >= 9
    await relay.kill()
    for text in ("after", "the relay"):
        reply = await dialer.request("echo", peer=target.peer_id, text=text)
        assert reply == {"echo": text, "from": dialer.peer_id}
    conns = await dialer.request("connections", peer=target.peer_id)
    assert [c["transport"] for c in conns] == ["quic"]


@pytest.mark.netns
@pytest.mark.timeout(60)
async def test_symmetric_nat_fails_cleanly_and_stays_relayed(lab: Lab, spawn: Spawn) -> None:
    relay = await spawn(lab.public_host("relay"), "--relay-server")
    a, b = lab.lan_host(lab.home()), lab.lan_host(lab.home(symmetric=True))
    dialer, target = await _relayed_pair(spawn, relay, a, b)
    started = time.monotonic()
    while not (results := await target.request("punch_results")):
        assert time.monotonic() - started < 30, "the punch never gave up"
        await asyncio.sleep(0.2)
    assert results == [
        {"peer": dialer.peer_id, "direct": False, "attempts": 3, "rtt_s": results[0]["rtt_s"]}
    ]
    conns = await dialer.request("connections", peer=target.peer_id)
    assert [c["transport"] for c in conns] == ["circuit"]
    reply = await dialer.request("echo", peer=target.peer_id, text="relayed")
    assert reply == {"echo": "relayed", "from": dialer.peer_id}
