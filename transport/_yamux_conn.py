"""The asyncio shell around ``YamuxSession``: a ``Connection`` over a byte stream pair.

The TCP transport builds ``YamuxConnection`` on the TLS stream it authenticated and
calls ``start()``. One task pumps the reader into the core and dispatches its events to
``YamuxStream`` buffers; writers wait for window on their own stream; a second task
pings every ``YamuxLimits.keepalive_s`` and drops the connection when a ping goes
unanswered for that long. Whatever ends the connection (``close()``, the peer's EOF, a
protocol violation, a dead peer) wakes every pending operation with ``ConnectionClosed``
or ``StreamReset``.

Data is never copied per byte here: a received chunk that is all payload is handed to
the stream as is, reads return whole chunks when they fit, and large writes go to the
transport at once as views of the caller's buffer, behind their 12-byte header. Small
frames (headers, window updates, short writes) are collected and written once per
event-loop iteration, so a request and its negotiation leave in one segment.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Literal

from . import _yamux as yamux
from ._errors import ConnectionClosed, StreamClosed, StreamReset
from ._limits import YamuxLimits

if TYPE_CHECKING:
    from security import PeerId

    from ._multiaddr import Multiaddr


class YamuxStream:
    """One yamux stream; implements ``transport.Stream``."""

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
        self._read_waiters: list[asyncio.Future[None]] = []
        self._write_waiters: list[asyncio.Future[None]] = []
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()

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
        async with self._read_lock:
            while not self._chunks:
                if self._eof and self._reset_reason is None:
                    self._check_read_open()
                    return b""
                self._check_readable()
                await _wait(self._read_waiters)
            return self._take(max_bytes)

    async def readexactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes; on an error or cancellation nothing is consumed.

        Window is granted while waiting, so ``n`` may exceed the stream's window.
        """
        if n <= 0:
            return b""
        async with self._read_lock:
            if self._chunks and n <= len(self._chunks[0]) - self._head:
                return self._take(n)
            return await self._gather(n)

    async def _gather(self, n: int) -> bytes:
        parts: list[bytes] = []
        need = n
        try:
            while need:
                while not self._chunks:
                    if self._eof and self._reset_reason is None:
                        self._check_read_open()
                        raise StreamClosed(
                            f"yamux stream {self.stream_id} ended after {n - need} of "
                            f"the {n} bytes expected"
                        )
                    self._check_readable()
                    await _wait(self._read_waiters)
                part = self._take(need)
                parts.append(part)
                need -= len(part)
        except BaseException:
            self._unread(parts)
            raise
        return parts[0] if len(parts) == 1 else b"".join(parts)

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
        credited = min(n, self._preconsumed)
        self._preconsumed -= credited
        if n > credited:
            self._conn._consumed(self.stream_id, n - credited)
        return out

    def _unread(self, parts: list[bytes]) -> None:
        """Put back what an interrupted ``readexactly`` took (its window is already granted)."""
        if not parts or self._reset_reason is not None or self._read_closed:
            return
        if self._head:
            self._chunks[0] = self._chunks[0][self._head :]
            self._head = 0
        data = b"".join(parts)
        self._chunks.appendleft(data)
        self._buffered += len(data)
        self._preconsumed += len(data)

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
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        sent = 0
        conn = self._conn
        async with self._write_lock:
            while True:
                self._check_writable()
                if sent >= total:
                    return
                n = conn._send(self.stream_id, view[sent:] if sent else view)
                if n:
                    sent += n
                    await conn._drain()
                else:
                    await _wait(self._write_waiters)

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
        self._conn._close_write(self.stream_id)
        if self._eof:
            self._conn._forget(self.stream_id)
        _wake(self._write_waiters)

    async def close(self) -> None:
        """Half-close, drop unread data and discard what still arrives until the peer's FIN."""
        await self.close_write()
        if self._read_closed:
            return
        self._read_closed = True
        while self._chunks:
            self._take(self._buffered)
        _wake(self._read_waiters)

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
        else:
            _wake(self._read_waiters)

    def _on_eof(self) -> None:
        self._eof = True
        _wake(self._read_waiters)

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
        _wake(self._read_waiters)
        _wake(self._write_waiters)


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


class YamuxConnection:
    """A yamux session over ``(reader, writer)``; implements ``transport.Connection``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        is_client: bool,
        local_peer: PeerId,
        remote_peer: PeerId,
        local_addr: Multiaddr,
        remote_addr: Multiaddr,
        limits: YamuxLimits | None = None,
        transport_name: str = "tcp",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._limits = limits if limits is not None else YamuxLimits()
        self._core = yamux.YamuxSession(is_client=is_client, limits=self._limits)
        self._local_peer = local_peer
        self._remote_peer = remote_peer
        self._local_addr = local_addr
        self._remote_addr = remote_addr
        self._transport_name = transport_name
        self._streams: dict[int, YamuxStream] = {}
        self._accept_queue: deque[YamuxStream] = deque()
        self._accept_waiters: list[asyncio.Future[None]] = []
        self._error: ConnectionClosed | None = None
        self._closed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._ping_outstanding: int | None = None
        self._flush_scheduled = False

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
        """Start reading and keep-alive; sends a first ping to measure the round trip."""
        loop = asyncio.get_running_loop()
        self._ping_outstanding = self._core.ping(loop.time())
        self._flush()
        self._reader_task = loop.create_task(
            self._read_loop(), name=f"yamux-read {self._remote_peer}"
        )
        self._keepalive_task = loop.create_task(
            self._keepalive(), name=f"yamux-keepalive {self._remote_peer}"
        )

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
        current = asyncio.current_task()
        tasks = [
            task
            for task in (self._reader_task, self._keepalive_task)
            if task is not None and task is not current
        ]
        try:
            async with asyncio.timeout(self._limits.close_timeout_s):
                if tasks:
                    await asyncio.wait(tasks)
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except OSError:
            pass
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _terminate(
        self, error: ConnectionClosed, *, end: Literal["linger", "close", "abort"]
    ) -> None:
        """End the connection once: fail every pending operation, end the transport.

        ``linger`` half-closes and lets the read loop drain the peer until its EOF,
        ``close`` closes after flushing, ``abort`` drops the transport at once.
        """
        if self._error is not None:
            return
        self._error = error
        for stream in self._streams.values():
            stream._wake_all()
        self._streams.clear()
        self._accept_queue.clear()
        _wake(self._accept_waiters)
        if end == "abort":
            self._writer.transport.abort()
        elif end == "linger" and self._writer.can_write_eof():
            self._writer.write_eof()
        else:
            self._writer.close()
        keepalive = self._keepalive_task
        if keepalive is not None and keepalive is not asyncio.current_task():
            keepalive.cancel()
        self._closed.set()

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
        self._core.accept(stream.stream_id)
        self._flush_soon()
        return stream

    def _check_open(self) -> None:
        if self._error is not None:
            raise ConnectionClosed(str(self._error)) from self._error

    def _send(self, stream_id: int, data: memoryview) -> int:
        n = self._core.send(stream_id, data)
        if n > yamux.INLINE_PAYLOAD_BYTES:
            self._flush()  # the output holds a view of the caller's buffer: write it now
        elif n:
            self._flush_soon()
        return n

    def _consumed(self, stream_id: int, n: int) -> None:
        if self._error is None:
            self._core.consume(stream_id, n, asyncio.get_running_loop().time())
            self._flush_soon()

    def _close_write(self, stream_id: int) -> None:
        self._core.close_write(stream_id)
        self._flush_soon()

    def _reset(self, stream_id: int) -> None:
        self._core.reset(stream_id)
        self._streams.pop(stream_id, None)
        self._flush_soon()

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def _flush_soon(self) -> None:
        """Write the output at the next loop iteration, batching small frames."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._core.pop_output()
        if out and self._error is None:
            self._writer.writelines(out)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            self._terminate(
                ConnectionClosed(f"connection to {self._remote_peer} lost: {exc}"), end="abort"
            )
            raise ConnectionClosed(str(self._error)) from exc

    # -- tasks -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reader = self._reader
        core = self._core
        loop = asyncio.get_running_loop()
        chunk_bytes = self._limits.read_chunk_bytes
        try:
            while data := await reader.read(chunk_bytes):
                if self._error is None:
                    core.feed(data, loop.time())
                    self._dispatch(core.pop_events())
                    self._flush()
        except OSError as exc:
            self._terminate(
                ConnectionClosed(f"connection to {self._remote_peer} lost: {exc}"), end="abort"
            )
        except Exception as exc:
            self._terminate(
                ConnectionClosed(f"yamux reader for {self._remote_peer} failed: {exc!r}"),
                end="abort",
            )
            raise
        else:
            self._terminate(
                ConnectionClosed(f"connection closed by peer {self._remote_peer}"), end="close"
            )
            self._writer.close()

    def _dispatch(self, events: list[yamux.Event]) -> None:
        streams = self._streams
        for event in events:
            kind = type(event)
            if kind is yamux.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data)
            elif kind is yamux.WindowUpdated:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    _wake(stream._write_waiters)
            elif kind is yamux.StreamOpened:
                stream = YamuxStream(self, event.stream_id)
                streams[event.stream_id] = stream
                self._accept_queue.append(stream)
                _wake(self._accept_waiters)
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

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._limits.keepalive_s
        while True:
            await asyncio.sleep(interval)
            if self._ping_outstanding is not None:
                self._terminate(
                    ConnectionClosed(
                        f"peer {self._remote_peer} answered no ping for {interval} s "
                        "(YamuxLimits.keepalive_s)"
                    ),
                    end="abort",
                )
                return
            self._ping_outstanding = self._core.ping(loop.time())
            self._flush()
