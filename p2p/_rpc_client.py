"""The calling side of RPC: unary calls and opening streaming calls.

Unary calls to one peer and protocol share one long-lived stream (``_CallStream``):
each request frame carries a call id and the seconds left until its deadline, replies
come back by id to their callers, read by one waiting caller at a time (no reader
task, so the caller that reads its own reply wakes with it), and a
caller that gives up sends a cancel frame, which cancels the remote handler. A call
then costs one frame each way, with no stream to open or close. The first request
carries the lazy negotiation; a refusal, a bad frame or a stream-wide error frame fails
the calls of that stream only, and the next call opens a new one. Requests whose
payload is too large to ride in one write (``_rpc.COALESCE_BYTES``) take a stream of
their own, so that they hold up no other call. Per-peer call slots
(``RpcLimits.max_concurrent_calls_per_peer``) make excess calls wait instead of being
refused by the server.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from functools import partial
from typing import Any

from security import PeerId
from transport._base import Stream
from transport._errors import TransportError
from transport._limits import MultistreamLimits

from ._connmgr import ConnectionRecord
from ._errors import P2PError, PeerProtocolError, RpcCancelled
from ._frames import (
    ErrorFrame,
    FrameDecoder,
    FrameEvent,
    FrameRejected,
    MessageFrame,
    encode_cancel,
    encode_message,
    encode_open,
)
from ._limits import RpcLimits
from ._negotiate import check_echo, confirm_lazy, lazy_prefix
from ._rpc import (
    COALESCE_BYTES,
    Incoming,
    Payload,
    RpcReply,
    RpcStream,
    byte_view,
    call_failure,
    remote_error,
    write_frame,
)


def _outcome(event: FrameEvent | None, peer: PeerId, protocol: str) -> RpcReply:
    """The reply a unary call's answer frame means, or the error it raises."""
    if isinstance(event, MessageFrame):
        return RpcReply(event.value, event.payload)
    if isinstance(event, ErrorFrame):
        raise remote_error(event, peer)
    if isinstance(event, FrameRejected):
        raise PeerProtocolError(event.describe(peer))
    if event is None:
        raise PeerProtocolError(f"{peer} closed the {protocol} call without answering")
    raise PeerProtocolError(f"{peer} answered the {protocol} call with an unexpected frame")


class _CallStream:
    """One stream carrying the unary calls of one protocol to one peer, matched by id."""

    def __init__(
        self,
        stream: Stream,
        record: ConnectionRecord,
        protocol: str,
        prefix: bytes,
        negotiation: MultistreamLimits,
        max_frame_bytes: int,
        on_end: Callable[[_CallStream], None],
    ) -> None:
        self.stream = stream
        self.record = record
        self.protocol = protocol
        self._expected = prefix
        self._unsent = prefix
        """The lazy negotiation, written ahead of the first request."""
        self._negotiation = negotiation
        self._max_frame_bytes = max_frame_bytes
        self._on_end = on_end
        self._pending: dict[int, asyncio.Future[FrameEvent | None]] = {}
        """Each call's future: its answer frame, or None when it is its turn to read."""
        self._next_id = 0
        self._lock = asyncio.Lock()
        self._cancels: set[asyncio.Task[None]] = set()
        self._echo = b""
        """The listener's negotiation answer, while incomplete."""
        self._decoder: FrameDecoder | None = None
        """Set once the listener accepted the protocol."""
        self._reading = False
        self._failure: Callable[[], Exception] | None = None
        """What every call fails with once the stream has ended."""

    @property
    def ended(self) -> bool:
        return self._failure is not None

    async def call(self, request: Any, view: memoryview | None, deadline_s: float) -> FrameEvent:
        """Send one request and wait for its answer frame.

        There is no reader task: one waiting caller reads the stream at a time, hands
        each answer to its caller and, once its own answer came, passes the turn on.
        """
        loop = asyncio.get_running_loop()
        call_id = self._next_id
        self._next_id += 1
        head = encode_message(
            request,
            None if view is None else len(view),
            deadline_s=deadline_s,
            max_frame_bytes=self._max_frame_bytes,
            call_id=call_id,
        )
        future: asyncio.Future[FrameEvent | None] = loop.create_future()
        self._pending[call_id] = future
        try:
            async with self._lock:
                self._check()
                head, self._unsent = self._unsent + head, b""
                try:
                    await write_frame(self.stream, head, view)
                except asyncio.CancelledError:
                    self._end(partial(RpcCancelled, f"a {self.protocol} request was cut short"))
                    raise
            while True:
                if not self._reading:
                    await self._read_until(future)
                event = await future
                if event is not None:
                    return event
                self._check()
                future = self._pending[call_id] = loop.create_future()
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and not self.ended:
                task = loop.create_task(self._cancel(call_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
            raise
        except TransportError as exc:
            self._end(partial(call_failure, exc, self.record.peer, self.protocol))
            raise call_failure(exc, self.record.peer, self.protocol) from exc
        finally:
            self._pending.pop(call_id, None)
            if not self._reading:
                self._pass_turn()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure()

    async def _cancel(self, call_id: int) -> None:
        try:
            async with self._lock:
                await self.stream.write(encode_cancel(call_id))
        except TransportError as exc:
            self._end(partial(call_failure, exc, self.record.peer, self.protocol))

    async def _read_until(self, future: asyncio.Future[FrameEvent | None]) -> None:
        """Read and hand out answers until ``future``'s comes, then pass the turn on."""
        self._reading = True
        try:
            while not future.done() and self._failure is None:
                try:
                    await self._read_some()
                except TransportError as exc:
                    self._end(partial(call_failure, exc, self.record.peer, self.protocol))
                except P2PError as exc:
                    self._end(partial(copy.copy, exc))
        finally:
            self._reading = False
            self._pass_turn()

    def _pass_turn(self) -> None:
        """Wake a waiting caller to read (it reads only if nobody does by then)."""
        for waiting in self._pending.values():
            if not waiting.done():
                waiting.set_result(None)
                return

    async def _read_some(self) -> None:
        peer, protocol = self.record.peer, self.protocol
        data: bytes | memoryview = await self.stream.read()
        if not data:
            self._end(partial(PeerProtocolError, f"{peer} closed the {protocol} call stream"))
            return
        if self._decoder is None:
            self._echo += data
            used = check_echo(self._expected, self._echo, protocol, self._negotiation)
            if used is None:
                return
            data, self._echo = memoryview(self._echo)[used:], b""
            self._decoder = FrameDecoder(self._max_frame_bytes)
        for event in self._decoder.feed(data) if data else ():
            failure = self._dispatch(event)
            if failure is not None:
                self._end(failure)
                return

    def _dispatch(self, event: FrameEvent) -> Callable[[], Exception] | None:
        """Hand an answer to its caller; what ends the whole stream comes back as its error."""
        peer = self.record.peer
        if isinstance(event, MessageFrame | ErrorFrame) and event.call_id is not None:
            future = self._pending.pop(event.call_id, None)
            if future is not None and not future.done():
                future.set_result(event)
            return None
        if isinstance(event, ErrorFrame):
            return partial(remote_error, event, peer)
        if isinstance(event, FrameRejected):
            return partial(PeerProtocolError, event.describe(peer))
        return partial(
            PeerProtocolError, f"{peer} sent an unexpected frame on the {self.protocol} call stream"
        )

    def _end(self, failure: Callable[[], Exception]) -> None:
        """Fail every pending call with a fresh ``failure()`` and drop the stream."""
        if self._failure is not None:
            return
        self._failure = failure
        self._on_end(self)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(failure())
        for task in self._cancels:
            task.cancel()
        self.stream.reset()

    def close(self) -> None:
        self._end(partial(RpcCancelled, f"the {self.protocol} call stream was closed"))


class RpcClient:
    """Makes calls: per-protocol negotiation prefixes, call streams and per-peer call slots."""

    def __init__(self, limits: RpcLimits, negotiation: MultistreamLimits) -> None:
        self._limits = limits
        self._negotiation = negotiation
        self._prefixes: dict[str, bytes] = {}
        self._slots: dict[PeerId, asyncio.Semaphore] = {}
        self._call_streams: dict[tuple[PeerId, str], _CallStream] = {}

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
        """Drop ``peer``'s call slots and call streams once it has no connection left."""
        slot = self._slots.get(peer)
        if slot is not None and not slot.locked():
            del self._slots[peer]
        for key in [key for key in self._call_streams if key[0] == peer]:
            self._call_streams[key].close()

    async def _open(self, record: ConnectionRecord, protocol: str) -> Stream:
        try:
            stream = await record.conn.open_stream()
        except TransportError as exc:
            raise call_failure(exc, record.peer, protocol) from exc
        record.stream_opened()
        return stream

    async def _call_stream(self, record: ConnectionRecord, protocol: str) -> _CallStream:
        """The stream carrying unary ``protocol`` calls on ``record``'s connection.

        It keeps no connection busy by itself: each call counts as a stream in use.
        """
        key = (record.peer, protocol)
        carrier = self._call_streams.get(key)
        if carrier is not None and carrier.record is record:
            return carrier
        try:
            stream = await record.conn.open_stream()
        except TransportError as exc:
            raise call_failure(exc, record.peer, protocol) from exc
        current = self._call_streams.get(key)
        if current is not None and current.record is record:
            stream.reset()
            return current
        if current is not None:
            current.close()
        carrier = _CallStream(
            stream,
            record,
            protocol,
            self._prefix(protocol),
            self._negotiation,
            self._limits.max_frame_bytes,
            self._dropped,
        )
        self._call_streams[key] = carrier
        return carrier

    def _dropped(self, carrier: _CallStream) -> None:
        key = (carrier.record.peer, carrier.protocol)
        if self._call_streams.get(key) is carrier:
            del self._call_streams[key]

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
        view = None if payload is None else byte_view(payload)
        peer = record.peer
        async with self._slot(peer):
            if view is not None and len(view) > COALESCE_BYTES:
                event = await self._call_alone(record, protocol, request, view, deadline)
            else:
                carrier = await self._call_stream(record, protocol)
                record.stream_opened()
                try:
                    event = await carrier.call(request, view, deadline - loop.time())
                finally:
                    record.stream_closed(loop.time())
        return _outcome(event, peer, protocol)

    async def _call_alone(
        self,
        record: ConnectionRecord,
        protocol: str,
        request: Any,
        view: memoryview,
        deadline: float,
    ) -> FrameEvent | None:
        """A call with a large payload, on a stream of its own: it holds up no other call."""
        loop = asyncio.get_running_loop()
        head = encode_message(
            request,
            len(view),
            deadline_s=deadline - loop.time(),
            max_frame_bytes=self._limits.max_frame_bytes,
        )
        prefix = self._prefix(protocol)
        stream = await self._open(record, protocol)
        try:
            await write_frame(stream, prefix + head, view)
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
                raise call_failure(exc, record.peer, protocol) from exc
            raise
        finally:
            record.stream_closed(loop.time())
        await stream.close()
        return events[0] if events else None

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
            Incoming(stream, prefix, protocol, self._negotiation, self._limits.max_frame_bytes),
            on_release=release,
            deadline=deadline,
        )
        try:
            left = None if deadline is None else deadline - loop.time()
            await stream.write(prefix + encode_open(left))
        except BaseException as exc:
            call.cancel()
            if isinstance(exc, TransportError):
                raise call_failure(exc, record.peer, protocol) from exc
            raise
        return call
