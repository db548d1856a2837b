"""The calling side of RPC: unary calls and opening streaming calls.

A unary call writes the lazy negotiation, the request frame (with the seconds left
until its deadline) and the payload in one flight, then reads the answer and the reply
together; per-peer call slots (``RpcLimits.max_concurrent_calls_per_peer``) make excess
calls wait instead of being refused by the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from security import PeerId
from transport._base import Stream
from transport._errors import TransportError
from transport._limits import MultistreamLimits

from ._connmgr import ConnectionRecord
from ._errors import PeerProtocolError
from ._frames import (
    ErrorFrame,
    FrameDecoder,
    FrameRejected,
    MessageFrame,
    encode_message,
    encode_open,
)
from ._limits import RpcLimits
from ._negotiate import confirm_lazy, lazy_prefix
from ._rpc import (
    Incoming,
    Payload,
    RpcReply,
    RpcStream,
    byte_view,
    call_failure,
    remote_error,
    write_frame,
)


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
            raise call_failure(exc, record.peer, protocol) from exc
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
        view = None if payload is None else byte_view(payload)
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
                    raise call_failure(exc, peer, protocol) from exc
                raise
            finally:
                record.stream_closed(loop.time())
            await stream.close()
        event = events[0] if events else None
        if isinstance(event, MessageFrame):
            return RpcReply(event.value, event.payload)
        if isinstance(event, ErrorFrame):
            raise remote_error(event, peer)
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
