"""The serving side of RPC: admission, deadlines, cancellation and error frames.

While a handler runs, the server keeps reading the call's stream (``_Watch``): a reset
(the caller cancelled or gave up), a lost connection, the call's deadline or a bad
frame cancels the handler's task, and a bad frame is answered with an error frame
naming it before the stream closes. Nothing a peer sends makes ``serve`` raise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from security import PeerId
from transport._base import Stream
from transport._errors import TransportError

from ._connmgr import ConnectionRecord
from ._errors import ConnectionLost, PeerProtocolError, RpcCode, RpcError
from ._frames import (
    CallOpened,
    ErrorFrame,
    FrameDecoder,
    FrameEvent,
    FrameRejected,
    MessageFrame,
    encode_error,
    encode_message,
)
from ._limits import RpcLimits
from ._negotiate import Inbound
from ._rpc import (
    Queued,
    RpcContext,
    RpcReply,
    RpcStream,
    StreamHandler,
    UnaryHandler,
    byte_view,
    write_frame,
)

_log = logging.getLogger("p2p.rpc")


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
                Queued(queue),
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
        answer = inbound.answer if call is None else call._take_answer()
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
            code, message = self._describecall_failure(failure, protocol, peer)
            await _send_error(stream, answer, code, message)
            return
        if call is not None:
            if answer:
                await stream.write(answer)
            await stream.close()
            return
        await self._reply(stream, answer, result, protocol, peer)

    def _describecall_failure(self, exc: Exception, protocol: str, peer: PeerId) -> tuple[str, str]:
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
            view = None if reply.payload is None else byte_view(reply.payload)
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
        await write_frame(stream, answer + head, view)
        await stream.close()
