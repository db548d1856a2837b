"""The in-process transport: ``/memory/<name>`` addresses, for tests and simulations.

A ``MemoryHub`` maps names to listeners; every ``MemoryTransport`` on one hub can dial
every listener on it, and nothing else. The hub knows the identity behind each
listener, so a connection is authenticated by construction: no handshake runs, and
dialing with the wrong expected PeerID raises ``PeerIdMismatch`` at once.

Nothing here owns a thread or a background task per peer: a dial creates two
connection objects and schedules the listener's handler; a stream is a pair of
in-memory pipes. Thousands of peers fit in one process.

A pipe buffers what the writer wrote until the reader takes it. ``write`` copies its
argument once (``bytes(data)``) and waits while the reader already has its window
(the reading side's ``MemoryLimits.window_bytes``) or more unread, so a buffer holds
at most one window plus one write. Closing a connection fails every pending operation on it with
``ConnectionClosed``; a reset fails both ends of the stream with ``StreamReset``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import NoReturn

from security import KeyPair, PeerId

from ._base import Connection, ConnectionHandler
from ._errors import (
    ConnectionClosed,
    DialError,
    LimitExceeded,
    PeerIdMismatch,
    StreamClosed,
    StreamReset,
    TransportError,
)
from ._limits import MemoryLimits
from ._multiaddr import Multiaddr

_log = logging.getLogger(__name__)


class MemoryHub:
    """A namespace of memory listeners; tests make their own to stay isolated."""

    def __init__(self) -> None:
        self._listeners: dict[str, MemoryListener] = {}
        self._counter = itertools.count(1)

    def _bind(self, name: str, listener: MemoryListener) -> str:
        if name == "0":
            name = self._fresh_name()
        if name in self._listeners:
            raise TransportError(
                f"/memory/{name} is already in use on this hub; listen on /memory/0 "
                "to get a free name"
            )
        self._listeners[name] = listener
        return name

    def _unbind(self, name: str, listener: MemoryListener) -> None:
        if self._listeners.get(name) is listener:
            del self._listeners[name]

    def _lookup(self, name: str) -> MemoryListener | None:
        return self._listeners.get(name)

    def _fresh_name(self) -> str:
        while True:
            name = str(next(self._counter))
            if name not in self._listeners:
                return name


DEFAULT_HUB = MemoryHub()
"""The process-wide hub a ``MemoryTransport`` uses unless given one."""


def _raise(error: TransportError) -> NoReturn:
    """Raise a fresh copy, so that one stored error never accumulates tracebacks."""
    raise type(error)(*error.args)


class _Pipe:
    """One direction of a stream: chunks the writer queued and the reader has not taken."""

    __slots__ = ("chunks", "eof", "error", "ignored", "unread", "waiters")

    def __init__(self) -> None:
        self.chunks: deque[bytes | memoryview] = deque()
        self.unread = 0
        self.eof = False
        self.ignored = False
        self.error: TransportError | None = None
        self.waiters: list[asyncio.Future[None]] = []

    async def changed(self) -> None:
        await _wait(self.waiters)

    def notify(self) -> None:
        _wake(self.waiters)

    def fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
            self.drop()

    def drop(self) -> None:
        self.chunks.clear()
        self.unread = 0
        self.notify()

    def take(self, max_bytes: int) -> bytes:
        chunk = self.chunks[0]
        if len(chunk) <= max_bytes:
            self.chunks.popleft()
            out = chunk if isinstance(chunk, bytes) else bytes(chunk)
        else:
            view = memoryview(chunk)
            out = bytes(view[:max_bytes])
            self.chunks[0] = view[max_bytes:]
        self.unread -= len(out)
        self.notify()
        return out


class MemoryStream:
    """One end of an in-memory stream."""

    __slots__ = ("_closed", "_conn", "_inbound", "_outbound", "_remote", "_window")

    def __init__(
        self, conn: MemoryConnection, inbound: _Pipe, outbound: _Pipe, window: int
    ) -> None:
        self._conn = conn
        self._inbound = inbound
        self._outbound = outbound
        self._remote: MemoryStream | None = None
        self._window = window
        self._closed = False

    @property
    def connection(self) -> Connection:
        return self._conn

    async def read(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"read(max_bytes={max_bytes}): max_bytes must be at least 1")
        pipe = self._inbound
        while True:
            self._check_readable()
            if pipe.chunks:
                return pipe.take(max_bytes)
            if pipe.eof:
                self._release_if_done()
                return b""
            await pipe.changed()

    async def readexactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes; ``StreamClosed`` if the remote ends the stream first.

        Bytes are taken as they arrive (a read larger than the window must be), so
        cancelling a pending ``readexactly`` loses what it had gathered.
        """
        if n < 0:
            raise ValueError(f"readexactly(n={n}): n must not be negative")
        pipe = self._inbound
        parts: list[bytes] = []
        missing = n
        while missing > 0:
            self._check_readable()
            if pipe.chunks:
                part = pipe.take(missing)
                parts.append(part)
                missing -= len(part)
            elif pipe.eof:
                raise StreamClosed(
                    f"stream ended after {n - missing} of the {n} bytes expected; "
                    "the remote closed its side early"
                )
            else:
                await pipe.changed()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        pipe = self._outbound
        chunk = bytes(data)
        while True:
            if pipe.error is not None:
                _raise(pipe.error)
            if pipe.eof:
                raise StreamClosed("write after close_write() or close() on this stream")
            if pipe.unread < self._window or pipe.ignored:
                break
            await pipe.changed()
        if chunk and not pipe.ignored:
            pipe.chunks.append(chunk)
            pipe.unread += len(chunk)
            pipe.notify()

    async def close_write(self) -> None:
        pipe = self._outbound
        if pipe.error is not None:
            _raise(pipe.error)
        if not pipe.eof:
            pipe.eof = True
            pipe.notify()
            self._release_if_done()
            if self._remote is not None:
                self._remote._release_if_done()

    async def close(self) -> None:
        """Half-close and stop reading: data still arriving is dropped. Never raises."""
        self._closed = True
        self._outbound.eof = True
        self._outbound.notify()
        self._inbound.ignored = True
        self._inbound.drop()
        self._conn._streams.discard(self)
        if self._remote is not None:
            self._remote._release_if_done()

    def reset(self) -> None:
        error = StreamReset("stream was reset")
        self._outbound.fail(error)
        self._inbound.fail(error)
        self._conn._streams.discard(self)
        if self._remote is not None:
            self._remote._conn._streams.discard(self._remote)

    def _check_readable(self) -> None:
        if self._inbound.error is not None:
            _raise(self._inbound.error)
        if self._closed:
            raise StreamClosed("read after close() on this stream")

    def _fail(self, error: TransportError) -> None:
        self._inbound.fail(error)
        self._outbound.fail(error)

    def _release_if_done(self) -> None:
        """Leave the connection's table once both directions have ended."""
        inbound = self._inbound
        if self._outbound.eof and inbound.eof and (inbound.ignored or not inbound.chunks):
            self._conn._streams.discard(self)

    def __repr__(self) -> str:
        return f"<MemoryStream to {self._conn.remote_peer.short()}>"


class MemoryConnection:
    """One end of an in-memory connection."""

    transport_name = "memory"

    def __init__(
        self,
        owner: MemoryTransport,
        remote_peer: PeerId,
        local_addr: Multiaddr,
        remote_addr: Multiaddr,
    ) -> None:
        self._owner = owner
        self._limits = owner._limits
        self._remote_peer = remote_peer
        self._local_addr = local_addr
        self._remote_addr = remote_addr
        self._peer: MemoryConnection | None = None
        self._streams: set[MemoryStream] = set()
        self._accept_queue: deque[MemoryStream] = deque()
        self._accept_waiters: list[asyncio.Future[None]] = []
        self._closed = asyncio.Event()

    @property
    def local_peer(self) -> PeerId:
        return self._owner.identity.peer_id

    @property
    def remote_peer(self) -> PeerId:
        return self._remote_peer

    @property
    def local_addr(self) -> Multiaddr:
        return self._local_addr

    @property
    def remote_addr(self) -> Multiaddr:
        return self._remote_addr

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    async def open_stream(self) -> MemoryStream:
        peer = self._peer
        if self.is_closed or peer is None:
            raise ConnectionClosed(f"connection to {self._remote_peer} is closed")
        for side, who in ((self, "our"), (peer, "the remote's")):
            limit = side._limits.max_streams
            if len(side._streams) >= limit:
                raise LimitExceeded(
                    f"connection to {side._remote_peer} has {len(side._streams)} open streams; "
                    f"{who} MemoryLimits.max_streams={limit}",
                    value=len(side._streams) + 1,
                    limit=limit,
                )
        forward, backward = _Pipe(), _Pipe()
        local = MemoryStream(self, backward, forward, window=peer._limits.window_bytes)
        remote = MemoryStream(peer, forward, backward, window=self._limits.window_bytes)
        local._remote, remote._remote = remote, local
        self._streams.add(local)
        peer._streams.add(remote)
        peer._accept_queue.append(remote)
        _wake(peer._accept_waiters)
        return local

    async def accept_stream(self) -> MemoryStream:
        while not self._accept_queue:
            if self.is_closed:
                raise ConnectionClosed(f"connection to {self._remote_peer} is closed")
            await _wait(self._accept_waiters)
        return self._accept_queue.popleft()

    async def close(self) -> None:
        self._shut()
        if self._peer is not None:
            self._peer._shut()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _shut(self) -> None:
        if self.is_closed:
            return
        self._closed.set()
        error = ConnectionClosed(f"connection to {self._remote_peer} was closed")
        for stream in self._streams:
            stream._fail(error)
        self._streams.clear()
        self._accept_queue.clear()
        _wake(self._accept_waiters)
        self._owner._connections.discard(self)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<MemoryConnection {self._local_addr} -> {self._remote_peer.short()} {state}>"


async def _wait(waiters: list[asyncio.Future[None]]) -> None:
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        if waiter in waiters:
            waiters.remove(waiter)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


class MemoryListener:
    """A name bound on a hub; connections dialed to it are passed to ``handler``."""

    def __init__(self, owner: MemoryTransport, handler: ConnectionHandler) -> None:
        self._owner = owner
        self._handler = handler
        self._name = ""
        self._closed = False

    @property
    def addrs(self) -> list[Multiaddr]:
        return [] if self._closed else [Multiaddr.for_memory(self._name)]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._hub._unbind(self._name, self)
            self._owner._listeners.discard(self)

    def __repr__(self) -> str:
        return f"<MemoryListener /memory/{self._name}>"


class MemoryTransport:
    """Dials and listens on ``/memory/<name>`` addresses of one ``MemoryHub``."""

    name = "memory"

    def __init__(
        self,
        identity: KeyPair,
        limits: MemoryLimits = MemoryLimits(),  # noqa: B008 - frozen value
        hub: MemoryHub | None = None,
    ) -> None:
        self.identity = identity
        self._limits = limits
        self._hub = DEFAULT_HUB if hub is None else hub
        self._listeners: set[MemoryListener] = set()
        self._connections: set[MemoryConnection] = set()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def can_dial(self, addr: Multiaddr) -> bool:
        return addr.transport_kind == "memory"

    def can_listen(self, addr: Multiaddr) -> bool:
        return addr.transport_kind == "memory" and len(addr.components) == 1

    async def listen(self, addr: Multiaddr, handler: ConnectionHandler) -> MemoryListener:
        if self._closed:
            raise TransportError("memory transport is closed; make a new one to listen")
        name = addr.value_for("memory")
        if name is None or not self.can_listen(addr):
            raise TransportError(f"memory transport cannot listen on {addr}; use /memory/<name>")
        listener = MemoryListener(self, handler)
        listener._name = self._hub._bind(name, listener)
        self._listeners.add(listener)
        return listener

    async def dial(
        self,
        addr: Multiaddr,
        expected_peer: PeerId | None = None,
        *,
        timeout: float | None = None,
    ) -> MemoryConnection:
        """Connect to the listener at ``addr``; ``timeout`` is accepted but never needed.

        ``expected_peer`` defaults to the address's ``/p2p/`` PeerID, if it has one.
        """
        if self._closed:
            raise DialError(f"cannot dial {addr}: memory transport is closed", addr=addr)
        name = addr.value_for("memory")
        if name is None or not self.can_dial(addr):
            raise DialError(f"memory transport cannot dial {addr}", addr=addr)
        listener = self._hub._lookup(name)
        if listener is None:
            raise DialError(f"no memory listener at /memory/{name} on this hub", addr=addr)
        remote = listener._owner
        expected = expected_peer if expected_peer is not None else addr.peer_id
        if expected is not None and expected != remote.identity.peer_id:
            raise PeerIdMismatch(expected=expected, actual=remote.identity.peer_id, addr=addr)
        local_addr = Multiaddr.for_memory(f"dialer-{self._hub._fresh_name()}")
        listen_addr = Multiaddr.for_memory(name)
        outbound = MemoryConnection(self, remote.identity.peer_id, local_addr, listen_addr)
        inbound = MemoryConnection(remote, self.identity.peer_id, listen_addr, local_addr)
        outbound._peer, inbound._peer = inbound, outbound
        self._connections.add(outbound)
        remote._connections.add(inbound)
        remote._start_handler(listener._handler, inbound)
        return outbound

    async def close(self) -> None:
        self._closed = True
        for listener in list(self._listeners):
            await listener.close()
        for conn in list(self._connections):
            await conn.close()
        tasks = list(self._handler_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_handler(self, handler: ConnectionHandler, conn: MemoryConnection) -> None:
        task = asyncio.get_running_loop().create_task(handler(conn))
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("memory connection handler failed", exc_info=exc)

    def __repr__(self) -> str:
        return f"<MemoryTransport {self.identity.peer_id.short()}>"
