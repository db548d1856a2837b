"""multiformats unsigned-varint: spec vectors, limits, incremental decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport._errors import LimitExceeded, RemoteProtocolError
from transport._varint import MAX_UVARINT, decode_uvarint, encode_uvarint

# The examples of github.com/multiformats/unsigned-varint README.md.
SPEC_VECTORS = [
    (1, "01"),
    (127, "7f"),
    (128, "8001"),
    (255, "ff01"),
    (300, "ac02"),
    (16384, "808001"),
]


@pytest.mark.parametrize(("value", "hex_bytes"), SPEC_VECTORS)
def test_spec_vectors(value: int, hex_bytes: str) -> None:
    encoded = bytes.fromhex(hex_bytes)
    assert encode_uvarint(value) == encoded
    assert decode_uvarint(encoded) == (value, len(encoded))


def test_zero_and_maximum() -> None:
    assert encode_uvarint(0) == b"\x00"
    assert decode_uvarint(b"\x00") == (0, 1)
    top = encode_uvarint(MAX_UVARINT)
    assert top == b"\xff" * 8 + b"\x7f"
    assert decode_uvarint(top) == (MAX_UVARINT, 9)


@given(st.integers(min_value=0, max_value=MAX_UVARINT))
def test_round_trip_and_every_prefix_is_incomplete(value: int) -> None:
    encoded = encode_uvarint(value)
    assert decode_uvarint(b"junk" + encoded + b"tail", 4) == (value, len(encoded))
    for cut in range(len(encoded)):
        assert decode_uvarint(encoded[:cut]) is None


def test_decode_reads_from_offset_and_ignores_what_follows() -> None:
    assert decode_uvarint(bytearray(b"\x05\xac\x02\x07"), 1) == (300, 2)
    assert decode_uvarint(memoryview(b"\xac\x02\xff\xff")) == (300, 2)
    assert decode_uvarint(b"\x01", 1) is None


@pytest.mark.parametrize("encoded", ["8000", "ff00", "808000", "ff8000"])
def test_non_minimal_encodings_are_rejected(encoded: str) -> None:
    with pytest.raises(RemoteProtocolError, match="not minimally encoded"):
        decode_uvarint(bytes.fromhex(encoded))


def test_more_than_nine_bytes_is_rejected_without_waiting_for_the_end() -> None:
    with pytest.raises(RemoteProtocolError, match="9 bytes"):
        decode_uvarint(b"\x80" * 9)
    with pytest.raises(RemoteProtocolError, match="9 bytes"):
        decode_uvarint(b"\xff" * 9 + b"\x01")


def test_encoding_out_of_range_values_is_refused() -> None:
    with pytest.raises(LimitExceeded) as too_big:
        encode_uvarint(MAX_UVARINT + 1)
    assert too_big.value.limit == MAX_UVARINT
    with pytest.raises(LimitExceeded, match="negative"):
        encode_uvarint(-1)


@given(st.binary(max_size=12))
def test_arbitrary_input_decodes_or_raises_the_remote_error(data: bytes) -> None:
    try:
        result = decode_uvarint(data)
    except RemoteProtocolError:
        return
    if result is not None:
        value, consumed = result
        assert encode_uvarint(value) == data[:consumed]
