"""The yamux core: two ``YamuxSession``s joined by a byte pump on a hand-advanced clock,
frames checked byte for byte against hashicorp/yamux spec.md, and hypothesis feeding
random, mutated and randomly split input."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport._errors import ConnectionClosed, LimitExceeded, StreamClosed
from transport._limits import KIB, MIB, YamuxLimits
from transport._yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    SPEC_INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAnswered,
    PingReceived,
    ProtocolViolation,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxSession,
    encode_header,
)

LIMITS = YamuxLimits()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


def out(session: YamuxSession) -> bytes:
    return b"".join(bytes(buf) for buf in session.pop_output())


def make_pair(limits: YamuxLimits = LIMITS) -> tuple[YamuxSession, YamuxSession]:
    return YamuxSession(is_client=True, limits=limits), YamuxSession(is_client=False, limits=limits)


def transfer(sender: YamuxSession, receiver: YamuxSession, clock: Clock) -> list[Event]:
    receiver.feed(out(sender), clock.now)
    return receiver.pop_events()


def received(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def open_accepted(client: YamuxSession, server: YamuxSession, clock: Clock) -> int:
    stream_id = client.open_stream()
    assert transfer(client, server, clock) == [StreamOpened(stream_id)]
    server.accept(stream_id)
    assert transfer(server, client, clock) == []
    return stream_id


# -- frames byte for byte --------------------------------------------------------------


def test_header_layout_matches_the_spec() -> None:
    # version 0, type 1, flags SYN|ACK, stream 0x01020304, length 0x0A0B0C0D
    assert encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN | FLAG_ACK, 0x01020304, 0x0A0B0C0D) == (
        bytes.fromhex("00 01 0003 01020304 0a0b0c0d")
    )


def test_open_send_close_reset_ping_go_away_frames() -> None:
    client = YamuxSession(is_client=True, limits=LIMITS)
    assert client.open_stream() == 1
    assert out(client) == bytes.fromhex("00 01 0001 00000001 00000000")
    assert client.send(1, b"hello") == 5
    assert out(client) == bytes.fromhex("00 00 0000 00000001 00000005") + b"hello"
    client.close_write(1)
    assert out(client) == bytes.fromhex("00 01 0004 00000001 00000000")
    assert client.open_stream() == 3
    client.reset(3)
    assert out(client) == bytes.fromhex("00 01 0001 00000003 00000000 00 01 0008 00000003 00000000")
    assert client.ping(0.0) == 0
    assert out(client) == bytes.fromhex("00 02 0001 00000000 00000000")
    client.go_away()
    assert out(client) == bytes.fromhex("00 03 0000 00000000 00000000")


def test_server_parses_hand_made_frames_and_answers_ping() -> None:
    server = YamuxSession(is_client=False, limits=LIMITS)
    wire = (
        bytes.fromhex("00 00 0001 00000005 00000003")  # SYN with data on stream 5
        + b"abc"
        + bytes.fromhex("00 02 0001 00000000 0000002a")  # ping 42
        + bytes.fromhex("00 00 0004 00000005 00000000")  # FIN
    )
    server.feed(wire, 0.0)
    assert server.pop_events() == [
        StreamOpened(5),
        DataReceived(5, b"abc"),
        PingReceived(42),
        StreamEnded(5),
    ]
    assert out(server) == bytes.fromhex("00 02 0002 00000000 0000002a")
    server.accept(5)
    assert out(server) == bytes.fromhex("00 01 0002 00000005 00000000")


def test_stream_ids_by_role() -> None:
    client, server = make_pair()
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [server.open_stream() for _ in range(3)] == [2, 4, 6]


def test_larger_initial_window_is_announced_on_open_and_accept() -> None:
    limits = dataclasses.replace(LIMITS, initial_window_bytes=1 * MIB)
    client, server = make_pair(limits)
    clock = Clock()
    stream_id = client.open_stream()
    syn = out(client)
    assert syn == encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 1 * MIB - SPEC_INITIAL_WINDOW)
    server.feed(syn, clock.now)
    assert server.send_window(stream_id) == 1 * MIB
    server.accept(stream_id)
    transfer(server, client, clock)
    assert client.send_window(stream_id) == 1 * MIB


def test_limits_below_the_spec_window_are_refused() -> None:
    with pytest.raises(ValueError, match="initial_window_bytes"):
        YamuxSession(is_client=True, limits=dataclasses.replace(LIMITS, initial_window_bytes=KIB))
    with pytest.raises(ValueError, match="max_window_bytes"):
        YamuxSession(is_client=True, limits=dataclasses.replace(LIMITS, max_window_bytes=128 * KIB))


# -- data and flow control -------------------------------------------------------------


def test_data_both_ways() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    client.send(sid, b"ping?")
    assert received(transfer(client, server, clock), sid) == b"ping?"
    server.send(sid, b"pong!")
    assert received(transfer(server, client, clock), sid) == b"pong!"


def test_window_exhaustion_and_update() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    payload = bytes(range(256)) * 1200  # 300 KiB
    assert client.send(sid, payload) == SPEC_INITIAL_WINDOW
    assert client.send(sid, payload[SPEC_INITIAL_WINDOW:]) == 0
    events = transfer(client, server, clock)
    assert received(events, sid) == payload[:SPEC_INITIAL_WINDOW]
    # Less than half the window read: no update yet.
    assert server.consume(sid, 100 * KIB, clock.now) is False
    assert not server.has_output
    assert out(server) == b""
    assert server.consume(sid, 28 * KIB, clock.now) is True
    assert server.has_output
    update = out(server)
    assert not server.has_output
    assert update == encode_header(TYPE_WINDOW_UPDATE, 0, sid, 128 * KIB)
    client.feed(update, clock.now)
    assert client.pop_events() == [WindowUpdated(sid)]
    assert client.send_window(sid) == 128 * KIB
    rest = payload[SPEC_INITIAL_WINDOW:]
    assert client.send(sid, rest) == len(rest)
    assert received(transfer(client, server, clock), sid) == rest


def test_exceeding_the_window_is_a_violation_with_go_away() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    overflow = encode_header(TYPE_DATA, 0, sid, SPEC_INITIAL_WINDOW + 1)
    server.feed(overflow, clock.now)
    events = server.pop_events()
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert "receive window" in str(events[0].error)
    assert out(server) == encode_header(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)
    server.feed(encode_header(TYPE_PING, FLAG_SYN, 0, 1), clock.now)
    assert server.pop_events() == [] and out(server) == b""
    with pytest.raises(ConnectionClosed):
        server.open_stream()


def test_payload_split_at_every_byte_is_reassembled() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = client.open_stream()
    client.send(sid, b"abcdefgh")
    client.close_write(sid)
    wire = out(client)
    events: list[Event] = []
    for i in range(len(wire)):
        server.feed(wire[i : i + 1], clock.now)
        events += server.pop_events()
    assert events[0] == StreamOpened(sid)
    assert received(events, sid) == b"abcdefgh"
    assert events[-1] == StreamEnded(sid)


def test_large_payload_is_queued_as_a_view_behind_its_header() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    big = bytes(64 * KIB)
    client.send(sid, big)
    buffers = client.pop_output()
    assert buffers[0] == encode_header(TYPE_DATA, 0, sid, len(big))
    assert isinstance(buffers[1], memoryview) and buffers[1].obj is big
    # A chunk holding exactly one payload is delivered without a copy.
    server.feed(buffers[0], clock.now)
    chunk = bytes(buffers[1])
    server.feed(chunk, clock.now)
    (event,) = server.pop_events()
    assert isinstance(event, DataReceived) and event.data is chunk


def test_window_grows_while_the_reader_keeps_up() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    server.ping(clock.now)
    clock.now += 0.010
    transfer(server, client, clock)
    assert isinstance(transfer(client, server, clock)[0], PingAnswered)
    assert server.rtt_s == pytest.approx(0.010)
    windows = []
    for _ in range(12):
        n = client.send(sid, bytes(client.send_window(sid)))
        transfer(client, server, clock)
        clock.now += 0.001  # reads far faster than 4 round trips
        server.consume(sid, n, clock.now)
        transfer(server, client, clock)
        windows.append(client.send_window(sid))
    assert windows[-1] == LIMITS.max_window_bytes
    assert windows == sorted(windows)


def test_window_stays_small_for_a_slow_reader() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    server.ping(clock.now)
    clock.now += 0.001
    transfer(server, client, clock)
    transfer(client, server, clock)
    for _ in range(5):
        n = client.send(sid, bytes(client.send_window(sid)))
        transfer(client, server, clock)
        clock.now += 1.0  # far slower than 4 round trips
        server.consume(sid, n, clock.now)
        transfer(server, client, clock)
        assert client.send_window(sid) == SPEC_INITIAL_WINDOW


def test_consuming_more_than_received_is_a_local_error() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    with pytest.raises(ValueError, match="unread"):
        server.consume(sid, 1, clock.now)


# -- FIN, RST, go-away, limits ---------------------------------------------------------


def test_half_close_both_ways_releases_the_stream() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    client.close_write(sid)
    assert transfer(client, server, clock) == [StreamEnded(sid)]
    with pytest.raises(StreamClosed):
        client.send(sid, b"late")
    server.send(sid, b"still talking")
    assert received(transfer(server, client, clock), sid) == b"still talking"
    server.close_write(sid)
    assert transfer(server, client, clock) == [StreamEnded(sid)]
    assert client.stream_count == server.stream_count == 0


def test_data_after_fin_is_a_violation() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    client.close_write(sid)
    transfer(client, server, clock)
    server.feed(encode_header(TYPE_DATA, 0, sid, 3) + b"bad", clock.now)
    (event,) = server.pop_events()
    assert isinstance(event, ProtocolViolation) and "after its FIN" in str(event.error)


def test_reset_propagates_and_later_frames_are_ignored() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    server.send(sid, b"in flight")
    client.reset(sid)
    assert transfer(client, server, clock) == [StreamReset(sid)]
    assert transfer(server, client, clock) == []
    with pytest.raises(StreamClosed):
        server.send(sid, b"x")
    assert client.stream_count == server.stream_count == 0


def test_go_away_received_forbids_new_streams() -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    server.go_away()
    assert transfer(server, client, clock) == [GoAwayReceived(0)]
    with pytest.raises(ConnectionClosed, match="peer sent GoAway"):
        client.open_stream()
    client.send(sid, b"existing streams go on")
    assert received(transfer(client, server, clock), sid) == b"existing streams go on"


def test_after_our_go_away_inbound_streams_are_refused() -> None:
    client, server = make_pair()
    clock = Clock()
    server.go_away()
    out(server)
    sid = client.open_stream()
    assert transfer(client, server, clock) == []
    assert out(server) == encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
    with pytest.raises(ConnectionClosed, match="we sent GoAway"):
        server.open_stream()


def test_max_streams() -> None:
    limits = dataclasses.replace(LIMITS, max_streams=2)
    client, server = make_pair(limits)
    clock = Clock()
    client.open_stream()
    client.open_stream()
    with pytest.raises(LimitExceeded, match="max_streams=2"):
        client.open_stream()
    transfer(client, server, clock)
    # The server holds two streams now; a third inbound one is refused with RST.
    rogue = YamuxSession(is_client=True, limits=LIMITS)
    for _ in range(3):
        rogue.open_stream()
    server.feed(out(rogue)[-12:], clock.now)
    assert server.pop_events() == []
    assert out(server) == encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, 5, 0)


def test_max_pending_accept() -> None:
    limits = dataclasses.replace(LIMITS, max_pending_accept=2)
    client, server = make_pair(limits)
    clock = Clock()
    first = client.open_stream()
    client.open_stream()
    third = client.open_stream()
    events = transfer(client, server, clock)
    assert events == [StreamOpened(1), StreamOpened(3)]
    refusal = out(server)
    assert refusal == encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, third, 0)
    client.feed(refusal, clock.now)
    assert client.pop_events() == [StreamReset(third)]
    server.accept(first)
    assert out(server) == encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, first, 0)
    fourth = client.open_stream()
    assert transfer(client, server, clock) == [StreamOpened(fourth)]


def test_ping_round_trip_measures_rtt() -> None:
    client, server = make_pair()
    clock = Clock()
    opaque = client.ping(clock.now)
    assert transfer(client, server, clock) == [PingReceived(opaque)]
    clock.now += 0.25
    assert transfer(server, client, clock) == [PingAnswered(opaque, 0.25)]
    assert client.rtt_s == 0.25
    client.feed(encode_header(TYPE_PING, FLAG_ACK, 0, 999), clock.now)
    assert client.pop_events() == []


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (bytes.fromhex("01 00 0000 00000001 00000000"), "version 1"),
        (bytes.fromhex("00 07 0000 00000001 00000000"), "unknown type 7"),
        (encode_header(TYPE_DATA, 0, 0, 0), "stream id 0"),
        (encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), "our parity"),
        (encode_header(TYPE_DATA, FLAG_SYN, 1, 17 * MIB), "max_frame_bytes"),
        (
            encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
            + encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0),
            "twice",
        ),
        (encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0xFFFF_FFFF), "overflows"),
    ],
)
def test_violations(frame: bytes, reason: str) -> None:
    server = YamuxSession(is_client=False, limits=LIMITS)
    server.feed(frame, 0.0)
    events = server.pop_events()
    assert isinstance(events[-1], ProtocolViolation)
    assert reason in str(events[-1].error)
    assert out(server).endswith(encode_header(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))


def test_frames_for_unknown_streams_are_ignored() -> None:
    server = YamuxSession(is_client=False, limits=LIMITS)
    server.feed(
        encode_header(TYPE_DATA, 0, 9, 4)
        + b"late"
        + encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, 9, 10)
        + encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, 9, 0),
        0.0,
    )
    assert server.pop_events() == []
    assert out(server) == b""


# -- hypothesis --------------------------------------------------------------------------


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _check_robust(session: YamuxSession, pieces: list[bytes]) -> None:
    events: list[Event] = []
    for piece in pieces:
        session.feed(piece, 0.0)
        events += session.pop_events()
    output = out(session)
    violations = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(violations) <= 1
    if violations:
        assert events[-1] is violations[0]
        assert output.endswith(encode_header(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))


SMALL = dataclasses.replace(LIMITS, max_streams=4, max_pending_accept=2, max_frame_bytes=1 * MIB)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    for is_client in (True, False):
        _check_robust(YamuxSession(is_client=is_client, limits=SMALL), _split(data, cuts))


def _valid_traffic() -> bytes:
    client = YamuxSession(is_client=True, limits=SMALL)
    a = client.open_stream()
    b = client.open_stream()
    client.send(a, b"first stream data")
    client.send(b, bytes(40 * KIB))
    client.ping(0.0)
    client.close_write(a)
    client.reset(b)
    client.go_away()
    return out(client)


VALID = _valid_traffic()


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), max_size=4),
    cuts=st.lists(st.integers(0, len(VALID)), max_size=10),
    tail=st.binary(max_size=40),
)
def test_fuzz_mutated_valid_traffic(
    flips: list[tuple[int, int]], cuts: list[int], tail: bytes
) -> None:
    wire = bytearray(VALID)
    for position, mask in flips:
        wire[position] ^= mask
    data = bytes(wire) + tail
    _check_robust(YamuxSession(is_client=False, limits=SMALL), _split(data, cuts))
    _check_robust(YamuxSession(is_client=True, limits=SMALL), _split(data, cuts))


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["send", "read", "deliver", "reply"]), st.integers(1, 300_000)),
        max_size=40,
    )
)
def test_random_schedules_deliver_every_byte_in_order(ops: list[tuple[str, int]]) -> None:
    client, server = make_pair()
    clock = Clock()
    sid = open_accepted(client, server, clock)
    sent = bytearray()
    got = bytearray()
    unread = 0
    counter = 0
    for op, size in ops:
        clock.now += 0.001
        if op == "send":
            chunk = bytes((counter + i) % 251 for i in range(min(size, 4096))) * (size // 4096 + 1)
            chunk = chunk[:size]
            counter += 1
            n = client.send(sid, chunk)
            sent += chunk[:n]
        elif op == "deliver":
            events = transfer(client, server, clock)
            assert not any(isinstance(e, ProtocolViolation) for e in events)
            data = received(events, sid)
            got += data
            unread += len(data)
        elif op == "read":
            n = min(size, unread)
            server.consume(sid, n, clock.now)
            unread -= n
        else:
            events = transfer(server, client, clock)
            assert not any(isinstance(e, ProtocolViolation) for e in events)
    got += received(transfer(client, server, clock), sid)
    assert got == sent
