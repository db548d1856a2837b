"""The stream the Host hands to application code: a transport stream, negotiated.

It serves first what the dialer sent right behind its protocol proposal (read while
negotiating) and tells the connection manager once it is closed or reset, so that a
connection with streams in use is never closed for idleness.
"""

from __future__ import annotations

from collections.abc import Callable

from transport._base import Connection, Stream


class HostStream:
    """A negotiated ``transport.Stream`` with its ``protocol``."""

    __slots__ = ("_leftover", "_on_done", "_stream", "protocol")

    def __init__(
        self,
        stream: Stream,
        protocol: str,
        *,
        leftover: bytes = b"",
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self.protocol = protocol
        self._leftover = leftover
        self._on_done = on_done

    def __repr__(self) -> str:
        return f"<HostStream {self.protocol} over {self._stream!r}>"

    @property
    def connection(self) -> Connection:
        return self._stream.connection

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._leftover:
            out, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
            return out
        return await self._stream.read(max_bytes)

    async def readexactly(self, n: int) -> bytes:
        if not self._leftover:
            return await self._stream.readexactly(n)
        head, self._leftover = self._leftover[:n], self._leftover[n:]
        if len(head) == n:
            return head
        return head + await self._stream.readexactly(n - len(head))

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.write(data)

    async def close_write(self) -> None:
        await self._stream.close_write()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            self._done()

    def reset(self) -> None:
        self._stream.reset()
        self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()
