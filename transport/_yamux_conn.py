"""The asyncio shell around ``YamuxSession``: a ``Connection`` driven by its transport.

The TCP transport hands ``YamuxConnection`` the transport it authenticated (and the
bytes it already read past the negotiation) and calls ``start()``: the connection
becomes the transport's protocol. Every chunk the transport receives is fed to the core
in that very callback, and its events are dispatched at once: a stream's reader is woken
directly, with no task in between, so a round trip costs the event loop no more passes
than a bare TLS socket does. Writers wait for window on their own stream; a timer pings
every ``YamuxLimits.keepalive_s`` and drops the connection when a ping goes unanswered
for that long. Whatever ends the connection (``close()``, the peer's EOF, a protocol
violation, a dead peer) wakes every pending operation with ``ConnectionClosed`` or
``StreamReset``.

Copies are few: the transport reads into one reusable buffer (the connection is a
``BufferedProtocol``; TLS decrypts straight into it), each payload is copied once out of
it, reads return whole chunks when they fit, and large writes go to the transport at
once as views of the caller's buffer, behind their 12-byte header.

Every transport write costs a TLS record and a system call on both ends, so small frames
travel together. A short write goes out at once when nothing else is queued (an echo
costs one write per message); otherwise it joins what is queued, which leaves right
before the task that queued it waits on a stream, when it half-closes a stream the peer
still uses, or at the next event-loop iteration, whichever comes first. An accepted
stream's acknowledgement waits for the stream's first frames. A reply thus leaves with
its acknowledgement and its FIN in one TLS record, and a request with the SYN of its
stream and the FIN of the previous one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Literal

from . import _yamux as yamux
from ._errors import ConnectionClosed, StreamClosed, StreamReset
from ._limits import KIB, YamuxLimits

if TYPE_CHECKING:
    from security import PeerId

    from ._multiaddr import Multiaddr

_FIRST_BUFFER_BYTES = 64 * KIB
"""The receive buffer starts this small and doubles, up to ``YamuxLimits.read_chunk_bytes``,
whenever one read fills it: idle connections stay light, bulk ones read in large chunks."""


class YamuxStream:
    """One yamux stream; implements ``transport.Stream``.

    Readers take turns through a lock and writers through another (made when first
    needed), but an operation that can finish without waiting skips the lock when nobody
    holds it: it cannot interleave with anything, and most reads and writes are of that
    kind.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_eof",
        "_head",
        "_preconsumed",
        "_read_closed",
        "_read_lock",
        "_read_waiter",
        "_reset_reason",
        "_write_closed",
        "_write_lock",
        "_write_waiter",
        "stream_id",
    )

    def __init__(self, connection: YamuxConnection, stream_id: int) -> None:
        self._conn = connection
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._head = 0
        self._buffered = 0
        self._preconsumed = 0
        self._eof = False
        self._read_closed = False
        self._write_closed = False
        self._reset_reason: str | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._read_lock: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None

    @property
    def connection(self) -> YamuxConnection:
        return self._conn

    def __repr__(self) -> str:
        return f"<YamuxStream {self.stream_id} to {self._conn.remote_peer}>"

    # -- reading -----------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes``, or ``b""`` at the peer's end; readers take turns."""
        if max_bytes < 1:
            raise ValueError(f"read(max_bytes={max_bytes}) needs max_bytes >= 1")
        lock = self._read_lock
        if self._chunks and (lock is None or not lock.locked()):
            return self._take(max_bytes)
        async with self._read_turn():
            while not self._chunks:
                if self._eof and self._reset_reason is None:
                    self._check_read_open()
                    return b""
                self._check_readable()
                await self._wait_for_data()
            return self._take(max_bytes)

    async def readexactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes; on an error or cancellation nothing is consumed.

        While it waits, the window of what is buffered is granted already, so ``n`` may
        exceed the stream's window.
        """
        if n <= 0:
            return b""
        lock = self._read_lock
        if self._buffered >= n and (lock is None or not lock.locked()):
            return self._take_exactly(n)
        async with self._read_turn():
            while self._buffered < n:
                if self._eof and self._reset_reason is None:
                    self._check_read_open()
                    raise StreamClosed(
                        f"yamux stream {self.stream_id} ended after {self._buffered} of "
                        f"the {n} bytes expected"
                    )
                self._check_readable()
                self._grant_buffered()
                await self._wait_for_data()
            return self._take_exactly(n)

    def _read_turn(self) -> asyncio.Lock:
        if self._read_lock is None:
            self._read_lock = asyncio.Lock()
        return self._read_lock

    def _take_exactly(self, n: int) -> bytes:
        out = self._take(n)
        if len(out) == n:
            return out
        parts = [out]
        need = n - len(out)
        while need:
            part = self._take(need)
            parts.append(part)
            need -= len(part)
        return b"".join(parts)

    def _grant_buffered(self) -> None:
        """Grant the window of the buffered bytes as if read: a reader wants more than them."""
        unread = self._buffered - self._preconsumed
        conn = self._conn
        if unread and conn._core.consume(self.stream_id, unread, conn._loop.time()):
            conn._flush_soon()
        self._preconsumed = self._buffered

    async def _wait_for_data(self) -> None:
        """Sleep until data, end of stream or an error arrives (the read lock is held)."""
        conn = self._conn
        if conn._core.has_output:
            conn._flush()  # what this task queued leaves before it sleeps
        waiter = conn._loop.create_future()
        self._read_waiter = waiter
        try:
            await waiter
        finally:
            self._read_waiter = None

    def _take(self, max_bytes: int) -> bytes:
        chunk = self._chunks[0]
        head = self._head
        if len(chunk) - head <= max_bytes:
            self._chunks.popleft()
            self._head = 0
            out = chunk[head:] if head else chunk
        else:
            out = chunk[head : head + max_bytes]
            self._head = head + max_bytes
        n = len(out)
        self._buffered -= n
        if self._preconsumed:
            credited = min(n, self._preconsumed)
            self._preconsumed -= credited
            n -= credited
        conn = self._conn
        if n and conn._error is None and conn._core.consume(self.stream_id, n, conn._loop.time()):
            conn._flush_soon()
        return out

    def _check_read_open(self) -> None:
        if self._read_closed:
            raise StreamClosed(f"yamux stream {self.stream_id} was closed for reading")

    def _check_readable(self) -> None:
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        self._check_read_open()
        if self._conn._error is not None:
            raise ConnectionClosed(str(self._conn._error)) from self._conn._error

    # -- writing -----------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, waiting for window; don't modify ``data`` until this returns.

        Concurrent writes on one stream are serialized: each call's bytes stay contiguous.
        """
        view = data if type(data) is bytes else _byte_view(data)
        total = len(view)
        conn = self._conn
        sent = 0
        lock = self._write_lock
        if (
            (lock is None or not lock.locked())
            and total <= conn._core.send_window(self.stream_id)
            and total <= conn._limits.max_frame_bytes
        ):
            self._check_writable()  # all of it goes now, in one frame: no turn to take
            sent = conn._send(self.stream_id, view)
            if not conn._write_paused:
                return
        async with self._write_turn():
            while True:
                self._check_writable()
                if sent >= total:
                    if conn._write_paused:
                        await conn._drain()
                        self._check_writable()
                    return
                n = conn._send(self.stream_id, memoryview(view)[sent:] if sent else view)
                if n:
                    sent += n
                    if conn._write_paused:
                        await conn._drain()
                else:
                    await self._wait_for_window()

    def _write_turn(self) -> asyncio.Lock:
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        return self._write_lock

    async def _wait_for_window(self) -> None:
        """Sleep until the peer grants window or an error arrives (the write lock is held)."""
        conn = self._conn
        if conn._core.has_output:
            conn._flush()
        waiter = conn._loop.create_future()
        self._write_waiter = waiter
        try:
            await waiter
        finally:
            self._write_waiter = None

    def _check_writable(self) -> None:
        if self._reset_reason is not None:
            raise StreamReset(self._reset_reason)
        if self._write_closed:
            raise StreamClosed(f"yamux stream {self.stream_id} was closed for writing")
        if self._conn._error is not None:
            raise ConnectionClosed(str(self._conn._error)) from self._conn._error

    async def close_write(self) -> None:
        if self._write_closed or self._reset_reason is not None or self._conn._error is not None:
            self._write_closed = True
            return
        self._write_closed = True
        self._conn._close_write(self.stream_id, peer_done=self._eof)
        if self._eof:
            self._conn._forget(self.stream_id)
        _wake(self._write_waiter)

    async def close(self) -> None:
        """Half-close, drop unread data and discard what still arrives until the peer's FIN."""
        await self.close_write()
        if self._read_closed:
            return
        self._read_closed = True
        while self._chunks:
            self._take(self._buffered)
        _wake(self._read_waiter)

    def reset(self) -> None:
        if self._reset_reason is not None or self._conn._error is not None:
            return
        if self._write_closed and self._eof:
            return
        self._reset_reason = f"yamux stream {self.stream_id} was reset locally"
        self._conn._reset(self.stream_id)
        self._drop_buffer()
        self._wake_all()

    # -- events from the connection ----------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._read_closed:
            self._take(len(data))
        elif (waiter := self._read_waiter) is not None and not waiter.done():
            waiter.set_result(None)

    def _on_eof(self) -> None:
        self._eof = True
        _wake(self._read_waiter)

    def _on_reset(self) -> None:
        self._reset_reason = f"yamux stream {self.stream_id} was reset by the peer"
        self._drop_buffer()
        self._wake_all()

    def _drop_buffer(self) -> None:
        self._chunks.clear()
        self._head = 0
        self._buffered = 0
        self._preconsumed = 0

    def _wake_all(self) -> None:
        _wake(self._read_waiter)
        _wake(self._write_waiter)


def _byte_view(data: bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.itemsize == 1 and view.ndim == 1 else view.cast("B")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _wait(waiters: list[asyncio.Future[None]]) -> None:
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    finally:
        if waiter in waiters:
            waiters.remove(waiter)


def _wake_each(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        _wake(waiter)
    waiters.clear()


class YamuxConnection(asyncio.BufferedProtocol):
    """A yamux session over an asyncio transport; implements ``transport.Connection``.

    ``received`` holds bytes the peer already sent that were read with the negotiation
    before this connection took the transport over.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        is_client: bool,
        local_peer: PeerId,
        remote_peer: PeerId,
        local_addr: Multiaddr,
        remote_addr: Multiaddr,
        limits: YamuxLimits | None = None,
        transport_name: str = "tcp",
        received: bytes = b"",
    ) -> None:
        self._transport = transport
        self._limits = limits if limits is not None else YamuxLimits()
        self._core = yamux.YamuxSession(is_client=is_client, limits=self._limits)
        self._local_peer = local_peer
        self._remote_peer = remote_peer
        self._local_addr = local_addr
        self._remote_addr = remote_addr
        self._transport_name = transport_name
        self._received = received
        self._loop = asyncio.get_running_loop()
        self._buffer = memoryview(
            bytearray(min(_FIRST_BUFFER_BYTES, self._limits.read_chunk_bytes))
        )
        self._streams: dict[int, YamuxStream] = {}
        self._accept_queue: deque[YamuxStream] = deque()
        self._accept_waiters: list[asyncio.Future[None]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._error: ConnectionClosed | None = None
        self._closed = asyncio.Event()
        self._transport_lost = asyncio.Event()
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_outstanding: int | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False

    # -- Connection properties ---------------------------------------------------------

    @property
    def transport_name(self) -> str:
        return self._transport_name

    @property
    def local_peer(self) -> PeerId:
        return self._local_peer

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
        return self._error is not None

    @property
    def rtt_s(self) -> float | None:
        """The latest round-trip time measured by a yamux ping."""
        return self._core.rtt_s

    def __repr__(self) -> str:
        return f"<YamuxConnection {self._transport_name} to {self._remote_peer}>"

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Take the transport over and start keep-alive; a first ping measures the RTT."""
        self._transport.set_protocol(self)
        if self._transport.is_closing():
            self._terminate(
                ConnectionClosed(f"connection to {self._remote_peer} was lost while set up"),
                end="abort",
            )
            self._transport_lost.set()
            return
        self._ping_outstanding = self._core.ping(self._loop.time())
        received, self._received = self._received, b""
        if received:
            self._feed(received)
        self._flush()
        if self._error is None:
            self._keepalive = self._loop.call_later(self._limits.keepalive_s, self._on_keepalive)

    async def close(self) -> None:
        """Send GoAway, fail pending operations, and shut the transport down gracefully.

        Our side is half-closed first and the peer's remaining bytes are read until its
        end of stream (TLS does the same with close_notify), so that closing never
        resets the TCP connection under data still in flight; the whole shutdown is
        bounded by ``YamuxLimits.close_timeout_s``.
        """
        if self._error is None:
            self._core.go_away()
            self._flush()
            self._terminate(
                ConnectionClosed(f"connection to {self._remote_peer} closed locally"),
                end="linger",
            )
        try:
            async with asyncio.timeout(self._limits.close_timeout_s):
                await self._transport_lost.wait()
        except TimeoutError:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _terminate(
        self, error: ConnectionClosed, *, end: Literal["linger", "close", "abort", "lost"]
    ) -> None:
        """End the connection once: fail every pending operation, end the transport.

        ``linger`` half-closes and keeps reading (and discarding) until the peer's EOF,
        ``close`` closes after flushing, ``abort`` drops the transport at once, ``lost``
        leaves a transport that is gone already.
        """
        if self._error is not None:
            return
        self._error = error
        for stream in self._streams.values():
            stream._wake_all()
        self._streams.clear()
        self._accept_queue.clear()
        _wake_each(self._accept_waiters)
        _wake_each(self._drain_waiters)
        transport = self._transport
        if end == "abort":
            transport.abort()
        elif end == "linger" and transport.can_write_eof():
            transport.write_eof()
        elif end != "lost":
            transport.close()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._closed.set()

    # -- asyncio.BufferedProtocol ------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._error is not None:
            return  # lingering after close(): the peer's last bytes are dropped
        buffer = self._buffer
        self._feed(buffer[:nbytes])
        if self._core.has_output:
            self._flush()  # answers to pings, refusals, a GoAway
        size = len(buffer)
        if nbytes == size and size < self._limits.read_chunk_bytes:
            self._buffer = memoryview(bytearray(min(2 * size, self._limits.read_chunk_bytes)))

    def eof_received(self) -> None:
        self._terminate(
            ConnectionClosed(f"connection closed by peer {self._remote_peer}"), end="close"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self._remote_peer
        if exc is None:
            error = ConnectionClosed(f"connection closed by peer {peer}")
        else:
            error = ConnectionClosed(f"connection to {peer} lost: {exc}")
        self._terminate(error, end="lost")
        self._transport_lost.set()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake_each(self._drain_waiters)

    # -- streams -----------------------------------------------------------------------

    async def open_stream(self) -> YamuxStream:
        self._check_open()
        stream_id = self._core.open_stream()
        stream = YamuxStream(self, stream_id)
        self._streams[stream_id] = stream
        self._flush_soon()
        return stream

    async def accept_stream(self) -> YamuxStream:
        while not self._accept_queue:
            self._check_open()
            await _wait(self._accept_waiters)
        stream = self._accept_queue.popleft()
        self._core.accept(stream.stream_id)  # the ACK leaves with the stream's first frames
        return stream

    def _check_open(self) -> None:
        if self._error is not None:
            raise ConnectionClosed(str(self._error)) from self._error

    def _send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue a data frame: written at once if it is all there is to write (or holds a
        view of the caller's buffer), else with the frames queued before it."""
        core = self._core
        alone = not core.has_output
        n = core.send(stream_id, data)
        if alone or n > yamux.INLINE_PAYLOAD_BYTES:
            self._flush()
        elif n:
            self._flush_soon()
        return n

    def _close_write(self, stream_id: int, *, peer_done: bool) -> None:
        """Queue a FIN. While the peer may wait for it, it leaves at once, with what was
        queued before (a reply and its FIN go together); a FIN that merely completes a
        stream both sides are done with waits for company."""
        self._core.close_write(stream_id)
        if peer_done:
            self._flush_soon()
        else:
            self._flush()

    def _reset(self, stream_id: int) -> None:
        self._core.reset(stream_id)
        self._streams.pop(stream_id, None)
        self._flush_soon()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def _flush_soon(self) -> None:
        """Write the output before the next wait on a stream or at the next loop iteration."""
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        handle = self._flush_handle
        if handle is not None:
            self._flush_handle = None
            handle.cancel()
        out = self._core.pop_output()
        if out and self._error is None:
            self._transport.writelines(out)

    async def _drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        while self._write_paused and self._error is None:
            await _wait(self._drain_waiters)

    # -- input -------------------------------------------------------------------------

    def _feed(self, data: bytes | memoryview) -> None:
        core = self._core
        core.feed(data, self._loop.time())
        streams = self._streams
        for event in core.pop_events():
            kind = type(event)
            if kind is yamux.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data)
            elif kind is yamux.WindowUpdated:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    _wake(stream._write_waiter)
            elif kind is yamux.StreamOpened:
                stream = YamuxStream(self, event.stream_id)
                streams[event.stream_id] = stream
                self._accept_queue.append(stream)
                _wake_each(self._accept_waiters)
            elif kind is yamux.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_eof()
                    if stream._write_closed:
                        del streams[event.stream_id]
            elif kind is yamux.StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_reset()
            elif kind is yamux.PingAnswered:
                if event.opaque == self._ping_outstanding:
                    self._ping_outstanding = None
            elif kind is yamux.GoAwayReceived:
                if event.code != yamux.GO_AWAY_NORMAL:
                    self._terminate(
                        ConnectionClosed(
                            f"peer {self._remote_peer} went away with yamux error {event.code}"
                        ),
                        end="close",
                    )
                    return
            elif kind is yamux.ProtocolViolation:
                self._flush()
                error = ConnectionClosed(
                    f"closed the connection to {self._remote_peer}: {event.error}"
                )
                error.__cause__ = event.error
                self._terminate(error, end="close")
                return

    def _on_keepalive(self) -> None:
        if self._ping_outstanding is not None:
            self._terminate(
                ConnectionClosed(
                    f"peer {self._remote_peer} answered no ping for {self._limits.keepalive_s} s "
                    "(YamuxLimits.keepalive_s)"
                ),
                end="abort",
            )
            return
        self._ping_outstanding = self._core.ping(self._loop.time())
        self._flush()
        self._keepalive = self._loop.call_later(self._limits.keepalive_s, self._on_keepalive)
