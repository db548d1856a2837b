"""RPC frames: the sans-IO core of Swarm's request/response and streaming calls.

A frame is two uvarints, the msgpack header's length and the raw payload's length,
then the header, then the payload::

    frame   = uvarint(len(header)) uvarint(len(payload)) header payload
    header  = msgpack map
      "v"   the message value (any msgpack value)           message frames
      "p"   true when a raw payload follows (maybe empty)   message frames
      "d"   seconds left until the call's deadline          first frame of a call
      "o"   true: opens a streaming call (no value)         first frame of a stream
      "e"   error code, "m" error message                   error frames
      "i"   call id: the frame belongs to one of the unary calls multiplexed on the stream
      "c"   true: cancels call "i" (no value)                 cancel frames

A caller may carry many unary calls on one stream: each request, reply and error frame
then names its call by "i"; an error frame without "i" ends every call of that stream.
The payload (tensor bytes) never passes through msgpack: a sender writes it as a
memoryview of the caller's buffer, and ``FrameDecoder`` hands it out as a memoryview
over the received chunk, or over one join of the chunks when it spans several, so
each byte is copied at most once. ``FrameDecoder`` never raises on input: a malformed
or oversized frame becomes a ``FrameRejected`` event, after which the decoder ignores
everything (the shell answers with an error frame and closes that stream only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from transport._errors import RemoteProtocolError
from transport._limits import KIB, MIB
from transport._varint import decode_uvarint, encode_uvarint

from ._errors import LimitExceeded


@dataclass(frozen=True, slots=True)
class MessageFrame:
    """A message arrived: ``value`` with an optional raw ``payload``."""

    value: Any
    payload: memoryview | None
    deadline_s: float | None
    """Seconds the sender had left until the call's deadline, when it set one."""
    call_id: int | None = None
    """The call this frame belongs to, on a stream that multiplexes unary calls."""


@dataclass(frozen=True, slots=True)
class CallOpened:
    """A streaming call starts; messages follow in both directions."""

    deadline_s: float | None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """The peer ended the call with an error ``code`` and ``message``."""

    code: str
    message: str
    call_id: int | None = None
    """The call it ends; None ends every call of the stream."""


@dataclass(frozen=True, slots=True)
class CallCancelled:
    """The caller gave up call ``call_id`` of a multiplexed stream."""

    call_id: int


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """The input broke the framing; ``size`` and ``limit`` are set for an oversized frame."""

    reason: str
    size: int | None = None
    limit: int | None = None

    def describe(self, peer: object) -> str:
        if self.size is not None and self.limit is not None:
            return (
                f"RPC frame of {format_bytes(self.size)} from {peer} exceeds "
                f"RpcLimits.max_frame_bytes={format_bytes(self.limit)}"
            )
        return f"malformed RPC frame from {peer}: {self.reason}"


FrameEvent = MessageFrame | CallOpened | ErrorFrame | CallCancelled | FrameRejected
_EMPTY = memoryview(b"")


def format_bytes(count: int) -> str:
    """``9437184`` -> ``"9 MiB"``: sizes the way error messages show them."""
    for unit, size in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", KIB)):
        if count >= size:
            return f"{count / size:.4g} {unit}"
    return f"{count} bytes"


def _too_large(size: int, max_frame_bytes: int) -> LimitExceeded:
    return LimitExceeded(
        f"RPC frame of {format_bytes(size)} to send exceeds "
        f"RpcLimits.max_frame_bytes={format_bytes(max_frame_bytes)}; "
        "send the data in several messages or raise the limit on both sides",
        value=size,
        limit=max_frame_bytes,
    )


def _prefix(header_len: int, payload_len: int) -> bytes:
    if header_len < 0x80 and payload_len < 0x80:
        return bytes((header_len, payload_len))
    return encode_uvarint(header_len) + encode_uvarint(payload_len)


def encode_message(
    value: Any,
    payload_len: int | None,
    *,
    deadline_s: float | None,
    max_frame_bytes: int,
    call_id: int | None = None,
) -> bytes:
    """The frame's prefix and header; the caller writes ``payload_len`` payload bytes after.

    ``payload_len`` None means no payload. Raises ``LimitExceeded`` when the frame would
    be larger than ``max_frame_bytes`` and ``TypeError`` when msgpack cannot pack ``value``.
    """
    header: dict[str, Any] = {"v": value}
    if payload_len is not None:
        header["p"] = True
    if deadline_s is not None:
        header["d"] = deadline_s
    if call_id is not None:
        header["i"] = call_id
    packed = msgpack.packb(header)
    size = len(packed) + (payload_len or 0)
    if size > max_frame_bytes:
        raise _too_large(size, max_frame_bytes)
    return _prefix(len(packed), payload_len or 0) + packed


def encode_open(deadline_s: float | None) -> bytes:
    """The frame that opens a streaming call."""
    header: dict[str, Any] = {"o": True}
    if deadline_s is not None:
        header["d"] = deadline_s
    packed = msgpack.packb(header)
    return _prefix(len(packed), 0) + packed


def encode_error(code: str, message: str, call_id: int | None = None) -> bytes:
    """An error frame (no size check: error messages are short)."""
    header: dict[str, Any] = {"e": str(code), "m": message}
    if call_id is not None:
        header["i"] = call_id
    packed = msgpack.packb(header)
    return _prefix(len(packed), 0) + packed


def encode_cancel(call_id: int) -> bytes:
    """The frame cancelling call ``call_id`` of a multiplexed stream."""
    packed = msgpack.packb({"c": True, "i": call_id})
    return _prefix(len(packed), 0) + packed


def _interpret(header: Any, payload: memoryview, has_payload_bytes: bool) -> FrameEvent:
    if type(header) is not dict:
        return FrameRejected(f"header is a msgpack {type(header).__name__}, not a map")
    call_id = header.get("i")
    if call_id is not None and (type(call_id) is not int or call_id < 0):
        return FrameRejected(f"call id {call_id!r} is not a non-negative integer")
    if header.get("c") is True:
        if call_id is None:
            return FrameRejected("cancel frame without a call id")
        if has_payload_bytes:
            return FrameRejected("cancel frame carries a payload")
        return CallCancelled(call_id)
    if "e" in header:
        code, message = header["e"], header.get("m", "")
        if type(code) is not str or type(message) is not str:
            return FrameRejected("error frame code and message must be strings")
        if has_payload_bytes:
            return FrameRejected("error frame carries a payload")
        return ErrorFrame(code, message, call_id)
    deadline = header.get("d")
    if deadline is not None and (
        (type(deadline) is not float and type(deadline) is not int) or not math.isfinite(deadline)
    ):
        return FrameRejected(f"deadline {deadline!r} is not a finite number of seconds")
    flagged = header.get("p") is True
    if header.get("o") is True:
        if flagged:
            return FrameRejected("the frame opening a call carries a payload")
        if call_id is not None:
            return FrameRejected("the frame opening a streaming call carries a call id")
        return CallOpened(deadline)
    if not flagged:
        if has_payload_bytes:
            return FrameRejected("payload bytes follow a header without the payload flag")
        return MessageFrame(header.get("v"), None, deadline, call_id)
    return MessageFrame(header.get("v"), payload, deadline, call_id)


class FrameDecoder:
    """Cuts a byte stream into frame events; bounded by ``max_frame_bytes``."""

    __slots__ = ("_buf", "_failed", "_header", "_limit", "_need", "_parts")

    def __init__(self, max_frame_bytes: int) -> None:
        self._limit = max_frame_bytes
        self._buf = bytearray()
        """Bytes of an incomplete prefix or header."""
        self._header: Any = None
        self._parts: list[memoryview] = []
        self._need = 0
        """Payload bytes still missing for the current frame."""
        self._failed = False

    @property
    def idle(self) -> bool:
        """True between frames (no partial frame buffered)."""
        return not self._buf and not self._need

    def feed(self, data: bytes | bytearray | memoryview) -> list[FrameEvent]:
        """Consume ``data``; return the events it completes, in order."""
        events: list[FrameEvent] = []
        view = memoryview(data)
        while view and not self._failed:
            if self._need:
                view = self._take_payload(view, events)
            elif self._buf:
                self._buf += view
                consumed = self._parse_head(self._buf, events)
                if not consumed:
                    break
                view = memoryview(self._buf[consumed:])
                self._buf = bytearray()
            else:
                consumed = self._parse_head(view, events)
                if not consumed:
                    if not self._failed:
                        self._buf = bytearray(view)
                    break
                view = view[consumed:]
        return events

    def _reject(self, events: list[FrameEvent], event: FrameRejected) -> int:
        self._failed = True
        self._buf = bytearray()
        self._parts = []
        self._need = 0
        events.append(event)
        return 0

    def _parse_head(self, buf: bytes | bytearray | memoryview, events: list[FrameEvent]) -> int:
        """Parse prefix and header at the start of ``buf``; bytes consumed, 0 if incomplete."""
        if len(buf) > 1 and buf[0] < 0x80 and buf[1] < 0x80:
            header_len, payload_len, start = buf[0], buf[1], 2
        else:
            try:
                first = decode_uvarint(buf)
                if first is None:
                    return 0
                header_len, used = first
                second = decode_uvarint(buf, used)
            except RemoteProtocolError as exc:
                return self._reject(events, FrameRejected(str(exc)))
            if second is None:
                return 0
            payload_len, used2 = second
            start = used + used2
        if header_len + payload_len > self._limit:
            return self._reject(
                events,
                FrameRejected("oversized", size=header_len + payload_len, limit=self._limit),
            )
        end = start + header_len
        if len(buf) < end:
            return 0
        try:
            header = msgpack.unpackb(buf[start:end], strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on bad input
            return self._reject(events, FrameRejected(f"header is not msgpack ({exc})"))
        if payload_len:
            self._header = header
            self._need = payload_len
            return end
        event = _interpret(header, _EMPTY, False)
        if isinstance(event, FrameRejected):
            return self._reject(events, event)
        events.append(event)
        return end

    def _take_payload(self, view: memoryview, events: list[FrameEvent]) -> memoryview:
        take = min(self._need, len(view))
        self._parts.append(view[:take])
        self._need -= take
        if not self._need:
            parts, self._parts = self._parts, []
            payload = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
            event = _interpret(self._header, payload, True)
            self._header = None
            if isinstance(event, FrameRejected):
                self._reject(events, event)
            else:
                events.append(event)
        return view[take:]
