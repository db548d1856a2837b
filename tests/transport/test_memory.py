"""The memory transport's own behaviour; the shared contract is in test_conformance.py."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from security import KeyPair
from transport._base import Connection, Stream, Transport
from transport._errors import (
    ConnectionClosed,
    DialError,
    LimitExceeded,
    PeerIdMismatch,
    StreamClosed,
    StreamReset,
    TransportError,
)
from transport._limits import MemoryLimits
from transport._memory import DEFAULT_HUB, MemoryConnection, MemoryHub, MemoryTransport
from transport._multiaddr import Multiaddr

pytestmark = pytest.mark.timeout(30)

ANY = Multiaddr.from_string("/memory/0")
LIMITS = MemoryLimits()


async def keep(conn: Connection) -> None:
    await conn.wait_closed()


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., MemoryTransport]]:
    """Transports on one private hub, all closed after the test."""
    hub = MemoryHub()
    made: list[MemoryTransport] = []

    def factory(limits: MemoryLimits = LIMITS, hub: MemoryHub = hub) -> MemoryTransport:
        transport = MemoryTransport(KeyPair.generate(), limits, hub)
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.close()


async def connect(
    dialer: MemoryTransport, listener: MemoryTransport
) -> tuple[MemoryConnection, Connection]:
    inbound: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        inbound.put_nowait(conn)
        await conn.wait_closed()

    bound = await listener.listen(ANY, handler)
    outbound = await dialer.dial(bound.addrs[0])
    return outbound, await inbound.get()


async def pair(make: Callable[..., MemoryTransport], **limits: int) -> tuple[Stream, Stream]:
    a, b = make(MemoryLimits(**limits)), make(MemoryLimits(**limits))
    outbound, inbound = await connect(a, b)
    local = await outbound.open_stream()
    return local, await inbound.accept_stream()


async def settle() -> None:
    """Let every ready task run (a memory operation takes a few loop turns at most)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_memory_transport_fulfils_the_protocols() -> None:
    transport = MemoryTransport(KeyPair.generate(), hub=MemoryHub())
    assert isinstance(transport, Transport)
    assert transport.name == "memory"


async def test_streams_and_connections_fulfil_the_protocols(make) -> None:
    local, _ = await pair(make)
    assert isinstance(local, Stream)
    assert isinstance(local.connection, Connection)


async def test_write_waits_while_the_window_is_full(make) -> None:
    local, remote = await pair(make, window_bytes=8)
    await local.write(b"12345678")
    blocked = asyncio.ensure_future(local.write(b"9"))
    await settle()
    assert not blocked.done(), "8 unread bytes fill an 8-byte window"
    assert await remote.read(1) == b"1"
    await settle()
    assert blocked.done()
    await blocked
    assert await remote.readexactly(8) == b"23456789"


async def test_the_window_is_the_readers(make) -> None:
    a, b = make(MemoryLimits(window_bytes=1)), make(MemoryLimits(window_bytes=4))
    outbound, inbound = await connect(a, b)
    local = await outbound.open_stream()
    remote = await inbound.accept_stream()
    await local.write(b"123")
    await asyncio.wait_for(local.write(b"4"), 1)
    blocked = asyncio.ensure_future(local.write(b"5"))
    await remote.write(b"a")
    back = asyncio.ensure_future(remote.write(b"b"))
    await settle()
    assert not blocked.done() and not back.done()
    assert await remote.readexactly(5) == b"12345"
    assert await local.readexactly(2) == b"ab"
    await asyncio.gather(blocked, back)


async def test_one_write_larger_than_the_window_goes_in_whole(make) -> None:
    local, remote = await pair(make, window_bytes=4)
    await asyncio.wait_for(local.write(b"x" * 100), 1)
    assert await remote.readexactly(100) == b"x" * 100


async def test_reads_split_large_chunks(make) -> None:
    local, remote = await pair(make)
    await local.write(b"abcdefgh")
    assert await remote.read(3) == b"abc"
    assert await remote.read(3) == b"def"
    assert await remote.read(100) == b"gh"
    with pytest.raises(ValueError):
        await remote.read(0)


async def test_close_drops_what_arrives_later_without_blocking_the_writer(make) -> None:
    local, remote = await pair(make, window_bytes=4)
    await remote.close()
    with pytest.raises(StreamClosed):
        await remote.read()
    for _ in range(10):
        await asyncio.wait_for(local.write(b"ignored"), 1)
    assert await local.read() == b"", "close() half-closes our side too"


async def test_reset_is_seen_by_both_ends(make) -> None:
    local, remote = await pair(make)
    await local.write(b"unread data is discarded")
    remote.reset()
    for stream in (local, remote):
        with pytest.raises(StreamReset):
            await stream.read()
        with pytest.raises(StreamReset):
            await stream.write(b"x")
    with pytest.raises(StreamReset):
        await local.close_write()


async def test_connection_close_fails_writer_blocked_on_the_window(make) -> None:
    a, b = make(), make(MemoryLimits(window_bytes=1))
    outbound, inbound = await connect(a, b)
    stream = await outbound.open_stream()
    await stream.write(b"fills the window")
    blocked = asyncio.ensure_future(stream.write(b"waits"))
    await settle()
    await inbound.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(blocked, 1)
    with pytest.raises(ConnectionClosed):
        await inbound.accept_stream()


async def test_stream_limit_counts_live_streams_only(make) -> None:
    a, b = make(MemoryLimits(max_streams=2)), make(MemoryLimits(max_streams=2))
    outbound, inbound = await connect(a, b)

    async def open_one() -> tuple[Stream, Stream]:
        local = await outbound.open_stream()
        return local, await inbound.accept_stream()

    first, _ = await open_one()
    second, remote_second = await open_one()
    with pytest.raises(LimitExceeded) as caught:
        await outbound.open_stream()
    assert caught.value.limit == 2
    assert "max_streams=2" in str(caught.value)

    first.reset()
    third, remote_third = await open_one()
    with pytest.raises(LimitExceeded):
        await inbound.open_stream()

    await second.close()
    await remote_second.close()
    await open_one()

    await third.close_write()
    await remote_third.close_write()
    assert await remote_third.read() == b""
    assert await third.read() == b""
    await open_one()
    with pytest.raises(LimitExceeded):
        await outbound.open_stream()


async def test_the_remote_stream_limit_is_enforced_too(make) -> None:
    a, b = make(MemoryLimits(max_streams=10)), make(MemoryLimits(max_streams=1))
    outbound, _ = await connect(a, b)
    await outbound.open_stream()
    with pytest.raises(LimitExceeded, match="remote"):
        await outbound.open_stream()


async def test_listen_on_zero_picks_distinct_names(make) -> None:
    transport = make()
    first = await transport.listen(ANY, keep)
    second = await transport.listen(ANY, keep)
    assert first.addrs != second.addrs
    for listener in (first, second):
        assert listener.addrs[0].value_for("memory") != "0"


async def test_a_name_is_bound_once_and_freed_by_close(make) -> None:
    transport = make()
    named = Multiaddr.for_memory("server")
    listener = await transport.listen(named, keep)
    assert listener.addrs == [named]
    with pytest.raises(TransportError, match="already in use"):
        await make().listen(named, keep)
    await listener.close()
    assert listener.addrs == []
    await make().listen(named, keep)


async def test_hubs_are_isolated(make) -> None:
    listener = await make().listen(ANY, keep)
    elsewhere = make(hub=MemoryHub())
    with pytest.raises(DialError, match="no memory listener"):
        await elsewhere.dial(listener.addrs[0])


async def test_default_hub_is_shared_by_transports_made_without_one() -> None:
    server = MemoryTransport(KeyPair.generate())
    client = MemoryTransport(KeyPair.generate())
    try:
        listener = await server.listen(ANY, keep)
        name = listener.addrs[0].value_for("memory")
        assert name is not None and DEFAULT_HUB._lookup(name) is listener
        conn = await client.dial(listener.addrs[0])
        assert conn.remote_peer == server.identity.peer_id
    finally:
        await client.close()
        await server.close()
    assert DEFAULT_HUB._lookup(name) is None


async def test_p2p_in_the_address_is_checked(make) -> None:
    server = make()
    listener = await server.listen(ANY, keep)
    addr = listener.addrs[0]
    conn = await make().dial(addr.with_p2p(server.identity.peer_id))
    assert conn.remote_peer == server.identity.peer_id
    with pytest.raises(PeerIdMismatch):
        await make().dial(addr.with_p2p(KeyPair.generate().peer_id))


async def test_addresses_it_handles(make) -> None:
    transport = make()
    peer = KeyPair.generate().peer_id
    memory = Multiaddr.for_memory("a")
    tcp = Multiaddr.for_tcp("127.0.0.1", 1)
    assert transport.can_dial(memory) and transport.can_listen(memory)
    assert transport.can_dial(memory.with_p2p(peer))
    assert not transport.can_listen(memory.with_p2p(peer))
    assert not transport.can_dial(tcp) and not transport.can_listen(tcp)
    with pytest.raises(DialError):
        await transport.dial(tcp)
    with pytest.raises(TransportError):
        await transport.listen(tcp, keep)


async def test_connection_addresses_and_peers(make) -> None:
    a, b = make(), make()
    outbound, inbound = await connect(a, b)
    assert outbound.transport_name == inbound.transport_name == "memory"
    assert outbound.remote_addr == inbound.local_addr
    assert outbound.local_addr == inbound.remote_addr
    assert outbound.local_addr.transport_kind == "memory"
    assert (outbound.local_peer, outbound.remote_peer) == (a.identity.peer_id, b.identity.peer_id)


async def test_listener_close_keeps_existing_connections(make) -> None:
    a, b = make(), make()
    outbound, inbound = await connect(a, b)
    for listener in list(b._listeners):
        await listener.close()
    local = await outbound.open_stream()
    await local.write(b"still here")
    assert await (await inbound.accept_stream()).readexactly(10) == b"still here"


async def test_transport_close_cancels_handlers_and_refuses_new_work(make) -> None:
    server, client = make(), make()
    cancelled = asyncio.Event()

    async def stubborn(conn: Connection) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    listener = await server.listen(ANY, stubborn)
    addr = listener.addrs[0]
    conn = await client.dial(addr)
    await settle()
    await server.close()
    assert cancelled.is_set()
    assert conn.is_closed
    with pytest.raises(DialError, match="closed"):
        await server.dial(addr)
    with pytest.raises(DialError, match="no memory listener"):
        await client.dial(addr)
    with pytest.raises(TransportError):
        await server.listen(ANY, keep)


async def test_a_failing_handler_is_logged(make, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(conn: Connection) -> None:
        raise RuntimeError("handler bug")

    server = make()
    listener = await server.listen(ANY, broken)
    with caplog.at_level(logging.ERROR, logger="transport._memory"):
        await make().dial(listener.addrs[0])
        await settle()
    assert "handler failed" in caplog.text
    assert "handler bug" in caplog.text


@pytest.mark.timeout(60)
async def test_two_thousand_peers_in_a_ring(make) -> None:
    """A simulation-sized swarm: no thread per peer, every dial and stream works."""
    threads = threading.active_count()
    peers = [make() for _ in range(2000)]
    received: list[bytes] = []
    everyone_heard = asyncio.Event()

    async def record(conn: Connection) -> None:
        stream = await conn.accept_stream()
        received.append(await stream.readexactly(32))
        if len(received) == len(peers):
            everyone_heard.set()

    addrs = [(await peer.listen(ANY, record)).addrs[0] for peer in peers]

    async def greet(i: int) -> None:
        neighbour = peers[(i + 1) % len(peers)]
        conn = await peers[i].dial(addrs[(i + 1) % len(peers)], neighbour.identity.peer_id)
        stream = await conn.open_stream()
        await stream.write(peers[i].identity.public_key)

    async with asyncio.timeout(30):
        await asyncio.gather(*(greet(i) for i in range(len(peers))))
        await everyone_heard.wait()
    assert sorted(received) == sorted(peer.identity.public_key for peer in peers)
    assert threading.active_count() == threads
