"""The Host over the in-process transport: connections, streams, ping, identify, limits."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from p2p import (
    IDENTIFY_PROTOCOL_ID,
    PING_PROTOCOL_ID,
    ConnectionLimits,
    DialFailed,
    Host,
    HostLimits,
    IdentifyLimits,
    LimitExceeded,
    P2PError,
    PeerIdMismatch,
    PeerUnreachable,
    ProtocolNotSupported,
)
from p2p._connmgr import order_addrs
from security import KeyPair
from tests.p2p.helpers import MakeHost, errors_logged, eventually
from transport._base import Stream
from transport._errors import StreamReset
from transport._multiaddr import Multiaddr

pytestmark = pytest.mark.timeout(30)


async def echo(stream: Stream, peer: object) -> None:
    while data := await stream.read():
        await stream.write(data)


async def test_connect_learns_the_peer_and_reuses_the_connection(pair: tuple[Host, Host]) -> None:
    a, b = pair
    assert await a.connect(b.addrs[0]) == b.peer_id
    assert await a.connect(b.peer_id) == b.peer_id
    assert len(a.connections(b.peer_id)) == 1
    await eventually(lambda: len(b.connections(a.peer_id)) == 1)
    assert b.listen_addrs[0] in a.peerstore.addrs(b.peer_id)
    assert all(str(addr).endswith(f"/p2p/{b.peer_id}") for addr in b.addrs)


async def test_concurrent_connects_share_one_dial(make_host: MakeHost) -> None:
    a, b = await make_host(), await make_host()
    peers = await asyncio.gather(*(a.connect(b.addrs[0]) for _ in range(20)))
    assert set(peers) == {b.peer_id}
    assert len(a.connections()) == 1
    await eventually(lambda: len(b.connections()) == 1)


async def test_dialing_the_wrong_peer_id_fails(make_host: MakeHost) -> None:
    a, b, c = await make_host(), await make_host(), await make_host()
    wrong = b.listen_addrs[0].with_p2p(c.peer_id)
    with pytest.raises(PeerIdMismatch) as caught:
        await a.connect(wrong)
    assert caught.value.expected == c.peer_id and caught.value.actual == b.peer_id
    assert a.connections() == []


async def test_unknown_peer_and_dead_address_give_typed_errors(make_host: MakeHost) -> None:
    a, b = await make_host(), await make_host()
    with pytest.raises(PeerUnreachable, match="no address known"):
        await a.connect(b.peer_id)
    dead = Multiaddr.for_memory("nobody-listens-here")
    with pytest.raises(DialFailed, match="nobody-listens-here"):
        await a.connect(dead)
    a.peerstore.add_addrs(b.peer_id, [dead, b.listen_addrs[0]])
    assert await a.connect(b.peer_id) == b.peer_id


async def test_ping_measures_and_records_latency(pair: tuple[Host, Host]) -> None:
    a, b = pair
    seconds = await a.ping(b.peer_id)
    assert 0 < seconds < 1
    info = a.peerstore.get(b.peer_id)
    assert info is not None and info.latency_s is not None and info.last_seen is not None
    assert await b.ping(a.peer_id) > 0


async def test_identify_fills_the_peer_store_and_teaches_observed_addresses(
    make_host: MakeHost,
) -> None:
    limits = HostLimits(identify=IdentifyLimits(observed_confirmations=1))
    a, b = await make_host(limits), await make_host()
    b.set_stream_handler("/echo/1", echo)
    await a.connect(b.addrs[0])

    def identified() -> bool:
        info = a.peerstore.get(b.peer_id)
        return info is not None and bool(info.protocols)

    await eventually(identified)
    info = a.peerstore.get(b.peer_id)
    assert info is not None
    assert {"/echo/1", PING_PROTOCOL_ID, IDENTIFY_PROTOCOL_ID} <= info.protocols
    assert info.agent_version == b.agent_version and info.protocol_version == "ipfs/0.1.0"
    assert set(b.listen_addrs) <= set(info.addrs)
    # b saw a at the memory address of a's end of the connection: a learns it.
    (observed,) = a.observed_addrs
    assert observed == a.connections(b.peer_id)[0].local_addr
    assert a.observed_addrs[observed] == 1
    assert observed.with_p2p(a.peer_id) in a.addrs
    explicit = await b.identify(a.peer_id)
    assert explicit.peer_id == a.peer_id and set(explicit.protocols) == set(a.protocols)


async def test_observed_address_needs_confirmations(make_host: MakeHost) -> None:
    a, b = await make_host(), await make_host()
    await a.connect(b.addrs[0])
    await a.identify(b.peer_id)
    assert len(a.observed_addrs) == 1
    assert a.addrs == [addr.with_p2p(a.peer_id) for addr in a.listen_addrs]


async def test_stream_handler_round_trip_and_protocol_choice(pair: tuple[Host, Host]) -> None:
    a, b = pair
    b.set_stream_handler("/echo/2", echo)
    stream, protocol = await a.new_stream(b.peer_id, ["/echo/3", "/echo/2"])
    assert protocol == "/echo/2"
    await stream.write(b"hello")
    assert await stream.readexactly(5) == b"hello"
    await stream.close_write()
    assert await stream.read() == b""
    await stream.close()
    with pytest.raises(ProtocolNotSupported):
        await a.new_stream(b.peer_id, ["/nobody/1"])


async def test_handler_exception_resets_only_its_stream(
    pair: tuple[Host, Host], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair

    async def broken(stream: Stream, peer: object) -> None:
        await stream.readexactly(1)
        raise RuntimeError("handler bug")

    b.set_stream_handler("/broken/1", broken)
    b.set_stream_handler("/echo/1", echo)
    survivor, _ = await a.new_stream(b.peer_id, ["/echo/1"])
    victim, _ = await a.new_stream(b.peer_id, ["/broken/1"])
    await victim.write(b"x")
    with pytest.raises(StreamReset):
        while await victim.read():
            pass
    (record,) = errors_logged(caplog)
    assert "handler bug" in str(record.exc_info[1])
    await survivor.write(b"still here")
    assert await survivor.readexactly(10) == b"still here"
    await survivor.close()
    assert await a.ping(b.peer_id) > 0


async def test_idle_connections_are_pruned_but_busy_ones_kept(make_host: MakeHost) -> None:
    idle = HostLimits(connections=ConnectionLimits(idle_timeout_s=0.2))
    a, b, c = await make_host(idle), await make_host(), await make_host()
    b.set_stream_handler("/echo/1", echo)
    c.set_stream_handler("/echo/1", echo)
    await a.connect(b.addrs[0])
    await a.connect(c.addrs[0])
    busy, _ = await a.new_stream(c.peer_id, ["/echo/1"])
    await eventually(lambda: a.connections(b.peer_id) == [])
    await asyncio.sleep(0.3)
    assert len(a.connections(c.peer_id)) == 1
    await busy.write(b"ok")
    assert await busy.readexactly(2) == b"ok"
    await busy.close()
    await eventually(lambda: a.connections() == [])


async def test_connection_limit_refuses_more(make_host: MakeHost) -> None:
    one = HostLimits(connections=ConnectionLimits(max_connections=1))
    a, b, c = await make_host(one), await make_host(), await make_host()
    await a.connect(b.addrs[0])
    with pytest.raises(LimitExceeded, match="max_connections=1"):
        await a.connect(c.addrs[0])
    # Inbound over the limit is closed by the full Host.
    await c.connect(a.addrs[0])
    await eventually(lambda: c.connections() == [])


async def test_closed_connections_are_forgotten(make_host: MakeHost) -> None:
    a, b = await make_host(), await make_host()
    await a.connect(b.addrs[0])
    await b.stop()
    await eventually(lambda: a.connected_peers() == [])
    with pytest.raises(PeerUnreachable):
        await a.connect(b.peer_id)


async def test_stopped_host_refuses_work(make_host: MakeHost) -> None:
    a = await make_host()
    await a.stop()
    with pytest.raises(P2PError, match="stopped"):
        await a.connect(KeyPair.generate().peer_id)


def test_transport_preference_puts_tcp_first() -> None:
    quic = Multiaddr.from_string("/ip4/10.0.0.1/udp/4001/quic-v1")
    tcp = Multiaddr.from_string("/ip4/10.0.0.1/tcp/4001")
    memory = Multiaddr.for_memory("x")
    dns = Multiaddr.from_string("/dns4/example.org/tcp/4001")
    default = ConnectionLimits().transport_preference
    assert order_addrs([dns, quic, memory, tcp], default) == [tcp, quic, memory, dns]
    quic_first = dataclasses.replace(ConnectionLimits(), transport_preference=("quic", "tcp"))
    assert order_addrs([tcp, quic], quic_first.transport_preference) == [quic, tcp]
