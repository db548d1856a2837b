"""Frames of the NAT protocols: an unsigned-varint length, then one msgpack map.

Decoding is strict and bounded: a frame over its limit, a value that is not a map, or
a truncated frame raise ``PeerProtocolError`` naming the peer's fault.
"""

from __future__ import annotations

from typing import Any

import msgpack

from transport._base import ByteStream
from transport._errors import StreamClosed
from transport._varint import decode_uvarint, encode_uvarint

from .._errors import PeerProtocolError

_MAX_VARINT_BYTES = 5


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return encode_uvarint(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PeerProtocolError(f"malformed NAT protocol frame: {exc}") from None
    if not isinstance(message, dict):
        raise PeerProtocolError(f"NAT protocol frame is a {type(message).__name__}, not a map")
    return message


async def read_frame(stream: ByteStream, max_bytes: int) -> dict[str, Any]:
    """One frame from ``stream``; ``StreamClosed`` at a clean end before any byte."""
    prefix = bytearray()
    while True:
        prefix += await stream.readexactly(1)
        decoded = decode_uvarint(prefix)
        if decoded is not None:
            break
        if len(prefix) >= _MAX_VARINT_BYTES:
            raise PeerProtocolError("NAT protocol frame length prefix is too long")
    size = decoded[0]
    if size > max_bytes:
        raise PeerProtocolError(f"NAT protocol frame of {size} bytes exceeds the limit {max_bytes}")
    try:
        body = await stream.readexactly(size)
    except StreamClosed as exc:
        raise PeerProtocolError(f"NAT protocol frame truncated: {exc}") from None
    return decode_body(body)


def field(message: dict[str, Any], name: str, kind: type) -> Any:
    """``message[name]`` if it is a ``kind``, else ``PeerProtocolError``."""
    value = message.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PeerProtocolError(f"NAT protocol field {name!r} is not a {kind.__name__}")
    return value
