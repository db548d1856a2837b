"""Unsigned LEB128 varints as multiformats defines them (``unsigned-varint``).

Seven value bits per byte, least significant group first, the high bit set on every
byte but the last. multiformats caps a varint at 9 bytes (63 bits) and requires the
minimal encoding, so a decoder rejects ``0x80 0x00`` (zero in two bytes) as well as a
tenth byte. Decoding is incremental: it answers ``None`` until the buffer holds the
whole varint, which is what length-prefixed framing over a byte stream needs.
"""

from __future__ import annotations

from ._errors import LimitExceeded, RemoteProtocolError

MAX_UVARINT_BYTES = 9
MAX_UVARINT = (1 << (7 * MAX_UVARINT_BYTES)) - 1


def encode_uvarint(value: int) -> bytes:
    """Return the minimal encoding of ``value`` (0 to 2**63 - 1)."""
    if value < 0x80:
        if value < 0:
            raise LimitExceeded(f"uvarint value {value} is negative", value=value, limit=0)
        return bytes((value,))
    if value > MAX_UVARINT:
        raise LimitExceeded(
            f"uvarint value {value} exceeds the multiformats maximum 2**63 - 1",
            value=value,
            limit=MAX_UVARINT,
        )
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_uvarint(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode the varint starting at ``buf[offset]``.

    Returns ``(value, consumed)`` or ``None`` while the varint is incomplete; raises
    ``RemoteProtocolError`` for a varint longer than 9 bytes or not minimally encoded.
    """
    end = len(buf)
    if offset < end:
        first = buf[offset]
        if first < 0x80:
            return first, 1
    value = 0
    shift = 0
    pos = offset
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0:
                raise RemoteProtocolError(
                    f"uvarint of {pos - offset} bytes is not minimally encoded "
                    "(its last byte is 0x00)"
                )
            return value, pos - offset
        shift += 7
        if pos - offset >= MAX_UVARINT_BYTES:
            raise RemoteProtocolError(
                f"uvarint longer than the multiformats maximum of {MAX_UVARINT_BYTES} bytes"
            )
    return None
