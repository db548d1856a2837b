"""The asyncio shell around one aioquic connection: :class:`QuicConnection`.

aioquic is the sans-IO core; this module only pumps it. Datagrams come in through
:meth:`QuicConnection.receive` (from the shared :class:`~transport._quic_endpoint.QuicEndpoint`),
timers through ``handle_timer``; events become stream data, resets and closes; what aioquic
has to send leaves through the endpoint once per event-loop turn.

Authentication: aioquic reports ``HandshakeCompleted`` once TLS is done; the peer's
certificate must then prove a PeerID (and the expected one, when dialing). A client also
waits for the server's HANDSHAKE_DONE: until then the server may still refuse the
client's certificate, and the dial must fail rather than hand out a dead connection.

Liveness: a PING every ``QuicLimits.keepalive_s`` keeps NAT mappings and the peer's idle
timer fresh; aioquic closes the connection after ``idle_timeout_s`` without a packet from
the peer, and every pending read and write then fails with ``ConnectionClosed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType

from security import InvalidCertificate, PeerId

from ._errors import ConnectionClosed, DialError, HandshakeError, PeerIdMismatch, TransportError
from ._errors import StreamReset as StreamResetError
from ._limits import QuicLimits
from ._multiaddr import Multiaddr
from ._quic_engine import APPLICATION_NO_ERROR, BAD_CERTIFICATE, LibP2PQuicConnection, authenticate
from ._quic_stream import QuicStream, Signal

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._quic_endpoint import NetworkAddress, QuicEndpoint

_log = logging.getLogger(__name__)


class QuicConnection:
    """An authenticated QUIC connection; ``remote_peer`` is what the peer's certificate proved."""

    def __init__(
        self,
        *,
        endpoint: QuicEndpoint,
        quic: LibP2PQuicConnection,
        peer_addr: NetworkAddress,
        local_peer: PeerId,
        limits: QuicLimits,
        expected_peer: PeerId | None = None,
        on_established: Callable[[QuicConnection], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._endpoint = endpoint
        self._quic = quic
        self._peer_addr = peer_addr
        self._local_peer = local_peer
        self._limits = limits
        self._expected_peer = expected_peer
        self._on_established = on_established
        self._is_client = quic.configuration.is_client
        self._remote_peer: PeerId | None = None
        self._established = False
        self._established_waiter: asyncio.Future[None] | None = None
        self._error: TransportError | None = None
        self._closed = asyncio.Event()
        self._streams: dict[int, QuicStream] = {}
        self._inbound: deque[QuicStream] = deque()
        self._accept = Signal()
        self._next_inbound_id = 1 if self._is_client else 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.cids: set[bytes] = set()
        self.blocked_writers: set[QuicStream] = set()

    def __repr__(self) -> str:
        peer = self._remote_peer.short() if self._remote_peer else "?"
        return f"<QuicConnection {peer} at {self.remote_addr}>"

    # Connection protocol

    @property
    def transport_name(self) -> str:
        return "quic"

    @property
    def local_peer(self) -> PeerId:
        return self._local_peer

    @property
    def remote_peer(self) -> PeerId:
        if self._remote_peer is None:
            raise HandshakeError("the QUIC handshake has not authenticated the peer yet")
        return self._remote_peer

    @property
    def local_addr(self) -> Multiaddr:
        return Multiaddr.for_quic(*self._endpoint.local_addr)

    @property
    def remote_addr(self) -> Multiaddr:
        host, port = (self._quic.get_peer_address() or self._peer_addr)[:2]
        return Multiaddr.for_quic(host, port)

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    async def open_stream(self) -> QuicStream:
        self.check_open()
        stream_id = self._quic.get_next_available_stream_id()
        # Creating the aioquic stream now (with no data) reserves the ID for this stream.
        self._quic.send_stream_data(stream_id, b"")
        stream = self._streams[stream_id] = QuicStream(self, stream_id)
        return stream

    async def accept_stream(self) -> QuicStream:
        while not self._inbound:
            self.check_open()
            await self._accept.wait()
        return self._inbound.popleft()

    async def close(self) -> None:
        """Close at once; what the peer has not acknowledged yet is abandoned.

        For an orderly end, half-close the streams and read the peer's answers first.
        """
        self.close_now()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # used by streams

    def check_open(self) -> None:
        if self._error is not None:
            raise ConnectionClosed(str(self._error))

    def send_room(self, stream_id: int) -> int:
        return self._limits.stream_send_buffer_bytes - self._quic.unacked_bytes(stream_id)

    def send(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        try:
            # aioquic appends ``data`` to a bytearray: a memoryview slice needs no copy first.
            self._quic.send_stream_data(stream_id, data, end_stream=end_stream)  # type: ignore[arg-type]
        except (ValueError, RuntimeError) as exc:
            raise StreamResetError(f"stream {stream_id} can no longer send: {exc}") from None
        self._endpoint.schedule_transmit(self)

    def reset_stream(self, stream_id: int) -> None:
        self._quic.reset_stream(stream_id, APPLICATION_NO_ERROR)
        self._endpoint.schedule_transmit(self)

    def stop_sending(self, stream_id: int) -> None:
        try:
            self._quic.stop_stream(stream_id, APPLICATION_NO_ERROR)
        except ValueError:
            return  # aioquic already discarded the stream: nothing left to stop
        self._endpoint.schedule_transmit(self)

    def release_if_done(self, stream: QuicStream) -> None:
        if stream.is_done:
            if self._streams.get(stream.stream_id) is stream:
                del self._streams[stream.stream_id]
            self.blocked_writers.discard(stream)

    # handshake

    @property
    def is_inbound_handshake(self) -> bool:
        return not self._is_client and not self._established and self._error is None

    def connect(self) -> None:
        """Start the client handshake."""
        self._quic.connect(self._peer_addr, now=self._loop.time())
        self._endpoint.schedule_transmit(self)

    def start_handshake_timer(self) -> None:
        self._handshake_timer = self._loop.call_later(
            self._limits.handshake_timeout_s, self._on_handshake_timeout
        )

    async def wait_established(self) -> None:
        """Return once authenticated; raises the handshake's ``TransportError`` otherwise."""
        if self._established:
            return
        if self._error is not None:
            raise self._error
        self._established_waiter = self._loop.create_future()
        await self._established_waiter

    def _on_handshake_completed(self) -> None:
        try:
            peer = authenticate(self._quic)
        except InvalidCertificate as exc:
            self._refuse(HandshakeError(f"{self._where()}: {exc}"), str(exc))
            return
        if self._expected_peer is not None and peer != self._expected_peer:
            self._refuse(
                PeerIdMismatch(expected=self._expected_peer, actual=peer, addr=self.remote_addr),
                f"expected peer {self._expected_peer}",
            )
            return
        self._remote_peer = peer
        if not self._is_client:
            self._establish()

    def _establish(self) -> None:
        self._established = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._keepalive = self._loop.call_later(self._keepalive_interval, self._on_keepalive)
        if self._established_waiter is not None and not self._established_waiter.done():
            self._established_waiter.set_result(None)
        if self._on_established is not None:
            self._on_established(self)

    def _refuse(self, error: TransportError, reason: str) -> None:
        self._quic.close(
            error_code=BAD_CERTIFICATE, frame_type=QuicFrameType.CRYPTO, reason_phrase=reason
        )
        self._endpoint.schedule_transmit(self)
        self._fail(error)

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if not self._established:
            self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase="timeout")
            self._endpoint.schedule_transmit(self)
            self._fail(HandshakeError(f"{self._where()}: handshake timed out"))

    def _where(self) -> str:
        return f"QUIC handshake with {self.remote_addr}"

    # pumping aioquic

    def receive(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """Feed one datagram; the endpoint transmits after the batch."""
        try:
            self._quic.receive_datagram(data, addr, now)
            self._process_events()
        except Exception:
            self._broken(f"a datagram from {addr}")
        self._after_events()

    def _broken(self, what: str) -> None:
        """aioquic raised: close this connection rather than let the socket go down with it."""
        _log.exception("aioquic failed on %s; closing %r", what, self)
        self._quic.close(error_code=QuicErrorCode.INTERNAL_ERROR, reason_phrase="internal error")
        self._fail(ConnectionClosed(f"QUIC connection to {self.remote_addr} broke on {what}"))

    def transmit(self) -> None:
        for data, addr in self._quic.datagrams_to_send(now=self._loop.time()):
            self._endpoint.sendto(data, addr)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._on_timer)
        self._timer_at = timer_at

    def _on_timer(self) -> None:
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        try:
            self._quic.handle_timer(now)
            self._process_events()
        except Exception:
            self._broken("a timer")
        self._after_events()
        self.transmit()

    def _on_keepalive(self) -> None:
        self._keepalive = None
        if self._error is None:
            self._quic.send_ping(0)
            self._endpoint.schedule_transmit(self)
            self._keepalive = self._loop.call_later(self._keepalive_interval, self._on_keepalive)

    @property
    def _keepalive_interval(self) -> float:
        """``keepalive_s``, or half the idle timeout when the peer asked for a shorter one."""
        return min(self._limits.keepalive_s, self._quic.idle_timeout / 2)

    def _process_events(self) -> None:
        quic = self._quic
        while (event := quic.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                stream = self._stream_for(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.end_stream)
            elif isinstance(event, StreamReset):
                stream = self._stream_for(event.stream_id)
                if stream is not None:
                    stream.on_reset(event.error_code)
            elif isinstance(event, StopSendingReceived):
                stream = self._stream_for(event.stream_id)
                if stream is not None:
                    stream.on_stop_sending(event.error_code)
            elif isinstance(event, HandshakeCompleted):
                self._on_handshake_completed()
            elif isinstance(event, ConnectionIdIssued):
                self._endpoint.add_cid(event.connection_id, self)
            elif isinstance(event, ConnectionIdRetired):
                self._endpoint.retire_cid(event.connection_id)
            elif isinstance(event, ConnectionTerminated):
                self._on_terminated(event)

    def _after_events(self) -> None:
        reason = self._quic.close_reason
        if reason is not None and self._error is None:
            self._fail(self._closed_error(reason))
        if (
            self._is_client
            and not self._established
            and self._remote_peer is not None
            and self._error is None
            and self._quic.handshake_confirmed
        ):
            self._establish()
        if self.blocked_writers:
            low_water = self._limits.stream_send_buffer_bytes // 2
            for stream in list(self.blocked_writers):
                if self._quic.unacked_bytes(stream.stream_id) <= low_water:
                    self.blocked_writers.discard(stream)
                    stream.on_writable()

    def _stream_for(self, stream_id: int) -> QuicStream | None:
        """Our stream for an event, opening the peer's new streams (in ID order) as needed."""
        stream = self._streams.get(stream_id)
        if stream is not None or stream_id % 4 != self._next_inbound_id % 4:
            return stream
        if stream_id < self._next_inbound_id or self._error is not None:
            return None
        while self._next_inbound_id <= stream_id:
            opened = self._streams[self._next_inbound_id] = QuicStream(self, self._next_inbound_id)
            self._inbound.append(opened)
            self._next_inbound_id += 4
        self._accept.notify()
        return self._streams[stream_id]

    # closing

    def _closed_error(self, event: ConnectionTerminated) -> TransportError:
        detail = f"code {event.error_code:#x}" + (
            f", {event.reason_phrase}" if event.reason_phrase else ""
        )
        if self._established:
            return ConnectionClosed(f"QUIC connection to {self.remote_addr} closed ({detail})")
        if event.error_code == QuicErrorCode.CONNECTION_REFUSED:
            return DialError(
                f"{self.remote_addr} refused the QUIC connection", addr=self.remote_addr
            )
        return HandshakeError(f"{self._where()} failed ({detail})")

    def _fail(self, error: TransportError) -> None:
        """Mark the connection closed for ``error``; every pending operation fails."""
        if self._error is not None:
            return
        self._error = error
        for timer in (self._keepalive, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._handshake_timer = None
        if self._established_waiter is not None and not self._established_waiter.done():
            self._established_waiter.set_exception(error)
        closed = ConnectionClosed(str(error))
        for stream in list(self._streams.values()):
            stream.on_connection_closed(closed)
        self._streams.clear()
        self._inbound.clear()
        self.blocked_writers.clear()
        self._accept.notify()
        self._closed.set()

    def _on_terminated(self, event: ConnectionTerminated) -> None:
        self._fail(self._closed_error(event))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._endpoint.forget(self)

    def close_now(self, reason: str = "closed") -> None:
        """Close at once: CONNECTION_CLOSE is sent now, local operations fail now."""
        if self._error is None:
            self._quic.close(error_code=APPLICATION_NO_ERROR, reason_phrase=reason)
            self._fail(
                ConnectionClosed(f"QUIC connection to {self.remote_addr} was closed locally")
            )
            self.transmit()

    def socket_lost(self) -> None:
        """The UDP socket is gone: nothing can be sent or received any more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(ConnectionClosed(f"QUIC connection to {self.remote_addr}: UDP socket closed"))
