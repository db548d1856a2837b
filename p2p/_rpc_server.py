"""The serving side of RPC: admission, deadlines, cancellation and error frames.

While a handler runs, the server keeps reading the call's stream (``_Watch``): a reset
(the caller cancelled or gave up), a lost connection, the call's deadline or a bad
frame cancels the handler's task, and a bad frame is answered with an error frame
naming it before the stream closes. Nothing a peer sends makes ``serve`` raise.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from security import PeerId
from transport._base import Stream
from transport._errors import TransportError

from ._connmgr import ConnectionRecord
from ._errors import ConnectionLost, PeerProtocolError, RpcCode, RpcError
from ._frames import (
    CallCancelled,
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


class _Served:
    """A unary call in progress on a call stream."""

    __slots__ = ("expired", "replying", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.expired = False
        self.replying = False
        """Set once the handler is done: a late cancel frame no longer interrupts the reply."""

    def cancel(self, expired: bool = False) -> None:
        if self.task is not None and not self.replying:
            self.expired = expired
            self.task.cancel()


class _Carrier:
    """A stream carrying many unary calls, each frame naming its call by id."""

    __slots__ = ("_answer", "_lock", "calls", "protocol", "record", "stream")

    def __init__(self, stream: Stream, record: ConnectionRecord, protocol: str, answer: bytes):
        self.stream = stream
        self.record = record
        self.protocol = protocol
        self._answer = answer
        self._lock = asyncio.Lock()
        self.calls: dict[int, _Served] = {}

    async def send(self, head: bytes, view: memoryview | None) -> None:
        """Write one frame whole (the negotiation answer goes ahead of the first)."""
        async with self._lock:
            head, self._answer = self._answer + head, b""
            await write_frame(self.stream, head, view)

    async def stop_calls(self) -> None:
        tasks = [served.task for served in self.calls.values() if served.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
        """Serve the calls of ``stream`` (negotiated already); never raises for the peer's input."""
        try:
            await self._serve(stream, record, inbound, handler, streaming)
        except TransportError as exc:
            _log.debug("%s call from %s ended: %r", inbound.protocol, record.peer, exc)
            stream.reset()

    def _admit(self, peer: PeerId) -> str | None:
        """Count one more call from ``peer``; the refusal's message when over the limit."""
        active = self._active.get(peer, 0)
        limit = self._limits.max_concurrent_calls_per_peer
        if active >= limit:
            return (
                f"{active} calls from {peer} in flight reach "
                f"RpcLimits.max_concurrent_calls_per_peer={limit}"
            )
        self._active[peer] = active + 1
        return None

    def _leave(self, peer: PeerId) -> None:
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
        record: ConnectionRecord,
        inbound: Inbound,
        handler: Any,
        streaming: bool,
    ) -> None:
        peer = record.peer
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
        if not streaming and isinstance(first, MessageFrame) and first.call_id is not None:
            carrier = _Carrier(stream, record, protocol, inbound.answer)
            await self._serve_calls(carrier, handler, decoder, events)
            return
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
        refusal = self._admit(peer)
        if refusal is not None:
            await _send_error(stream, inbound.answer, RpcCode.OVERLOADED, refusal)
            return
        try:
            await self._serve_one(stream, peer, inbound, handler, streaming, decoder, first, rest)
        finally:
            self._leave(peer)

    async def _serve_one(
        self,
        stream: Stream,
        peer: PeerId,
        inbound: Inbound,
        handler: Any,
        streaming: bool,
        decoder: FrameDecoder,
        first: FrameEvent,
        rest: list[FrameEvent],
    ) -> None:
        """Serve the one call of ``stream``, a streaming call or a unary call alone."""
        protocol = inbound.protocol
        assert isinstance(first, CallOpened | MessageFrame)
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

    async def _serve_calls(
        self,
        carrier: _Carrier,
        handler: UnaryHandler,
        decoder: FrameDecoder,
        events: list[FrameEvent],
    ) -> None:
        """Serve the unary calls multiplexed on ``carrier`` until the caller ends the stream.

        The carrier itself keeps no connection busy (the Host counted it as a stream in
        use, so that count is lent back here): each call in progress counts instead. A
        frame breaking the protocol fails the stream's calls with one error frame
        without call id; the connection and its other streams go on.
        """
        record, stream = carrier.record, carrier.stream
        loop = asyncio.get_running_loop()
        record.stream_closed(loop.time())
        try:
            while True:
                for event in events:
                    violation = await self._take(carrier, handler, event)
                    if violation is not None:
                        _log.debug(
                            "%s call stream from %s: %s", carrier.protocol, record.peer, violation
                        )
                        await carrier.stop_calls()
                        await carrier.send(encode_error(RpcCode.BAD_FRAME, violation), None)
                        await stream.close()
                        return
                chunk = await stream.read()
                if not chunk:
                    tasks = [served.task for served in carrier.calls.values() if served.task]
                    await asyncio.gather(*tasks, return_exceptions=True)
                    await stream.close()
                    return
                events = decoder.feed(chunk)
        finally:
            await carrier.stop_calls()
            record.stream_opened()

    async def _take(
        self, carrier: _Carrier, handler: UnaryHandler, event: FrameEvent
    ) -> str | None:
        """Act on one frame of a call stream; what breaks the protocol comes back as a message."""
        peer = carrier.record.peer
        if isinstance(event, CallCancelled):
            served = carrier.calls.get(event.call_id)
            if served is not None:
                served.cancel()
            return None
        if isinstance(event, FrameRejected):
            return event.describe(peer)
        if not isinstance(event, MessageFrame) or event.call_id is None:
            return f"unexpected frame from {peer} on a {carrier.protocol} call stream"
        call_id = event.call_id
        if call_id in carrier.calls:
            return f"{peer} reused call id {call_id} on a {carrier.protocol} call stream"
        refusal = self._admit(peer)
        if refusal is not None:
            await carrier.send(encode_error(RpcCode.OVERLOADED, refusal, call_id), None)
            return None
        carrier.record.stream_opened()
        served = carrier.calls[call_id] = _Served()
        served.task = asyncio.get_running_loop().create_task(
            self._run_call(carrier, handler, event, call_id, served)
        )
        served.task.add_done_callback(partial(self._call_done, carrier, call_id))
        return None

    def _call_done(self, carrier: _Carrier, call_id: int, task: asyncio.Task[None]) -> None:
        """Release what a call held, whether or not its task ever ran."""
        del carrier.calls[call_id]
        self._leave(carrier.record.peer)
        carrier.record.stream_closed(asyncio.get_running_loop().time())

    async def _run_call(
        self,
        carrier: _Carrier,
        handler: UnaryHandler,
        request: MessageFrame,
        call_id: int,
        served: _Served,
    ) -> None:
        """Run one multiplexed call's handler and answer it by id."""
        loop = asyncio.get_running_loop()
        protocol, peer = carrier.protocol, carrier.record.peer
        deadline = None if request.deadline_s is None else loop.time() + request.deadline_s
        timer = None if deadline is None else loop.call_at(deadline, served.cancel, True)
        try:
            head: bytes
            view: memoryview | None = None
            try:
                result = await handler(
                    RpcContext(peer, deadline, protocol), request.value, request.payload
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not served.expired or task is None or task.uncancel():
                    raise
                message = f"{protocol} handler passed the call's deadline"
                head = encode_error(RpcCode.DEADLINE_EXCEEDED, message, call_id)
            except Exception as exc:
                code, message = self._describecall_failure(exc, protocol, peer)
                head = encode_error(code, message, call_id)
            else:
                head, view = self._encode_reply(result, protocol, peer, call_id)
            finally:
                served.replying = True
                if timer is not None:
                    timer.cancel()
            await carrier.send(head, view)
        except TransportError as exc:
            _log.debug("%s call from %s ended: %r", protocol, peer, exc)
            carrier.stream.reset()

    def _encode_reply(
        self, result: Any, protocol: str, peer: PeerId, call_id: int | None
    ) -> tuple[bytes, memoryview | None]:
        """A reply frame's head and payload, or an error frame when it cannot be sent."""
        reply = result if isinstance(result, RpcReply) else RpcReply(result)
        try:
            view = None if reply.payload is None else byte_view(reply.payload)
            head = encode_message(
                reply.value,
                None if view is None else len(view),
                deadline_s=None,
                max_frame_bytes=self._limits.max_frame_bytes,
                call_id=call_id,
            )
        except Exception as exc:
            _log.error("%s handler's reply to %s cannot be sent", protocol, peer, exc_info=exc)
            message = f"{protocol} reply cannot be encoded: {exc}"
            return encode_error(RpcCode.INTERNAL, message, call_id), None
        return head, view

    async def _reply(
        self, stream: Stream, answer: bytes, result: Any, protocol: str, peer: PeerId
    ) -> None:
        head, view = self._encode_reply(result, protocol, peer, None)
        await write_frame(stream, answer + head, view)
        await stream.close()
