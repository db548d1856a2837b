"""A tiny protobuf wire-format codec, enough for libp2p's identify message.

Encodes length-delimited fields (bytes, strings, embedded messages); decodes any
message into ``(field number, value)`` pairs, keeping varint fields as ``int`` and
length-delimited ones as ``bytes`` and skipping fixed32/fixed64 fields, so a reader
tolerates fields it does not know. Protobuf varints are not multiformats varints (they
run to 10 bytes and need not be minimal), hence their own reader here.
"""

from __future__ import annotations

from collections.abc import Iterable

from transport._varint import encode_uvarint

from ._errors import PeerProtocolError

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5
_MAX_VARINT_BYTES = 10


def encode_fields(fields: Iterable[tuple[int, bytes | str]]) -> bytes:
    """Encode ``(field number, bytes or str)`` pairs as length-delimited fields."""
    out = bytearray()
    for number, value in fields:
        raw = value.encode() if isinstance(value, str) else value
        out += encode_uvarint(number << 3 | _LENGTH_DELIMITED)
        out += encode_uvarint(len(raw))
        out += raw
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos + index >= len(data):
            raise PeerProtocolError(f"protobuf varint at byte {pos} is truncated")
        byte = data[pos + index]
        value |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return value, pos + index + 1
    raise PeerProtocolError(f"protobuf varint at byte {pos} is longer than 10 bytes")


def decode_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one message into ``(field number, value)`` pairs in wire order.

    Raises ``PeerProtocolError`` for truncated input, field number 0 or group wire types.
    """
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise PeerProtocolError("protobuf field number 0 is invalid")
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
            fields.append((number, value))
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise PeerProtocolError(
                    f"protobuf field {number} needs {length} bytes, only {len(data) - pos} remain"
                )
            fields.append((number, data[pos : pos + length]))
            pos += length
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
            if pos > len(data):
                raise PeerProtocolError(f"protobuf fixed-width field {number} is truncated")
        else:
            raise PeerProtocolError(
                f"protobuf wire type {wire_type} (field {number}) is unsupported"
            )
    return fields
