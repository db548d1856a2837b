"""The RPC frame core, fed by hand: round trips, splits, limits, malformed input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import LimitExceeded
from p2p._frames import (
    CallCancelled,
    CallOpened,
    ErrorFrame,
    FrameDecoder,
    FrameRejected,
    MessageFrame,
    encode_cancel,
    encode_error,
    encode_message,
    encode_open,
    format_bytes,
)
from transport._limits import MIB
from transport._varint import encode_uvarint

LIMIT = 16 * MIB

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


def frame(value: Any, payload: bytes | None = None, deadline_s: float | None = None) -> bytes:
    head = encode_message(
        value,
        None if payload is None else len(payload),
        deadline_s=deadline_s,
        max_frame_bytes=LIMIT,
    )
    return head + (payload or b"")


def feed_split(data: bytes, cuts: list[int], limit: int = LIMIT) -> list[Any]:
    decoder = FrameDecoder(limit)
    events = []
    start = 0
    for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
        events += decoder.feed(data[start:cut])
        start = cut
    return events


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.tuples(values, st.none() | st.binary(max_size=300), st.none() | st.floats(0, 1e6)),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_any_split_of_frames_decodes_to_the_same_messages(
    messages: list[tuple[Any, bytes | None, float | None]], cuts: list[int]
) -> None:
    wire = b"".join(frame(v, p, d) for v, p, d in messages) + encode_error("x", "why")
    events = feed_split(wire, cuts)
    assert len(events) == len(messages) + 1
    for event, (value, payload, deadline) in zip(events, messages, strict=False):
        assert isinstance(event, MessageFrame)
        assert event.value == msgpack.unpackb(msgpack.packb(value), strict_map_key=False)
        assert (None if event.payload is None else bytes(event.payload)) == payload
        assert event.deadline_s == deadline
    assert events[-1] == ErrorFrame("x", "why")


def test_single_chunk_payload_is_not_copied() -> None:
    wire = frame("v", b"p" * 1000)
    (event,) = FrameDecoder(LIMIT).feed(wire)
    assert isinstance(event, MessageFrame) and event.payload is not None
    assert event.payload.obj is wire


def test_open_frame_and_empty_payload() -> None:
    events = FrameDecoder(LIMIT).feed(encode_open(2.5) + frame(None, b"") + encode_open(None))
    assert events[0] == CallOpened(2.5)
    assert isinstance(events[1], MessageFrame) and events[1].payload == b""
    assert events[2] == CallOpened(None)


def test_oversized_frame_is_rejected_before_its_bytes_arrive() -> None:
    decoder = FrameDecoder(4 * MIB)
    head = encode_message(None, 9 * MIB, deadline_s=None, max_frame_bytes=LIMIT)
    (event,) = decoder.feed(head)
    assert isinstance(event, FrameRejected)
    assert event.describe("12D3KooWpeer").startswith("RPC frame of 9 MiB from 12D3KooWpeer")
    assert event.describe("p").endswith("exceeds RpcLimits.max_frame_bytes=4 MiB")
    assert decoder.feed(b"\0" * 100) == []


def test_sender_checks_its_limit() -> None:
    with pytest.raises(LimitExceeded, match=r"RPC frame of 2 MiB to send exceeds") as caught:
        encode_message(None, 2 * MIB, deadline_s=None, max_frame_bytes=MIB)
    assert caught.value.limit == MIB


def raw(header: object, payload: bytes = b"") -> bytes:
    """A frame with any msgpack header, bypassing the encoder's checks."""
    packed = msgpack.packb(header)
    return encode_uvarint(len(packed)) + encode_uvarint(len(payload)) + packed + payload


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x80\x00", "not minimally encoded"),
        (b"\xff" * 10, "longer than"),
        (raw(5), "not a map"),
        (encode_uvarint(3) + b"\x00" + b"\xc1\xc1\xc1", "not msgpack"),
        (encode_uvarint(0) + b"\x00", "not msgpack"),
        (raw({"v": 1}, b"x"), "without the payload flag"),
        (raw({"v": 1, "d": "soon"}), "deadline"),
        (raw({"v": 1, "d": float("inf")}), "deadline"),
        (raw({"e": 3}), "must be strings"),
        (raw({"e": "x", "m": "y"}, b"z"), "carries a payload"),
        (raw({"o": True, "p": True}, b"z"), "carries a payload"),
    ],
)
def test_malformed_input_becomes_a_rejection(wire: bytes, reason: str) -> None:
    events = FrameDecoder(LIMIT).feed(wire)
    assert len(events) == 1 and isinstance(events[0], FrameRejected)
    assert reason in events[0].reason


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_garbage_never_raises(data: bytes, cuts: list[int]) -> None:
    events = feed_split(data, cuts, limit=1024)
    assert all(
        isinstance(e, MessageFrame | CallOpened | ErrorFrame | FrameRejected) for e in events
    )
    assert sum(isinstance(e, FrameRejected) for e in events) <= 1


def test_format_bytes() -> None:
    assert format_bytes(9 * MIB) == "9 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(12) == "12 bytes"


def test_call_ids_name_the_call_of_each_frame() -> None:
    wire = (
        encode_message("q", 2, deadline_s=1.5, max_frame_bytes=LIMIT, call_id=7)
        + b"pp"
        + encode_error("x", "why", 7)
        + encode_cancel(2**40)
        + encode_error("y", "all")
    )
    events = FrameDecoder(LIMIT).feed(wire)
    assert events[0] == MessageFrame("q", memoryview(b"pp"), 1.5, 7)
    assert events[1:] == [ErrorFrame("x", "why", 7), CallCancelled(2**40), ErrorFrame("y", "all")]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"v": 1, "i": -1}, "call id -1"),
        ({"v": 1, "i": "7"}, "call id '7'"),
        ({"v": 1, "i": True}, "call id True"),
        ({"c": True}, "cancel frame without a call id"),
        ({"o": True, "i": 1}, "opening a streaming call carries a call id"),
    ],
)
def test_bad_call_ids_are_rejected(header: dict[str, Any], reason: str) -> None:
    packed = msgpack.packb(header)
    events = FrameDecoder(LIMIT).feed(encode_uvarint(len(packed)) + b"\x00" + packed)
    assert len(events) == 1 and isinstance(events[0], FrameRejected)
    assert reason in events[0].reason
