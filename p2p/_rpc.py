"""RPC over streams, the asyncio shell around ``_frames``: values, contexts, ``RpcStream``.

Unary calls to one peer and protocol share one stream, negotiated lazily with the
first request; each frame names its call by id ("i"), so a unary call is one frame each
way (``_rpc_client``, ``_rpc_server``)::

    caller -> [multistream header, proposal] [request frame, "i", "d" = seconds left] [payload]
    server <- [multistream header, echo]     [reply or error frame, "i"]              [payload]

A caller that gives up sends a cancel frame ("c", "i"). A request with a large payload
takes a stream of its own, without call id, as a streaming call does.

A streaming call opens with an ``"o"`` frame carrying the deadline, then both sides
send message frames until each closes its side; an error frame ends it. Payloads
travel as memoryviews on send and arrive as memoryviews over the received bytes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from security import PeerId
from transport._base import Stream
from transport._errors import StreamReset, TransportError
from transport._limits import KIB, MultistreamLimits

from ._errors import (
    P2PError,
    PeerProtocolError,
    RemoteError,
    RpcCancelled,
    RpcCode,
    RpcError,
    RpcTimeout,
    from_transport,
)
from ._frames import (
    ErrorFrame,
    FrameDecoder,
    FrameEvent,
    FrameRejected,
    MessageFrame,
    encode_message,
)
from ._negotiate import confirm_lazy

COALESCE_BYTES = 64 * KIB
"""Payloads up to this size ride in the header's write (one transport write per frame)."""

Payload = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class RpcReply:
    """A message of a call: a msgpack ``value`` and an optional raw ``payload``.

    Received payloads are memoryviews over the received bytes (``bytes(payload)``
    copies); handlers return an ``RpcReply`` to send a payload with their answer.
    """

    value: Any = None
    payload: Payload | None = None


@dataclass(frozen=True, slots=True)
class RpcContext:
    """What a handler knows about the call it serves."""

    peer: PeerId
    deadline: float | None
    """The caller's deadline on this event loop's clock (``loop.time()``), if it set one."""
    protocol: str


UnaryHandler = Callable[[RpcContext, Any, memoryview | None], Awaitable[Any]]
"""``async def handler(ctx, request, payload) -> value | RpcReply``."""


def byte_view(payload: Payload) -> memoryview:
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


async def write_frame(stream: Stream, head: bytes, view: memoryview | None) -> None:
    if view is None:
        await stream.write(head)
    elif len(view) <= COALESCE_BYTES:
        await stream.write(head + view)
    else:
        await stream.write(head)
        await stream.write(view)


def call_failure(exc: TransportError, peer: PeerId, protocol: str) -> P2PError:
    """The p2p error a transport failure during a call means."""
    if isinstance(exc, StreamReset):
        return RpcCancelled(f"{peer} reset the {protocol} call")
    return from_transport(exc, f"{protocol} call to {peer}")


def remote_error(event: ErrorFrame, peer: PeerId) -> RpcError:
    if event.code == RpcCode.DEADLINE_EXCEEDED:
        return RpcTimeout(f"{peer}: {event.message}")
    return RemoteError(event.code, event.message, peer=peer)


class Incoming:
    """Frames of a call we dialed: the listener's answer is checked first."""

    __slots__ = ("_decoder", "_events", "_negotiation", "_prefix", "_protocol", "_stream")

    def __init__(
        self,
        stream: Stream,
        prefix: bytes,
        protocol: str,
        negotiation: MultistreamLimits,
        max_frame_bytes: int,
    ) -> None:
        self._stream = stream
        self._prefix: bytes | None = prefix
        self._protocol = protocol
        self._negotiation = negotiation
        self._decoder = FrameDecoder(max_frame_bytes)
        self._events: deque[FrameEvent] = deque()

    async def next(self) -> FrameEvent | None:
        """The next event; None at end of stream."""
        while not self._events:
            if self._prefix is not None:
                chunk: bytes | memoryview = await confirm_lazy(
                    self._stream, self._prefix, self._protocol, self._negotiation
                )
                self._prefix = None
                if not chunk:
                    continue
            else:
                chunk = await self._stream.read()
                if not chunk:
                    return None
            self._events.extend(self._decoder.feed(chunk))
        return self._events.popleft()


class Queued:
    """Frames of a call we serve, read ahead by the server's watch into a bounded queue."""

    __slots__ = ("queue",)

    def __init__(self, queue: asyncio.Queue[MessageFrame | None]) -> None:
        self.queue = queue

    async def next(self) -> FrameEvent | None:
        return await self.queue.get()


class RpcStream:
    """One streaming call, on either side: ``send``, ``recv``, ``close``, ``cancel``.

    ``recv`` returns ``None`` once the other side closed its sending side. ``close``
    ends our side (``recv`` keeps working); leaving ``async with`` normally closes and
    releases the stream, leaving it with an exception cancels the call, which cancels
    the remote handler too. One task may send while another receives.
    """

    def __init__(
        self,
        stream: Stream,
        peer: PeerId,
        protocol: str,
        max_frame_bytes: int,
        incoming: Incoming | Queued,
        *,
        answer: bytes = b"",
        on_release: Callable[[], None] | None = None,
        deadline: float | None = None,
    ) -> None:
        self._stream = stream
        self.peer = peer
        self.protocol = protocol
        self._max_frame_bytes = max_frame_bytes
        self._incoming = incoming
        self._answer = answer
        self._on_release = on_release
        self._timer = (
            None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._expire)
        )
        """Resets the call at its deadline (calls we make; the server has its own watch)."""
        self._timed_out = False
        self._sent_all = False
        self._received_all = False

    def __repr__(self) -> str:
        return f"<RpcStream {self.protocol} with {self.peer.short()}>"

    def _expire(self) -> None:
        self._timed_out = True
        self.cancel()

    def _failure(self, exc: TransportError) -> P2PError:
        if self._timed_out:
            return RpcTimeout(f"the {self.protocol} call to {self.peer} passed its deadline")
        return call_failure(exc, self.peer, self.protocol)

    async def send(self, value: Any, payload: Payload | None = None) -> None:
        """Send one message; raises ``LimitExceeded`` for a frame over the limit."""
        view = None if payload is None else byte_view(payload)
        head = encode_message(
            value,
            None if view is None else len(view),
            deadline_s=None,
            max_frame_bytes=self._max_frame_bytes,
        )
        if self._answer:
            head, self._answer = self._answer + head, b""
        try:
            await write_frame(self._stream, head, view)
        except TransportError as exc:
            self._finish()
            raise self._failure(exc) from exc

    async def recv(self) -> RpcReply | None:
        """The next message, or None once the other side has finished sending."""
        if self._received_all:
            return None
        try:
            event = await self._incoming.next()
        except TransportError as exc:
            self._finish()
            raise self._failure(exc) from exc
        except P2PError:
            self.cancel()
            raise
        if isinstance(event, MessageFrame):
            return RpcReply(event.value, event.payload)
        self._received_all = True
        if event is None:
            if self._sent_all:
                self._release()
            return None
        if isinstance(event, ErrorFrame):
            self._release()
            raise remote_error(event, self.peer)
        self.cancel()
        if isinstance(event, FrameRejected):
            raise PeerProtocolError(event.describe(self.peer))
        raise PeerProtocolError(f"{self.peer} sent an unexpected frame in a {self.protocol} call")

    async def close(self) -> None:
        """Finish our side: the other side's ``recv`` returns None after our last message."""
        if self._sent_all:
            return
        self._sent_all = True
        try:
            if self._answer:
                await self._stream.write(self._answer)
                self._answer = b""
            await self._stream.close_write()
        except TransportError as exc:
            self._finish()
            raise self._failure(exc) from exc
        if self._received_all:
            self._release()

    def _take_answer(self) -> bytes:
        """The negotiation answer a served call has not sent yet (for the server's last write)."""
        answer, self._answer = self._answer, b""
        return answer

    def cancel(self) -> None:
        """Abort the call both ways; the remote handler is cancelled."""
        self._stream.reset()
        self._finish()

    def _finish(self) -> None:
        """The call is over both ways (ended, failed or cancelled)."""
        self._sent_all = self._received_all = True
        self._release()

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()

    async def aclose(self) -> None:
        """Close our side and release the stream; what the other side still sends is dropped."""
        try:
            await self.close()
        finally:
            await self._stream.close()
            self._release()

    async def __aenter__(self) -> RpcStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            self.cancel()


StreamHandler = Callable[[RpcContext, RpcStream], Awaitable[None]]
"""``async def handler(ctx, call)``: serves one streaming call."""
