"""NAT building blocks on loopback: relayed connections close at once, reservations end
with their relay, relaying is switched on and off, any stream is upgraded to a secure
multiplexed connection, and a peer's dead addresses do not delay its working one."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2p import ConnectionLimits, Host, HostLimits, P2PError, PeerIdMismatch, Relay
from p2p._interfaces import expand_wildcards, is_lan_ip
from p2p.discovery import lan_interfaces
from security import KeyPair
from tests.p2p.helpers import eventually
from transport import MemoryHub, MemoryTransport, Multiaddr, QuicTransport, StreamUpgrader
from transport import PeerIdMismatch as TransportPeerIdMismatch

ECHO = "/test/upgrade-echo/1"


@pytest.fixture
async def relays() -> AsyncIterator[list[tuple[Host, Relay]]]:
    made: list[tuple[Host, Relay]] = []
    yield made
    for host, relay in reversed(made):
        await relay.stop()
        await host.stop()


async def _node(made: list[tuple[Host, Relay]], *, serve: bool) -> tuple[Host, Relay]:
    identity = KeyPair.generate()
    host = Host(identity, [QuicTransport(identity)])
    await host.start([Multiaddr.for_quic("127.0.0.1", 0)])
    relay = Relay(host, identity, serve=serve)
    made.append((host, relay))
    await relay.start()
    return host, relay


@pytest.mark.timeout(30)
async def test_relayed_connections_close_at_once_and_reservations_end_with_the_relay(
    relays: list[tuple[Host, Relay]],
) -> None:
    relay_host, _ = await _node(relays, serve=True)
    target, target_relay = await _node(relays, serve=False)
    dialer, _ = await _node(relays, serve=False)
    reservation = await target_relay.reserve(relay_host.addrs[0])
    circuit = reservation.addr.with_p2p(target.peer_id)
    for closing in (dialer, target):
        await dialer.connect(circuit)
        other = target if closing is dialer else dialer
        (conn,) = closing.connections(other.peer_id)
        started = time.monotonic()
        await conn.close()
        assert time.monotonic() - started < 1.0, "closing a relayed connection lingered"
        await eventually(lambda o=other, c=closing: not o.connections(c.peer_id), timeout=2.0)
    assert circuit in target.addrs
    dialer.peerstore.add_addrs(target.peer_id, [circuit])  # kept as /.../p2p-circuit
    assert await dialer.connect(target.peer_id) == target.peer_id
    await relay_host.stop()
    await eventually(lambda: not target_relay.reservations, timeout=2.0)
    assert circuit not in target.addrs


@pytest.mark.timeout(30)
async def test_relaying_is_switched_on_and_off(relays: list[tuple[Host, Relay]]) -> None:
    relay_host, relay = await _node(relays, serve=False)
    _, user = await _node(relays, serve=False)
    with pytest.raises(P2PError):
        await user.reserve(relay_host.addrs[0])
    relay.set_serving(True)
    assert relay.serving
    assert (await user.reserve(relay_host.addrs[0])).relay == relay_host.peer_id
    relay.set_serving(False)
    assert not relay.serving and len(user.reservations) == 1


@pytest.mark.timeout(30)
async def test_any_stream_is_upgraded_to_a_secure_multiplexed_connection() -> None:
    hub = MemoryHub()
    identities = [KeyPair.generate() for _ in range(2)]
    a, b = (Host(i, [MemoryTransport(i, hub=hub)]) for i in identities)
    await a.start([])
    await b.start([Multiaddr.for_memory("0")])
    try:
        await _upgrade_over_a_stream(a, b, {i.peer_id: StreamUpgrader(i) for i in identities})
    finally:
        await a.stop()
        await b.stop()


async def _upgrade_over_a_stream(a: Host, b: Host, upgraders: dict[Any, StreamUpgrader]) -> None:
    accepted: asyncio.Queue[object] = asyncio.Queue()
    here = Multiaddr.from_string("/memory/upgrade")

    async def serve(stream: object, peer: object) -> None:
        upgraded = await upgraders[b.peer_id].upgrade(
            stream,  # type: ignore[arg-type]
            dialer=False,
            expected=None,
            local_addr=here,
            remote_addr=here,
            transport_name="test",
        )
        await accepted.put(upgraded.connection.remote_peer)
        inner = await upgraded.connection.accept_stream()
        await inner.write(b"echo:" + await inner.read())
        await inner.close()
        await upgraded.connection.wait_closed()

    b.set_stream_handler(ECHO, serve)  # type: ignore[arg-type]
    stream, _ = await a.new_stream(b.addrs[0], [ECHO])
    upgraded = await upgraders[a.peer_id].upgrade(
        stream,
        dialer=True,
        expected=b.peer_id,
        local_addr=here,
        remote_addr=here,
        transport_name="test",
    )
    conn = upgraded.connection
    assert (conn.transport_name, conn.remote_peer) == ("test", b.peer_id)
    assert conn.remote_addr == here.with_p2p(b.peer_id)
    assert await asyncio.wait_for(accepted.get(), 5) == a.peer_id
    inner = await conn.open_stream()
    await inner.write(b"hi")
    await inner.close_write()
    assert await inner.read() == b"echo:hi"
    await conn.close()

    wrong, _ = await a.new_stream(b.addrs[0], [ECHO])
    with pytest.raises(TransportPeerIdMismatch):
        await upgraders[a.peer_id].upgrade(
            wrong,
            dialer=True,
            expected=KeyPair.generate().peer_id,
            local_addr=here,
            remote_addr=here,
            transport_name="test",
        )
    assert issubclass(PeerIdMismatch, P2PError)


@pytest.mark.timeout(30)
async def test_a_dead_address_does_not_hold_up_a_working_one() -> None:
    identities = [KeyPair.generate() for _ in range(2)]
    limits = HostLimits(connections=ConnectionLimits(dial_stagger_s=0.2))
    a, b = (Host(i, [QuicTransport(i)], limits) for i in identities)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        await a.start([])
        await b.start([Multiaddr.for_quic("127.0.0.1", 0)])
        dead = Multiaddr.for_quic("127.0.0.1", silent.getsockname()[1])
        a.peerstore.add_addrs(b.peer_id, [dead, b.listen_addrs[0]])
        started = time.monotonic()
        assert await a.connect(b.peer_id) == b.peer_id
        assert time.monotonic() - started < 2.0
        assert len(a.connections(b.peer_id)) == 1
    finally:
        silent.close()
        await a.stop()
        await b.stop()


def test_wildcards_become_the_interfaces_addresses_loopback_only_as_a_last_resort() -> None:
    quic = Multiaddr.from_string("/ip4/0.0.0.0/udp/4001/quic-v1")
    tcp6 = Multiaddr.from_string("/ip6/::/tcp/4002")
    fixed = Multiaddr.for_tcp("10.0.0.9", 5)
    ips = ["127.0.0.1", "::1", "192.168.1.20", "203.0.113.7", "2001:db8::1"]
    assert expand_wildcards([quic, tcp6, fixed], lambda: ips) == [
        Multiaddr.from_string("/ip4/192.168.1.20/udp/4001/quic-v1"),
        Multiaddr.from_string("/ip4/203.0.113.7/udp/4001/quic-v1"),
        Multiaddr.from_string("/ip6/2001:db8::1/tcp/4002"),
        fixed,
    ]
    assert expand_wildcards([quic], lambda: ["127.0.0.1"]) == [
        Multiaddr.from_string("/ip4/127.0.0.1/udp/4001/quic-v1")
    ]


def test_lan_addresses_are_private_link_local_or_loopback() -> None:
    assert [is_lan_ip(ip) for ip in ("10.1.0.1", "172.20.0.1", "192.168.0.1", "127.0.0.1")] == [
        True
    ] * 4
    assert [is_lan_ip(ip) for ip in ("203.0.113.5", "8.8.8.8", "2001:db8::1", "nonsense")] == [
        False
    ] * 4
    assert is_lan_ip("fd00::2") and is_lan_ip("::1")
    listen = [
        Multiaddr.for_tcp("10.1.0.5", 1),
        Multiaddr.for_quic("127.0.0.1", 2),
        Multiaddr.for_tcp("203.0.113.4", 3),
        Multiaddr.for_quic("192.168.1.2", 4),
        Multiaddr.for_quic("10.1.0.5", 5),
    ]
    assert lan_interfaces(listen) == ["10.1.0.5", "192.168.1.2"]
