"""yamux (hashicorp/yamux spec.md; libp2p's ``/yamux/1.0.0``) as a sans-IO core.

Every frame starts with a 12-byte big-endian header: version (0), type (Data,
WindowUpdate, Ping, GoAway), flags (SYN, ACK, FIN, RST), stream id, length. For Data
the length counts the payload behind the header; for WindowUpdate it is a window
delta; for Ping an opaque value echoed back; for GoAway an error code. The client opens
odd stream ids, the server even ones; stream 0 is the session. Each direction of a
stream starts with a 256 KiB window that the receiver grows with window updates.

``YamuxSession`` holds no socket, task or clock: the shell calls ``feed(data, now)``
with bytes from the wire, the API methods (``open_stream``, ``accept``, ``send``,
``consume``, ``close_write``, ``reset``, ``ping``, ``go_away``), then sends
``pop_output()`` and handles ``pop_events()``. ``feed`` never raises: bad peer input
becomes a ``ProtocolViolation`` event and a GoAway frame, and the session stops
reading. API misuse raises the transport's typed errors.

Flow control: ``send`` accepts at most the peer's window and returns how much it took
(nothing is buffered here; the shell waits for ``WindowUpdated``). Received data is
delivered as it arrives, even a part of a frame, and its window is granted back when
the application reports it read it with ``consume``. Like go-yamux, a stream whose
reader asks for more window less than four round trips after the previous grant has
its window doubled, up to ``YamuxLimits.max_window_bytes``: bulk transfers get windows
of several MiB, idle or slow streams keep the small initial one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._errors import ConnectionClosed, LimitExceeded, RemoteProtocolError, StreamClosed
from ._limits import KIB, YamuxLimits

HEADER = struct.Struct(">BBHII")
HEADER_BYTES = HEADER.size
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
PROTOCOL_VERSION = 0

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

SPEC_INITIAL_WINDOW = 256 * KIB
"""The window every stream starts with in both directions, fixed by the spec."""
_UINT32_MAX = 0xFFFF_FFFF
MAX_WINDOW = _UINT32_MAX
MAX_STREAM_ID = _UINT32_MAX

INLINE_PAYLOAD_BYTES = 16 * KIB
"""Payloads up to this size are copied into the output next to their header; larger
ones are handed to the shell as views of the caller's buffer."""
_GROWTH_RTTS = 4


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id``; ``accept`` it to acknowledge."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """``data`` arrived on ``stream_id``; call ``consume`` once the application read it."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed ``stream_id``: no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more window on ``stream_id``; blocked writers may continue."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the answer is already queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PingAnswered:
    """The peer answered our ping ``opaque`` after ``rtt_s`` seconds."""

    opaque: int
    rtt_s: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; ``code`` 0 is a normal shutdown."""

    code: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; a GoAway is queued and input is no longer read."""

    error: RemoteProtocolError


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingReceived
    | PingAnswered
    | GoAwayReceived
    | ProtocolViolation
)


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Return the 12-byte header of one frame."""
    return HEADER.pack(PROTOCOL_VERSION, frame_type, flags, stream_id, length)


class _Stream:
    """Per-stream flow-control and half-close state."""

    __slots__ = (
        "accepted",
        "epoch",
        "local_fin",
        "recv_credit",
        "recv_unread",
        "recv_window",
        "remote_fin",
        "send_window",
    )

    def __init__(self, recv_window: int, *, accepted: bool) -> None:
        self.send_window = SPEC_INITIAL_WINDOW
        self.recv_window = recv_window
        self.recv_credit = SPEC_INITIAL_WINDOW
        self.recv_unread = 0
        self.epoch: float | None = None
        self.local_fin = False
        self.remote_fin = False
        self.accepted = accepted


class YamuxSession:
    """One side of a yamux session; see the module docstring for the calling pattern."""

    def __init__(self, *, is_client: bool, limits: YamuxLimits) -> None:
        if limits.initial_window_bytes < SPEC_INITIAL_WINDOW:
            raise ValueError(
                f"YamuxLimits.initial_window_bytes={limits.initial_window_bytes} is below "
                f"the {SPEC_INITIAL_WINDOW} bytes every yamux stream starts with"
            )
        if not limits.initial_window_bytes <= limits.max_window_bytes <= MAX_WINDOW:
            raise ValueError(
                f"YamuxLimits.max_window_bytes={limits.max_window_bytes} must lie between "
                f"initial_window_bytes={limits.initial_window_bytes} and {MAX_WINDOW}"
            )
        self.is_client = is_client
        self.limits = limits
        self._max_frame_bytes = limits.max_frame_bytes
        self._parity = 1 if is_client else 0
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._pending_accept = 0
        self._pings: dict[int, float] = {}
        self._next_ping = 0
        self.rtt_s: float | None = None
        """The latest measured round-trip time, from our pings."""
        self._goaway_sent = False
        self._goaway_received = False
        self._failed = False
        self._events: list[Event] = []
        self._out: list[bytes | memoryview] = []
        self._small: list[bytes] = []
        """Frames not yet in ``_out``: they leave joined, as one buffer."""
        self._header = bytearray()
        self._payload_left = 0
        self._payload_stream = 0
        self._payload_fin = False

    @property
    def stream_count(self) -> int:
        """Streams not yet closed in both directions nor reset."""
        return len(self._streams)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send`` would accept on ``stream_id`` now (0 for an unknown stream)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.send_window

    # -- output and events -------------------------------------------------------------

    @property
    def has_output(self) -> bool:
        """Whether frames wait for ``pop_output``."""
        return bool(self._small or self._out)

    def pop_output(self) -> list[bytes | memoryview]:
        """Buffers to write, in order. Small frames come coalesced into one ``bytes``."""
        if self._small:
            self._seal()
        out = self._out
        self._out = []
        return out

    def _seal(self) -> None:
        """Move the small frames into the output as one buffer."""
        small = self._small
        self._out.append(small[0] if len(small) == 1 else b"".join(small))
        self._small = []

    def pop_events(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    def _frame(self, frame_type: int, flags: int, stream_id: int, length: int) -> None:
        self._small.append(_pack(PROTOCOL_VERSION, frame_type, flags, stream_id, length))

    # -- API ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed:
            raise ConnectionClosed("yamux session ended after the peer broke the protocol")

    def open_stream(self) -> int:
        """Open an outbound stream and return its id (SYN is queued)."""
        self._check_usable()
        if self._goaway_sent or self._goaway_received:
            side = "we" if self._goaway_sent else "the peer"
            raise ConnectionClosed(f"no new yamux streams: {side} sent GoAway")
        if len(self._streams) >= self.limits.max_streams:
            raise LimitExceeded(
                f"{len(self._streams)} open yamux streams reach "
                f"YamuxLimits.max_streams={self.limits.max_streams}",
                value=len(self._streams) + 1,
                limit=self.limits.max_streams,
            )
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise ConnectionClosed("yamux stream ids are exhausted; open a new connection")
        self._next_id += 2
        stream = _Stream(self.limits.initial_window_bytes, accepted=True)
        self._streams[stream_id] = stream
        self._grant(stream_id, stream, FLAG_SYN)
        return stream_id

    def accept(self, stream_id: int) -> None:
        """Acknowledge the inbound ``stream_id`` (ACK is queued with the initial window)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.accepted:
            return
        stream.accepted = True
        self._pending_accept -= 1
        if not self._failed:
            self._grant(stream_id, stream, FLAG_ACK)

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the peer's window allows; return that count.

        A large payload is queued as a view of ``data``: the caller must not modify it
        before the output is written.
        """
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            raise StreamClosed(f"yamux stream {stream_id} is closed for writing")
        size = len(data)
        n = min(size, stream.send_window, self._max_frame_bytes)
        if n <= 0:
            return 0
        stream.send_window -= n
        header = _pack(PROTOCOL_VERSION, TYPE_DATA, 0, stream_id, n)
        payload = data if n == size else data[:n]
        if n <= INLINE_PAYLOAD_BYTES:
            self._small.append(header + payload)
        else:
            self._small.append(header)
            self._seal()
            self._out.append(memoryview(payload))
        return n

    def close_write(self, stream_id: int) -> None:
        """Half-close our direction of ``stream_id`` (FIN is queued)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            return
        stream.local_fin = True
        if not self._failed:
            self._frame(TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0)
        if stream.remote_fin:
            self._forget(stream_id)

    def reset(self, stream_id: int) -> None:
        """Abort ``stream_id`` in both directions (RST is queued)."""
        if stream_id not in self._streams:
            return
        self._forget(stream_id)
        if not self._failed:
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)

    def consume(self, stream_id: int, n: int, now: float) -> bool:
        """The application read ``n`` bytes of ``stream_id``: grant window back as needed.

        Returns whether a window update was queued (output to send).
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        if not 0 <= n <= stream.recv_unread:
            raise ValueError(
                f"consume({n}) on yamux stream {stream_id} holding {stream.recv_unread} unread"
            )
        stream.recv_unread -= n
        if stream.remote_fin or self._failed:
            return False
        owed = stream.recv_window - stream.recv_credit - stream.recv_unread
        if owed * 2 < stream.recv_window:
            return False
        rtt = self.rtt_s
        if (
            rtt is not None
            and stream.epoch is not None
            and now - stream.epoch < _GROWTH_RTTS * rtt
            and stream.recv_window < self.limits.max_window_bytes
        ):
            stream.recv_window = min(stream.recv_window * 2, self.limits.max_window_bytes)
        stream.epoch = now
        self._grant(stream_id, stream, 0)
        return True

    def ping(self, now: float) -> int:
        """Queue a ping and return its opaque value; ``PingAnswered`` follows."""
        self._check_usable()
        opaque = self._next_ping
        self._next_ping = (opaque + 1) & _UINT32_MAX
        self._pings[opaque] = now
        self._frame(TYPE_PING, FLAG_SYN, 0, opaque)
        return opaque

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the peer we accept no new streams (existing ones go on)."""
        if self._goaway_sent or self._failed:
            return
        self._goaway_sent = True
        self._frame(TYPE_GO_AWAY, 0, 0, code)

    def _grant(self, stream_id: int, stream: _Stream, flags: int) -> None:
        delta = stream.recv_window - stream.recv_credit - stream.recv_unread
        stream.recv_credit += delta
        self._frame(TYPE_WINDOW_UPDATE, flags, stream_id, delta)

    def _forget(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id)
        if not stream.accepted:
            self._pending_accept -= 1

    # -- input -------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Process bytes received from the peer. Never raises on their content."""
        if self._failed:
            return
        view = data if type(data) is memoryview else memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        end = len(view)
        pos = 0
        while pos < end:
            left = self._payload_left
            if left:
                take = min(left, end - pos)
                stream_id = self._payload_stream
                if stream_id in self._streams:
                    if take == end and type(data) is bytes:
                        chunk = data
                    else:
                        chunk = view[pos : pos + take].tobytes()
                    self._events.append(DataReceived(stream_id, chunk))
                pos += take
                self._payload_left = left - take
                if take == left and self._payload_fin:
                    self._on_fin(stream_id)
                continue
            if self._header or end - pos < HEADER_BYTES:
                take = min(HEADER_BYTES - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_BYTES:
                    return
                version, frame_type, flags, stream_id, length = HEADER.unpack(self._header)
                self._header.clear()
            else:
                version, frame_type, flags, stream_id, length = _unpack_from(view, pos)
                pos += HEADER_BYTES
            if version != PROTOCOL_VERSION:
                self._violation(f"frame of version {version}, only {PROTOCOL_VERSION} exists")
            elif frame_type == TYPE_DATA:
                self._on_data_header(flags, stream_id, length)
            else:
                self._on_control(frame_type, flags, stream_id, length, now)
            if self._failed:
                return

    def _violation(self, message: str) -> None:
        self._failed = True
        self._events.append(ProtocolViolation(RemoteProtocolError(f"yamux: {message}")))
        self._frame(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)

    def _on_control(
        self, frame_type: int, flags: int, stream_id: int, length: int, now: float
    ) -> None:
        """A frame other than Data."""
        if frame_type == TYPE_WINDOW_UPDATE:
            stream = self._on_stream_flags(flags, stream_id)
            if stream is None:
                return
            if length:
                stream.send_window += length
                if stream.send_window > MAX_WINDOW:
                    self._violation(
                        f"window update of {length} on stream {stream_id} overflows 2**32 - 1"
                    )
                    return
                self._events.append(WindowUpdated(stream_id))
            if flags & FLAG_FIN:
                self._on_fin(stream_id)
        elif frame_type == TYPE_PING:
            if flags & FLAG_SYN:
                self._frame(TYPE_PING, FLAG_ACK, 0, length)
                self._events.append(PingReceived(length))
            elif flags & FLAG_ACK:
                sent = self._pings.pop(length, None)
                if sent is not None:
                    self.rtt_s = now - sent
                    self._events.append(PingAnswered(length, now - sent))
        elif frame_type == TYPE_GO_AWAY:
            self._goaway_received = True
            self._events.append(GoAwayReceived(length))
        else:
            self._violation(f"frame of unknown type {frame_type}")

    def _on_data_header(self, flags: int, stream_id: int, length: int) -> None:
        if length > self._max_frame_bytes:
            self._violation(
                f"data frame of {length} bytes on stream {stream_id} exceeds "
                f"YamuxLimits.max_frame_bytes={self.limits.max_frame_bytes}"
            )
            return
        if flags or not stream_id:
            stream = self._on_stream_flags(flags, stream_id)
            if self._failed:
                return
        else:
            stream = self._streams.get(stream_id)
        fin = stream is not None and bool(flags & FLAG_FIN)
        if stream is not None and length:
            if stream.remote_fin:
                self._violation(f"{length} bytes of data on stream {stream_id} after its FIN")
                return
            if length > stream.recv_credit:
                self._violation(
                    f"data frame of {length} bytes on stream {stream_id} exceeds "
                    f"its receive window of {stream.recv_credit} bytes"
                )
                return
            stream.recv_credit -= length
            stream.recv_unread += length
        if length:
            self._payload_left = length
            self._payload_stream = stream_id if stream is not None else 0
            self._payload_fin = fin
        elif fin:
            self._on_fin(stream_id)

    def _on_stream_flags(self, flags: int, stream_id: int) -> _Stream | None:
        """Apply SYN and RST; return the live stream the frame is for, if any."""
        if stream_id == 0:
            self._violation("stream frame on the session's stream id 0")
            return None
        if flags & FLAG_SYN:
            return self._on_syn(stream_id, flags)
        stream = self._streams.get(stream_id)
        if stream is not None and flags & FLAG_RST:
            self._forget(stream_id)
            self._events.append(StreamReset(stream_id))
            return None
        return stream

    def _on_syn(self, stream_id: int, flags: int) -> _Stream | None:
        if stream_id & 1 == self._parity:
            self._violation(f"peer opened stream {stream_id}, an id of our parity")
            return None
        if stream_id in self._streams:
            self._violation(f"peer opened stream {stream_id} twice")
            return None
        if flags & FLAG_RST:
            return None
        if (
            self._goaway_sent
            or len(self._streams) >= self.limits.max_streams
            or self._pending_accept >= self.limits.max_pending_accept
        ):
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            return None
        stream = _Stream(self.limits.initial_window_bytes, accepted=False)
        self._streams[stream_id] = stream
        self._pending_accept += 1
        self._events.append(StreamOpened(stream_id))
        return stream

    def _on_fin(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_fin:
            return
        stream.remote_fin = True
        self._events.append(StreamEnded(stream_id))
        if stream.local_fin:
            self._forget(stream_id)
