"""A link delay for any transport: ``DelayTransport(inner, delay_s)``, for benchmarks and tests.

Every byte written on a stream of a connection the wrapper dials or accepts reaches the
inner stream ``delay_s`` after it was written, as if the link were that long one way:
``write`` copies the data, stamps it with its due time and returns at once, and one pump
task per stream hands it to the inner stream when it is due. Writes therefore keep their
order and never wait for one another's delay (a burst of writes arrives as a burst,
``delay_s`` later); half-closes and closes travel behind the data written before them.
Reads, handshakes and the multiplexer's own frames are not delayed. With the wrapper on
both ends, a round trip grows by twice ``delay_s``.

``link_delay_from_env`` wraps a Host's transports when ``SWARM_LINK_DELAY_MS`` is set,
so that a ``python -m swarm join`` process runs behind a slow link without a flag.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ._base import Connection, ConnectionHandler, Listener, Stream, Transport
from ._errors import StreamClosed, StreamReset, TransportError

if TYPE_CHECKING:
    from security import PeerId

    from ._multiaddr import Multiaddr

_log = logging.getLogger(__name__)

LINK_DELAY_ENV = "SWARM_LINK_DELAY_MS"
"""Environment variable: one-way delay in milliseconds added to every link of the process."""

MAX_PENDING_BYTES = 16 * 1024 * 1024
"""Bytes a stream may hold in flight inside the wrapper before ``write`` waits."""

_CLOSE_WRITE = object()
_CLOSE = object()


class DelayTransport:
    """``inner``, with ``delay_s`` added to every byte its connections' streams send."""

    def __init__(
        self, inner: Transport, delay_s: float, *, max_pending_bytes: int = MAX_PENDING_BYTES
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"a link delay cannot be negative, got {delay_s}")
        if max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes={max_pending_bytes} must be positive")
        self.inner = inner
        self.delay_s = delay_s
        self.max_pending_bytes = max_pending_bytes
        self._pumps: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<DelayTransport {self.inner.name} +{self.delay_s * 1000:g}ms>"

    @property
    def name(self) -> str:
        return self.inner.name

    def can_dial(self, addr: Multiaddr) -> bool:
        return self.inner.can_dial(addr)

    def can_listen(self, addr: Multiaddr) -> bool:
        return self.inner.can_listen(addr)

    async def listen(self, addr: Multiaddr, handler: ConnectionHandler) -> Listener:
        async def accepted(conn: Connection) -> None:
            await handler(DelayConnection(conn, self))

        return await self.inner.listen(addr, accepted)

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None = None, *, timeout: float | None = None
    ) -> Connection:
        conn = await self.inner.dial(addr, expected_peer, timeout=timeout)
        return DelayConnection(conn, self)

    async def close(self) -> None:
        pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await self.inner.close()

    def _spawn(self, stream: DelayStream) -> asyncio.Task[None]:
        pump = asyncio.get_running_loop().create_task(stream._pump())
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        return pump


class DelayConnection:
    """A connection whose streams deliver what is written ``delay_s`` late."""

    def __init__(self, inner: Connection, transport: DelayTransport) -> None:
        self.inner = inner
        self._transport = transport
        self._streams: set[DelayStream] = set()

    def __repr__(self) -> str:
        return f"<DelayConnection {self.inner!r}>"

    @property
    def transport_name(self) -> str:
        return self.inner.transport_name

    @property
    def local_peer(self) -> PeerId:
        return self.inner.local_peer

    @property
    def remote_peer(self) -> PeerId:
        return self.inner.remote_peer

    @property
    def local_addr(self) -> Multiaddr:
        return self.inner.local_addr

    @property
    def remote_addr(self) -> Multiaddr:
        return self.inner.remote_addr

    @property
    def is_closed(self) -> bool:
        return self.inner.is_closed

    async def open_stream(self) -> Stream:
        return self._wrap(await self.inner.open_stream())

    async def accept_stream(self) -> Stream:
        return self._wrap(await self.inner.accept_stream())

    def _wrap(self, stream: Stream) -> DelayStream:
        wrapped = DelayStream(stream, self, self._transport)
        self._streams.add(wrapped)
        return wrapped

    async def close(self) -> None:
        """Close once what the streams have in flight arrived (at most ``delay_s`` more)."""
        pumps = [s._pumping for s in self._streams if s._pumping is not None and s._pending]
        if pumps:
            await asyncio.wait(pumps, timeout=self._transport.delay_s + 0.1)
        await self.inner.close()

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()


class DelayStream:
    """One stream: reads pass through, writes reach the inner stream ``delay_s`` later."""

    def __init__(
        self, inner: Stream, connection: DelayConnection, transport: DelayTransport
    ) -> None:
        self.inner = inner
        self._connection = connection
        self._transport = transport
        self._pending: deque[tuple[float, object]] = deque()
        self._pending_bytes = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._pumping: asyncio.Task[None] | None = None
        self._error: TransportError | None = None
        self._write_closed = False

    def __repr__(self) -> str:
        return f"<DelayStream {self.inner!r}>"

    @property
    def connection(self) -> Connection:
        return self._connection

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.read(max_bytes)

    async def readexactly(self, n: int) -> bytes:
        return await self.inner.readexactly(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._write_closed:
            raise StreamClosed("write after close_write() or close() on this stream")
        chunk = bytes(data)
        if not chunk:
            return
        limit = self._transport.max_pending_bytes
        while self._pending_bytes and self._pending_bytes + len(chunk) > limit:
            self._room.clear()
            await self._room.wait()
            if self._error is not None:
                raise self._error
        self._pending_bytes += len(chunk)
        self._queue(chunk)

    async def close_write(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._write_closed:
            self._write_closed = True
            self._queue(_CLOSE_WRITE)

    async def close(self) -> None:
        self._write_closed = True
        self._queue(_CLOSE)

    def reset(self) -> None:
        self._error = self._error or StreamReset("stream was reset")
        self._pending.clear()
        if self._pumping is not None:
            self._pumping.cancel()
        self._connection._streams.discard(self)
        self.inner.reset()

    def _queue(self, item: object) -> None:
        due = asyncio.get_running_loop().time() + self._transport.delay_s
        self._pending.append((due, item))
        self._ready.set()
        if self._pumping is None:
            self._pumping = self._transport._spawn(self)

    async def _pump(self) -> None:
        """Hand each pending item to the inner stream at its due time, in order."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        try:
            while True:
                while not pending:
                    self._ready.clear()
                    await self._ready.wait()
                wait = pending[0][0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = loop.time()
                chunks: list[bytes] = []
                while pending and pending[0][0] <= now and isinstance(pending[0][1], bytes):
                    chunks.append(pending.popleft()[1])  # type: ignore[arg-type]
                if chunks:
                    data = b"".join(chunks)
                    await self.inner.write(data)
                    self._pending_bytes -= len(data)
                    self._room.set()
                    continue
                _, item = pending.popleft()
                if item is _CLOSE_WRITE:
                    await self.inner.close_write()
                elif item is _CLOSE:
                    await self.inner.close()
                    return
        except TransportError as e:
            self._error = e
            pending.clear()
            self._room.set()
            _log.debug("delayed delivery on %r failed: %s", self, e)
        finally:
            self._connection._streams.discard(self)


def link_delay_from_env(
    transports: Sequence[Transport], environ: Mapping[str, str] = os.environ
) -> list[Transport]:
    """``transports``, each wrapped in a ``DelayTransport`` when ``SWARM_LINK_DELAY_MS``
    is set to a positive number of milliseconds; unchanged otherwise."""
    text = environ.get(LINK_DELAY_ENV, "").strip()
    if not text:
        return list(transports)
    try:
        delay_ms = float(text)
    except ValueError:
        raise ValueError(
            f"{LINK_DELAY_ENV}={text!r} is not a number of milliseconds (e.g. 20)"
        ) from None
    if delay_ms < 0:
        raise ValueError(f"{LINK_DELAY_ENV}={text!r} must be at least 0")
    if delay_ms == 0:
        return list(transports)
    return [DelayTransport(t, delay_ms / 1000) for t in transports]
