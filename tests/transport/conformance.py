"""The conformance suite every ``transport.Transport`` implementation passes.

Use: list a ``TransportCase`` in ``tests/transport/test_conformance.py``. A case names
the transport (its ``Connection.transport_name``), the address to listen on, and
``world``: called once per test, it returns the function that makes one transport for
an identity. Transports made by one world must reach each other (the memory case makes
one private hub per world; socket transports need nothing shared).

Every test bounds its waits, so a transport that hangs fails instead of stalling CI.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from security import KeyPair
from transport._base import Connection, Listener, Stream, Transport
from transport._errors import (
    ConnectionClosed,
    DialError,
    PeerIdMismatch,
    StreamClosed,
    StreamReset,
)
from transport._multiaddr import Multiaddr

TransportMaker = Callable[[KeyPair], Transport]
WAIT_S = 5.0
"""The longest any single step may take before the test calls it a hang."""


@dataclass(frozen=True)
class TransportCase:
    """One transport under test."""

    name: str
    listen_addr: str
    world: Callable[[], TransportMaker]


@dataclass(frozen=True)
class Link:
    """A dialed connection seen from both ends."""

    dialer: Connection
    listener: Connection
    dialer_identity: KeyPair
    listener_identity: KeyPair
    dialer_transport: Transport
    listener_transport: Transport


class Net:
    """The transports, listeners and tasks of one test; ``aclose`` releases them all."""

    def __init__(self, case: TransportCase) -> None:
        self.case = case
        self._make = case.world()
        self._transports: list[Transport] = []
        self._tasks: list[asyncio.Task[Any]] = []

    def transport(self, identity: KeyPair | None = None) -> tuple[Transport, KeyPair]:
        identity = identity or KeyPair.generate()
        transport = self._make(identity)
        self._transports.append(transport)
        return transport, identity

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def serve(
        self, on_connection: Callable[[Connection], Awaitable[None]] | None = None
    ) -> tuple[Transport, KeyPair, Listener, asyncio.Queue[Connection]]:
        """A listening transport; inbound connections are queued (and passed on, if asked)."""
        transport, identity = self.transport()
        inbound: asyncio.Queue[Connection] = asyncio.Queue()

        async def handler(conn: Connection) -> None:
            inbound.put_nowait(conn)
            if on_connection is not None:
                await on_connection(conn)
            await conn.wait_closed()

        addr = Multiaddr.from_string(self.case.listen_addr)
        listener = await transport.listen(addr, handler)
        return transport, identity, listener, inbound

    async def connect(
        self, on_connection: Callable[[Connection], Awaitable[None]] | None = None
    ) -> Link:
        served, listener_identity, listener, inbound = await self.serve(on_connection)
        dialer, dialer_identity = self.transport()
        async with asyncio.timeout(WAIT_S):
            outbound = await dialer.dial(
                listener.addrs[0], listener_identity.peer_id, timeout=WAIT_S
            )
            accepted = await inbound.get()
        return Link(outbound, accepted, dialer_identity, listener_identity, dialer, served)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with asyncio.timeout(WAIT_S):
            for transport in self._transports:
                await transport.close()


async def open_pair(opener: Connection, acceptor: Connection) -> tuple[Stream, Stream]:
    """Open a stream and accept it on the other end (a first byte announces it)."""
    async with asyncio.timeout(WAIT_S):
        local = await opener.open_stream()
        await local.write(b"!")
        remote = await acceptor.accept_stream()
        assert await remote.readexactly(1) == b"!"
    return local, remote


async def read_all(stream: Stream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


async def echo(stream: Stream) -> None:
    """Send back everything read, then half-close."""
    while chunk := await stream.read():
        await stream.write(chunk)
    await stream.close_write()


async def serve_echo(conn: Connection) -> None:
    """Accept streams until the connection closes, echoing each one."""
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            stream = await conn.accept_stream()
            task = asyncio.get_running_loop().create_task(echo(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except ConnectionClosed:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(60)
class TransportConformance:
    """Subclass in a test module that provides the ``transport_case`` fixture."""

    @pytest.fixture
    async def net(self, transport_case: TransportCase) -> Any:
        net = Net(transport_case)
        try:
            yield net
        finally:
            await net.aclose()

    async def test_listen_and_dial(self, net: Net) -> None:
        transport, _, listener, _ = await net.serve()
        assert transport.can_listen(Multiaddr.from_string(net.case.listen_addr))
        assert listener.addrs, "a listener reports the addresses it bound"
        for addr in listener.addrs:
            assert addr.peer_id is None, f"{addr}: listener addresses carry no /p2p/"
            assert all(value != "0" for _, value in addr.components), f"{addr}: 0 not resolved"
            assert Multiaddr.from_string(str(addr)) == addr
            assert transport.can_dial(addr)
        link = await net.connect()
        for conn in (link.dialer, link.listener):
            assert conn.transport_name == net.case.name
            assert not conn.is_closed

    async def test_peer_ids_are_authenticated_both_ways(self, net: Net) -> None:
        link = await net.connect()
        assert link.dialer.local_peer == link.dialer_identity.peer_id
        assert link.dialer.remote_peer == link.listener_identity.peer_id
        assert link.listener.local_peer == link.listener_identity.peer_id
        assert link.listener.remote_peer == link.dialer_identity.peer_id

    async def test_wrong_expected_peer_is_refused(self, net: Net) -> None:
        _, listener_identity, listener, _ = await net.serve()
        dialer, _ = net.transport()
        stranger = KeyPair.generate().peer_id
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(PeerIdMismatch) as caught:
                await dialer.dial(listener.addrs[0], stranger, timeout=WAIT_S)
            conn = await dialer.dial(listener.addrs[0], listener_identity.peer_id, timeout=WAIT_S)
        assert caught.value.expected == stranger
        assert caught.value.actual == listener_identity.peer_id
        assert conn.remote_peer == listener_identity.peer_id

    async def test_streams_open_in_both_directions(self, net: Net) -> None:
        link = await net.connect()
        for opener, acceptor in ((link.dialer, link.listener), (link.listener, link.dialer)):
            local, remote = await open_pair(opener, acceptor)
            assert local.connection is opener
            assert remote.connection is acceptor
            async with asyncio.timeout(WAIT_S):
                await local.write(b"ping")
                assert await remote.readexactly(4) == b"ping"
                await remote.write(b"pong")
                assert await local.readexactly(4) == b"pong"

    async def test_echo(self, net: Net) -> None:
        link = await net.connect(serve_echo)
        async with asyncio.timeout(WAIT_S):
            stream = await link.dialer.open_stream()
            for message in (b"a", b"hello world", bytes(range(256)) * 40):
                await stream.write(message)
                assert await stream.readexactly(len(message)) == message
            await stream.close_write()
            assert await stream.read() == b""

    async def test_half_close(self, net: Net) -> None:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        async with asyncio.timeout(WAIT_S):
            await local.write(b"request")
            await local.close_write()
            assert await read_all(remote) == b"request"
            assert await remote.read() == b"", "end of stream is sticky"
            await remote.write(b"response after the remote half-closed")
            await remote.close_write()
            assert await read_all(local) == b"response after the remote half-closed"

    async def test_write_after_close_write_raises(self, net: Net) -> None:
        link = await net.connect()
        local, _ = await open_pair(link.dialer, link.listener)
        await local.close_write()
        with pytest.raises(StreamClosed):
            await local.write(b"too late")

    async def test_readexactly_past_end_raises_stream_closed(self, net: Net) -> None:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        async with asyncio.timeout(WAIT_S):
            await local.write(b"abc")
            await local.close_write()
            with pytest.raises(StreamClosed):
                await remote.readexactly(4)

    async def test_reset_fails_both_ends(self, net: Net) -> None:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        local_read = net.spawn(local.read())
        remote_read = net.spawn(remote.read())
        await asyncio.sleep(0.05)
        assert not local_read.done() and not remote_read.done()
        local.reset()
        async with asyncio.timeout(WAIT_S):
            for pending in (local_read, remote_read):
                with pytest.raises(StreamReset):
                    await pending
            with pytest.raises(StreamReset):
                await local.write(b"after reset")
            with pytest.raises(StreamReset):
                while True:
                    await remote.write(b"x")
                    await asyncio.sleep(0.01)

    @pytest.mark.timeout(120)
    async def test_eight_mib_arrive_intact(self, net: Net) -> None:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        rng = random.Random(8)
        payload = rng.randbytes(8 * 1024 * 1024)

        async def send() -> None:
            view = memoryview(payload)
            while view:
                size = rng.randint(1, 256 * 1024)
                await local.write(view[:size])
                view = view[size:]
            await local.close_write()

        sender = net.spawn(send())
        async with asyncio.timeout(60):
            received = await read_all(remote)
            await sender
        assert len(received) == len(payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()

    async def test_hundred_concurrent_streams(self, net: Net) -> None:
        link = await net.connect(serve_echo)

        async def round_trip(i: int) -> bool:
            stream = await link.dialer.open_stream()
            message = i.to_bytes(2, "big") * (500 + 37 * i)
            await stream.write(message)
            await stream.close_write()
            return await read_all(stream) == message

        async with asyncio.timeout(30):
            results = await asyncio.gather(*(round_trip(i) for i in range(100)))
        assert all(results)

    async def test_closing_the_connection_fails_pending_operations(self, net: Net) -> None:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        pending = [
            net.spawn(local.read()),
            net.spawn(remote.read()),
            net.spawn(link.listener.accept_stream()),
        ]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in pending)
        await link.dialer.close()
        async with asyncio.timeout(WAIT_S):
            for task in pending:
                with pytest.raises((ConnectionClosed, StreamReset)):
                    await task
            await link.listener.wait_closed()
            await link.dialer.wait_closed()
        assert link.dialer.is_closed and link.listener.is_closed
        with pytest.raises(ConnectionClosed):
            await link.dialer.open_stream()

    async def test_dial_to_a_closed_listener_raises_dial_error(self, net: Net) -> None:
        _, identity, listener, _ = await net.serve()
        addr = listener.addrs[0]
        await listener.close()
        dialer, _ = net.transport()
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(DialError):
                await dialer.dial(addr, identity.peer_id, timeout=WAIT_S / 4)

    async def test_closing_the_transport_closes_its_connections(self, net: Net) -> None:
        link = await net.connect()
        async with asyncio.timeout(WAIT_S):
            await link.listener_transport.close()
        async with asyncio.timeout(WAIT_S):
            await link.listener.wait_closed()
            await link.dialer.wait_closed()

    async def test_writer_may_reuse_its_buffer(self, net: Net) -> None:
        link = await net.connect()
        local, remote = await open_pair(link.dialer, link.listener)
        buffer = bytearray(b"first")
        await local.write(buffer)
        buffer[:] = b"again"
        await local.write(memoryview(buffer))
        async with asyncio.timeout(WAIT_S):
            assert await remote.readexactly(10) == b"firstagain"
