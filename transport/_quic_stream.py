"""One bidirectional QUIC stream, as the ``Stream`` contract of :mod:`transport._base` wants it.

Reads come from a buffer that :class:`~transport._quic_conn.QuicConnection` fills from
aioquic's ``StreamDataReceived`` events, and return whatever has arrived. Read-side flow
control is aioquic's: it grants the peer more window as data arrives, not as it is read,
so a stream nobody reads buffers what the peer sends. Writes hand data to aioquic in
slices, waiting while the stream holds ``QuicLimits.stream_send_buffer_bytes``
unacknowledged (they resume at half of it), so a 64 MiB write never sits in aioquic whole.

``close_write`` sends FIN; ``close`` also sends STOP_SENDING unless the peer already
finished; ``reset`` sends RESET_STREAM and STOP_SENDING. A remote reset discards what was
buffered; a closed connection lets the reader drain what had arrived (and a received end
of stream) before raising ``ConnectionClosed``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._errors import ConnectionClosed, StreamClosed, StreamReset, TransportError

if TYPE_CHECKING:
    from ._quic_conn import QuicConnection


class Signal:
    """Wakes whoever waits for a state change; waiters re-check the state themselves."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def _again(exc: TransportError) -> TransportError:
    """A fresh copy of a stored stream error, so each raise has its own traceback."""
    return type(exc)(*exc.args)


class QuicStream:
    """One bidirectional QUIC stream."""

    def __init__(self, conn: QuicConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._buffer = bytearray()
        self._eof = False
        self._read_error: TransportError | None = None
        self._write_error: TransportError | None = None
        self._write_closed = False
        self._readable = Signal()
        self._writable = Signal()

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} of {self._conn!r}>"

    @property
    def connection(self) -> QuicConnection:
        return self._conn

    # reading

    async def read(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        while not self._buffer:
            if self._read_error is not None:
                raise _again(self._read_error)
            if self._eof:
                return b""
            self._conn.check_open()
            await self._readable.wait()
        return self._take(min(max_bytes, len(self._buffer)))

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._read_error is not None:
                raise _again(self._read_error)
            if self._eof:
                raise StreamClosed(
                    f"stream {self.stream_id} ended after {len(self._buffer)} of {n} bytes"
                )
            self._conn.check_open()
            await self._readable.wait()
        return self._take(n)

    def _take(self, n: int) -> bytes:
        if n == len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        with memoryview(self._buffer) as view:
            data = bytes(view[:n])
        del self._buffer[:n]
        return data

    # writing

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        while True:
            self._check_writable()
            if sent >= len(view):
                return
            room = self._conn.send_room(self.stream_id)
            if room <= 0:
                self._conn.blocked_writers.add(self)
                await self._writable.wait()
                continue
            chunk = view[sent : sent + room]
            self._conn.send(self.stream_id, chunk)
            sent += len(chunk)

    def _check_writable(self) -> None:
        if self._write_error is not None:
            raise _again(self._write_error)
        if self._write_closed:
            raise StreamClosed(f"stream {self.stream_id}: write after close_write()")
        self._conn.check_open()

    async def close_write(self) -> None:
        if self._write_closed or self._write_error is not None:
            return
        self._write_closed = True
        if not self._conn.is_closed:
            self._conn.send(self.stream_id, b"", end_stream=True)
        self._conn.release_if_done(self)

    # closing

    async def close(self) -> None:
        # No STOP_SENDING here: a peer that is still writing its answer (py-libp2p's
        # identify does) would see its stream fail. Whatever arrives later is dropped.
        await self.close_write()
        self._fail_reads(StreamClosed(f"stream {self.stream_id} is closed"))

    def reset(self) -> None:
        if not self._conn.is_closed:
            if not self._write_closed and self._write_error is None:
                self._conn.reset_stream(self.stream_id)
            if not self._eof and self._read_error is None:
                self._conn.stop_sending(self.stream_id)
        error = StreamReset(f"stream {self.stream_id} was reset locally")
        self._fail_writes(error)
        self._fail_reads(error)

    # events from the connection

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if self._read_error is not None:
            if end_stream:
                self._eof = True
                self._conn.release_if_done(self)
            return
        self._buffer += data
        if end_stream:
            self._eof = True
            self._conn.release_if_done(self)
        self._readable.notify()

    def on_reset(self, error_code: int) -> None:
        self._fail_reads(
            StreamReset(f"stream {self.stream_id} was reset by the peer (code {error_code})")
        )

    def on_stop_sending(self, error_code: int) -> None:
        self._fail_writes(
            StreamReset(f"the peer stopped reading stream {self.stream_id} (code {error_code})")
        )

    def on_writable(self) -> None:
        self._writable.notify()

    def on_connection_closed(self, error: ConnectionClosed) -> None:
        if not self._write_closed and self._write_error is None:
            self._write_error = error
        self._writable.notify()
        self._readable.notify()

    def _fail_reads(self, error: TransportError) -> None:
        if self._read_error is None:
            self._read_error = error
            self._buffer.clear()
            self._readable.notify()
            self._conn.release_if_done(self)

    def _fail_writes(self, error: TransportError) -> None:
        if self._write_error is None and not self._write_closed:
            self._write_error = error
            self._writable.notify()
            self._conn.release_if_done(self)

    @property
    def is_done(self) -> bool:
        """Both directions finished: the connection need not route events to it any more."""
        read_done = self._eof or self._read_error is not None
        write_done = self._write_closed or self._write_error is not None
        return read_done and write_done
