"""Unary and streaming RPC over streams: the asyncio shell around ``_frames``.

Every call gets its own stream and negotiates its protocol lazily, so a unary call is
one flight each way::

    caller -> [multistream header, proposal] [request frame, "d" = seconds left] [payload]
    server <- [multistream header, echo]     [reply or error frame]              [payload]

A streaming call opens with an ``"o"`` frame carrying the deadline, then both sides
send message frames until each closes its side; an error frame ends it. While a
handler runs, the server keeps reading the call's stream: a reset (the caller
cancelled or timed out), a lost connection or a bad frame cancels the handler's task,
and a bad frame is answered with an error frame before the stream closes. Payloads
travel as memoryviews on send and arrive as memoryviews over the received bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from security import PeerId
from transport._base import Stream
from transport._errors import StreamReset, TransportError
from transport._limits import KIB, MultistreamLimits

from ._connmgr import ConnectionRecord
from ._errors import (
    ConnectionLost,
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
    CallOpened,
    ErrorFrame,
    FrameDecoder,
    FrameEvent,
    FrameRejected,
    MessageFrame,
    encode_error,
    encode_message,
    encode_open,
)
from ._limits import RpcLimits
from ._negotiate import Inbound, confirm_lazy, lazy_prefix

_log = logging.getLogger("p2p.rpc")

_COALESCE_BYTES = 64 * KIB
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


def _byte_view(payload: Payload) -> memoryview:
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


async def _write_frame(stream: Stream, head: bytes, view: memoryview | None) -> None:
    if view is None:
        await stream.write(head)
    elif len(view) <= _COALESCE_BYTES:
        await stream.write(head + view)
    else:
        await stream.write(head)
        await stream.write(view)


def _failure(exc: TransportError, peer: PeerId, protocol: str) -> P2PError:
    """The p2p error a transport failure during a call means."""
    if isinstance(exc, StreamReset):
        return RpcCancelled(f"{peer} reset the {protocol} call")
    return from_transport(exc, f"{protocol} call to {peer}")


def _remote_error(event: ErrorFrame, peer: PeerId) -> RpcError:
    if event.code == RpcCode.DEADLINE_EXCEEDED:
        return RpcTimeout(f"{peer}: {event.message}")
    return RemoteError(event.code, event.message, peer=peer)


class _Incoming:
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


class _Queued:
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
        incoming: _Incoming | _Queued,
        *,
        answer: bytes = b"",
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self.peer = peer
        self.protocol = protocol
        self._max_frame_bytes = max_frame_bytes
        self._incoming = incoming
        self._answer = answer
        self._on_release = on_release
        self._timer: asyncio.TimerHandle | None = None
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
        return _failure(exc, self.peer, self.protocol)

    async def send(self, value: Any, payload: Payload | None = None) -> None:
        """Send one message; raises ``LimitExceeded`` for a frame over the limit."""
        view = None if payload is None else _byte_view(payload)
        head = encode_message(
            value,
            None if view is None else len(view),
            deadline_s=None,
            max_frame_bytes=self._max_frame_bytes,
        )
        if self._answer:
            head, self._answer = self._answer + head, b""
        try:
            await _write_frame(self._stream, head, view)
        except TransportError as exc:
            raise self._failure(exc) from exc

    async def recv(self) -> RpcReply | None:
        """The next message, or None once the other side has finished sending."""
        if self._received_all:
            return None
        try:
            event = await self._incoming.next()
        except TransportError as exc:
            self._release()
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
            raise _remote_error(event, self.peer)
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
            self._release()
            raise self._failure(exc) from exc
        if self._received_all:
            self._release()

    def cancel(self) -> None:
        """Abort the call both ways; the remote handler is cancelled."""
        self._sent_all = self._received_all = True
        self._stream.reset()
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


class RpcClient:
    """Makes calls: per-protocol negotiation prefixes and per-peer call slots."""

    def __init__(self, limits: RpcLimits, negotiation: MultistreamLimits) -> None:
        self._limits = limits
        self._negotiation = negotiation
        self._prefixes: dict[str, bytes] = {}
        self._slots: dict[PeerId, asyncio.Semaphore] = {}

    def _prefix(self, protocol: str) -> bytes:
        prefix = self._prefixes.get(protocol)
        if prefix is None:
            prefix = self._prefixes[protocol] = lazy_prefix(protocol, self._negotiation)
        return prefix

    def _slot(self, peer: PeerId) -> asyncio.Semaphore:
        slot = self._slots.get(peer)
        if slot is None:
            slot = self._slots[peer] = asyncio.Semaphore(self._limits.max_concurrent_calls_per_peer)
        return slot

    def forget(self, peer: PeerId) -> None:
        """Drop ``peer``'s call slots once it has no connection left (and no call waits)."""
        slot = self._slots.get(peer)
        if slot is not None and not slot.locked():
            del self._slots[peer]

    async def _open(self, record: ConnectionRecord, protocol: str) -> Stream:
        try:
            stream = await record.conn.open_stream()
        except TransportError as exc:
            raise _failure(exc, record.peer, protocol) from exc
        record.stream_opened()
        return stream

    async def call(
        self,
        record: ConnectionRecord,
        protocol: str,
        request: Any,
        payload: Payload | None,
        deadline: float,
    ) -> RpcReply:
        """One unary call on ``record``'s connection; the caller bounds it by ``deadline``."""
        loop = asyncio.get_running_loop()
        view = None if payload is None else _byte_view(payload)
        head = encode_message(
            request,
            None if view is None else len(view),
            deadline_s=deadline - loop.time(),
            max_frame_bytes=self._limits.max_frame_bytes,
        )
        prefix = self._prefix(protocol)
        peer = record.peer
        async with self._slot(peer):
            stream = await self._open(record, protocol)
            try:
                await _write_frame(stream, prefix + head, view)
                data = await confirm_lazy(stream, prefix, protocol, self._negotiation)
                decoder = FrameDecoder(self._limits.max_frame_bytes)
                events = decoder.feed(data) if data else []
                while not events:
                    chunk = await stream.read()
                    if not chunk:
                        break
                    events = decoder.feed(chunk)
            except BaseException as exc:
                stream.reset()
                if isinstance(exc, TransportError):
                    raise _failure(exc, peer, protocol) from exc
                raise
            finally:
                record.stream_closed(loop.time())
            await stream.close()
        event = events[0] if events else None
        if isinstance(event, MessageFrame):
            return RpcReply(event.value, event.payload)
        if isinstance(event, ErrorFrame):
            raise _remote_error(event, peer)
        if isinstance(event, FrameRejected):
            raise PeerProtocolError(event.describe(peer))
        if event is None:
            raise PeerProtocolError(f"{peer} closed the {protocol} call without answering")
        raise PeerProtocolError(f"{peer} answered the {protocol} call with an open frame")

    async def open(
        self, record: ConnectionRecord, protocol: str, deadline: float | None
    ) -> RpcStream:
        """Open a streaming call; the stream is reset at ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        slot = self._slot(record.peer)
        await slot.acquire()
        try:
            stream = await self._open(record, protocol)
        except BaseException:
            slot.release()
            raise

        def release() -> None:
            slot.release()
            record.stream_closed(loop.time())

        prefix = self._prefix(protocol)
        call = RpcStream(
            stream,
            record.peer,
            protocol,
            self._limits.max_frame_bytes,
            _Incoming(stream, prefix, protocol, self._negotiation, self._limits.max_frame_bytes),
            on_release=release,
        )
        if deadline is not None:
            call._timer = loop.call_at(deadline, call._expire)
        try:
            left = None if deadline is None else deadline - loop.time()
            await stream.write(prefix + encode_open(left))
        except BaseException as exc:
            call.cancel()
            if isinstance(exc, TransportError):
                raise _failure(exc, record.peer, protocol) from exc
            raise
        return call


StreamHandler = Callable[[RpcContext, RpcStream], Awaitable[None]]
"""``async def handler(ctx, call)``: serves one streaming call."""


class _Watch:
    """Reads a served call's input while its handler runs; trips the handler on trouble.

    Tripping cancels the handler's task: on a reset or lost connection, at the call's
    deadline (``expired``), or on input breaking the protocol (``violation`` says how).
    """

    __slots__ = (
        "deadline",
        "decoder",
        "expired",
        "initial",
        "peer",
        "queue",
        "reader",
        "stream",
        "task",
        "timer",
        "tripped",
        "violation",
    )

    def __init__(
        self,
        stream: Stream,
        decoder: FrameDecoder,
        initial: list[FrameEvent],
        queue: asyncio.Queue[MessageFrame | None] | None,
        peer: PeerId,
        task: asyncio.Task[Any],
        deadline: float | None,
    ) -> None:
        self.stream = stream
        self.decoder = decoder
        self.initial = initial
        self.queue = queue
        self.peer = peer
        self.task = task
        self.deadline = deadline
        self.reader: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tripped = False
        self.expired = False
        self.violation: str | None = None

    def start(self) -> None:
        """Start reading and arm the deadline; a handler that never suspends skips both."""
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self.run())
        if self.deadline is not None:
            self.timer = loop.call_at(self.deadline, self.expire)

    def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.timer is not None:
            self.timer.cancel()

    async def run(self) -> None:
        events = self.initial
        try:
            while True:
                for event in events:
                    if self.queue is not None and isinstance(event, MessageFrame):
                        await self.queue.put(event)
                    else:
                        self._trip(event)
                        return
                chunk = await self.stream.read()
                if not chunk:
                    if self.queue is not None:
                        await self.queue.put(None)
                    return
                events = self.decoder.feed(chunk)
        except TransportError:
            self._trip(None)

    def expire(self) -> None:
        self.expired = True
        self._trip(None)

    def _trip(self, event: FrameEvent | None) -> None:
        if self.tripped:
            return
        if isinstance(event, FrameRejected):
            self.violation = event.describe(self.peer)
        elif isinstance(event, MessageFrame | CallOpened):
            kind = "unary" if self.queue is None else "streaming"
            self.violation = f"unexpected frame from {self.peer} in a {kind} call"
        self.tripped = True
        self.task.cancel()


async def _send_error(stream: Stream, answer: bytes, code: str, message: str) -> None:
    try:
        await stream.write(answer + encode_error(code, message))
        await stream.close()
    except TransportError:
        stream.reset()


class RpcServer:
    """Serves calls: per-peer admission, deadlines, cancellation, error frames."""

    def __init__(self, limits: RpcLimits) -> None:
        self._limits = limits
        self._active: dict[PeerId, int] = {}

    async def serve(
        self,
        handler: UnaryHandler | StreamHandler,
        streaming: bool,
        stream: Stream,
        record: ConnectionRecord,
        inbound: Inbound,
    ) -> None:
        """Serve one call on ``stream`` (negotiated already); never raises for the peer's input."""
        peer = record.peer
        active = self._active.get(peer, 0)
        limit = self._limits.max_concurrent_calls_per_peer
        if active >= limit:
            await _send_error(
                stream,
                inbound.answer,
                RpcCode.OVERLOADED,
                f"{active} calls from {peer} in flight reach "
                f"RpcLimits.max_concurrent_calls_per_peer={limit}",
            )
            return
        self._active[peer] = active + 1
        try:
            await self._serve(stream, peer, inbound, handler, streaming)
        except TransportError as exc:
            _log.debug("%s call from %s ended: %r", inbound.protocol, peer, exc)
            stream.reset()
        finally:
            left = self._active[peer] - 1
            if left:
                self._active[peer] = left
            else:
                del self._active[peer]

    async def _read_request(self, stream: Stream, decoder: FrameDecoder) -> list[FrameEvent]:
        """The call's first frame(s) when the negotiation did not bring them along."""
        events: list[FrameEvent] = []
        async with asyncio.timeout(self._limits.request_read_timeout_s):
            while not events:
                chunk = await stream.read()
                if not chunk:
                    return []
                events = decoder.feed(chunk)
        return events

    async def _serve(
        self,
        stream: Stream,
        peer: PeerId,
        inbound: Inbound,
        handler: Any,
        streaming: bool,
    ) -> None:
        protocol = inbound.protocol
        decoder = FrameDecoder(self._limits.max_frame_bytes)
        events = decoder.feed(inbound.leftover) if inbound.leftover else []
        if not events:
            try:
                events = await self._read_request(stream, decoder)
            except TimeoutError:
                await _send_error(
                    stream,
                    inbound.answer,
                    RpcCode.DEADLINE_EXCEEDED,
                    "no request within RpcLimits.request_read_timeout_s="
                    f"{self._limits.request_read_timeout_s:g}",
                )
                return
        if not events:
            await stream.close()
            return
        first, rest = events[0], events[1:]
        if not isinstance(first, CallOpened if streaming else MessageFrame):
            if isinstance(first, ErrorFrame):
                await stream.close()
                return
            if isinstance(first, FrameRejected):
                code, message = RpcCode.BAD_FRAME, first.describe(peer)
            else:
                kind = "streaming" if streaming else "unary"
                code, message = RpcCode.UNKNOWN_METHOD, f"{protocol} is served as a {kind} call"
            _log.debug("refused %s call from %s: %s", protocol, peer, message)
            await _send_error(stream, inbound.answer, code, message)
            return
        loop = asyncio.get_running_loop()
        deadline = None if first.deadline_s is None else loop.time() + first.deadline_s
        ctx = RpcContext(peer, deadline, protocol)
        task = asyncio.current_task()
        assert task is not None
        queue: asyncio.Queue[MessageFrame | None] | None = None
        call: RpcStream | None = None
        if streaming:
            queue = asyncio.Queue(self._limits.stream_queue_frames)
            call = RpcStream(
                stream,
                peer,
                protocol,
                self._limits.max_frame_bytes,
                _Queued(queue),
                answer=inbound.answer,
            )
            work = handler(ctx, call)
        else:
            assert isinstance(first, MessageFrame)
            if rest:
                message = f"unexpected frame from {peer} after the request of a unary call"
                await _send_error(stream, inbound.answer, RpcCode.BAD_FRAME, message)
                return
            work = handler(ctx, first.value, first.payload)
        watch = _Watch(stream, decoder, rest, queue, peer, task, deadline)
        starting = None if streaming else loop.call_soon(watch.start)
        if starting is None:
            watch.start()
        result: Any = None
        failure: Exception | None = None
        try:
            result = await work
        except asyncio.CancelledError:
            if not watch.tripped:
                raise
        except Exception as exc:
            failure = exc
        finally:
            if starting is not None:
                starting.cancel()
            watch.stop()
        answer = inbound.answer if call is None else call._answer
        if watch.tripped:
            if task.uncancel():
                raise asyncio.CancelledError
            if watch.expired:
                message = f"{protocol} handler passed the call's deadline"
                await _send_error(stream, answer, RpcCode.DEADLINE_EXCEEDED, message)
            elif watch.violation is None:
                stream.reset()
            else:
                _log.debug("%s call from %s: %s", protocol, peer, watch.violation)
                await _send_error(stream, answer, RpcCode.BAD_FRAME, watch.violation)
            return
        if failure is not None:
            code, message = self._describe_failure(failure, protocol, peer)
            await _send_error(stream, answer, code, message)
            return
        if call is not None:
            if answer:
                await stream.write(answer)
            await stream.close()
            return
        await self._reply(stream, answer, result, protocol, peer)

    def _describe_failure(self, exc: Exception, protocol: str, peer: PeerId) -> tuple[str, str]:
        if isinstance(exc, RpcError):
            return exc.code, exc.message
        if isinstance(exc, ConnectionLost | PeerProtocolError):
            _log.debug("%s call from %s ended: %s", protocol, peer, exc)
            return RpcCode.CANCELLED, str(exc)
        _log.error("%s handler failed on a call from %s", protocol, peer, exc_info=exc)
        return RpcCode.INTERNAL, f"{protocol} handler failed: {type(exc).__name__}: {exc}"

    async def _reply(
        self, stream: Stream, answer: bytes, result: Any, protocol: str, peer: PeerId
    ) -> None:
        reply = result if isinstance(result, RpcReply) else RpcReply(result)
        try:
            view = None if reply.payload is None else _byte_view(reply.payload)
            head = encode_message(
                reply.value,
                None if view is None else len(view),
                deadline_s=None,
                max_frame_bytes=self._limits.max_frame_bytes,
            )
        except Exception as exc:
            _log.error("%s handler's reply to %s cannot be sent", protocol, peer, exc_info=exc)
            await _send_error(
                stream, answer, RpcCode.INTERNAL, f"{protocol} reply cannot be encoded: {exc}"
            )
            return
        await _write_frame(stream, answer + head, view)
        await stream.close()
