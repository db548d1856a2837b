"""multistream-select 1.0: the sans-IO cores pumped together, then the asyncio helpers
over a real loopback socket."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport._errors import (
    HandshakeError,
    LimitExceeded,
    RemoteProtocolError,
    StreamClosed,
)
from transport._limits import MultistreamLimits
from transport._multistream import (
    MultistreamDialer,
    MultistreamListener,
    NegotiationFailed,
    ProtocolSelected,
    encode_message,
    handle_protocols,
    select_protocol,
    select_protocol_lazy,
)
from transport._varint import encode_uvarint

LIMITS = MultistreamLimits()
HEADER = b"\x13/multistream/1.0.0\n"


def msg(text: str) -> bytes:
    return encode_message(text, limits=LIMITS)


def pump(dialer: MultistreamDialer, listener: MultistreamListener) -> tuple[bytes, bytes]:
    """Exchange output until both are done or silent; return all bytes each side sent."""
    sent_by_dialer = bytearray()
    sent_by_listener = bytearray()
    while True:
        to_listener = dialer.pop_output()
        to_dialer = listener.pop_output()
        if not to_listener and not to_dialer:
            return bytes(sent_by_dialer), bytes(sent_by_listener)
        sent_by_dialer += to_listener
        sent_by_listener += to_dialer
        listener.feed(to_listener)
        dialer.feed(to_dialer)


# -- cores ---------------------------------------------------------------------------


def test_messages_are_byte_exact() -> None:
    assert msg("/multistream/1.0.0") == HEADER
    assert msg("na") == b"\x03na\n"
    assert msg("/echo/1.0") == bytes.fromhex("0a2f6563686f2f312e300a")


def test_first_proposal_accepted() -> None:
    dialer = MultistreamDialer(["/a/1"], limits=LIMITS)
    listener = MultistreamListener({"/a/1", "/b/1"}, limits=LIMITS)
    sent_by_dialer, sent_by_listener = pump(dialer, listener)
    assert sent_by_dialer == HEADER + msg("/a/1")
    assert sent_by_listener == HEADER + msg("/a/1")
    assert dialer.outcome == ProtocolSelected("/a/1")
    assert listener.outcome == ProtocolSelected("/a/1")
    assert dialer.leftover == listener.leftover == b""


def test_refusal_then_fallback() -> None:
    dialer = MultistreamDialer(["/new/2", "/old/1"], limits=LIMITS)
    listener = MultistreamListener(["/old/1"], limits=LIMITS)
    sent_by_dialer, sent_by_listener = pump(dialer, listener)
    assert sent_by_dialer == HEADER + msg("/new/2") + msg("/old/1")
    assert sent_by_listener == HEADER + msg("na") + msg("/old/1")
    assert dialer.outcome == listener.outcome == ProtocolSelected("/old/1")


def test_all_refused_names_every_protocol_tried() -> None:
    dialer = MultistreamDialer(["/x/1", "/y/1"], limits=LIMITS)
    listener = MultistreamListener(["/z/1"], limits=LIMITS)
    pump(dialer, listener)
    assert isinstance(dialer.outcome, NegotiationFailed)
    error = dialer.outcome.error
    assert isinstance(error, HandshakeError)
    assert "/x/1" in str(error) and "/y/1" in str(error)
    assert listener.outcome is None


def test_ls_is_answered_with_na() -> None:
    listener = MultistreamListener(["/a/1"], limits=LIMITS)
    listener.feed(HEADER + msg("ls"))
    assert listener.pop_output() == HEADER + msg("na")
    assert listener.outcome is None


def test_pipelined_data_after_the_proposal_is_left_over() -> None:
    listener = MultistreamListener(["/rpc/1"], limits=LIMITS)
    listener.feed(HEADER + msg("/rpc/1") + b"request bytes")
    assert listener.outcome == ProtocolSelected("/rpc/1")
    assert listener.leftover == b"request bytes"
    listener.feed(b" and more")
    assert listener.leftover == b"request bytes and more"


def test_next_read_size_never_reaches_past_a_message() -> None:
    wire = HEADER + msg("/a/1") + b"APP"
    listener = MultistreamListener(["/a/1"], limits=LIMITS)
    pos = 0
    while listener.outcome is None:
        size = listener.next_read_size
        assert size >= 1
        listener.feed(wire[pos : pos + size])
        pos += size
    assert wire[pos:] == b"APP"
    assert listener.leftover == b""
    assert listener.next_read_size == 0


def test_dialer_rejects_a_wrong_header() -> None:
    dialer = MultistreamDialer(["/a/1"], limits=LIMITS)
    dialer.feed(msg("/multistream/2.0.0") + msg("/a/1"))
    assert isinstance(dialer.outcome, NegotiationFailed)
    assert isinstance(dialer.outcome.error, RemoteProtocolError)
    assert "/multistream/2.0.0" in str(dialer.outcome.error)


def test_dialer_rejects_an_answer_that_is_neither_echo_nor_na() -> None:
    dialer = MultistreamDialer(["/a/1"], limits=LIMITS)
    dialer.feed(HEADER + msg("/b/1"))
    assert isinstance(dialer.outcome, NegotiationFailed)
    assert "/b/1" in str(dialer.outcome.error) and "/a/1" in str(dialer.outcome.error)


def test_oversized_message_fails_before_its_body_arrives() -> None:
    limits = MultistreamLimits(max_message_bytes=64)
    listener = MultistreamListener(["/a/1"], limits=limits)
    listener.feed(HEADER + encode_uvarint(100_000))
    assert isinstance(listener.outcome, NegotiationFailed)
    error = listener.outcome.error
    assert isinstance(error, RemoteProtocolError)
    assert "100000" in str(error) and "max_message_bytes=64" in str(error)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x04abcd",  # no trailing newline
        b"\x03\xff\xfe\n",  # not UTF-8
        b"\x80\x00",  # non-minimal varint
        b"\x00",  # empty message
        b"\x04a\nb\n",  # newline inside
        b"\x05hello",  # text protocol instead of multistream
    ],
)
def test_garbage_header_fails_with_a_remote_error(garbage: bytes) -> None:
    listener = MultistreamListener(["/a/1"], limits=LIMITS)
    listener.feed(garbage)
    assert isinstance(listener.outcome, NegotiationFailed)
    assert isinstance(listener.outcome.error, RemoteProtocolError)


def test_too_many_proposals_fail_the_listener() -> None:
    limits = MultistreamLimits(max_proposals=3)
    listener = MultistreamListener(["/a/1"], limits=limits)
    listener.feed(HEADER + b"".join(msg(f"/no/{i}") for i in range(3)))
    assert listener.outcome is None
    listener.feed(msg("/no/3"))
    assert isinstance(listener.outcome, NegotiationFailed)
    assert "max_proposals=3" in str(listener.outcome.error)


def test_dialer_checks_its_own_proposals() -> None:
    with pytest.raises(LimitExceeded):
        MultistreamDialer([f"/p/{i}" for i in range(40)], limits=LIMITS)
    with pytest.raises(LimitExceeded, match="max_message_bytes"):
        MultistreamDialer(["/" + "x" * 2000], limits=LIMITS)
    with pytest.raises(ValueError, match="newline"):
        MultistreamDialer(["/a\n/b"], limits=LIMITS)
    with pytest.raises(ValueError):
        MultistreamDialer([], limits=LIMITS)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_fuzz_listener_never_raises(data: bytes, cuts: list[int]) -> None:
    listener = MultistreamListener(["/a/1", "/b/1"], limits=MultistreamLimits(max_proposals=4))
    for piece in _split(HEADER + data, cuts):
        listener.feed(piece)
    listener.pop_output()
    if isinstance(listener.outcome, NegotiationFailed):
        assert isinstance(listener.outcome.error, RemoteProtocolError)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=8),
    position=st.integers(0, 80),
    flip=st.integers(1, 255),
)
def test_fuzz_mutated_negotiation(data: bytes, cuts: list[int], position: int, flip: int) -> None:
    wire = bytearray(HEADER + msg("/x/1") + msg("/b/1") + data)
    position %= len(wire)
    wire[position] ^= flip
    listener = MultistreamListener(["/a/1", "/b/1"], limits=LIMITS)
    dialer = MultistreamDialer(["/x/1", "/b/1"], limits=LIMITS)
    for piece in _split(bytes(wire), cuts):
        listener.feed(piece)
        dialer.feed(piece)
    for core in (listener, dialer):
        if isinstance(core.outcome, ProtocolSelected):
            assert core.outcome.protocol in ("/a/1", "/b/1", "/x/1")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- asyncio helpers over a loopback socket ------------------------------------------


class SocketStream:
    """A ``Stream`` over an asyncio socket pair, recording what it read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.was_reset = False

    @property
    def connection(self) -> None:
        return None

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise StreamClosed(f"ended after {len(exc.partial)} of {n} bytes") from None

    async def read(self, max_bytes: int = 65536) -> bytes:
        return await self.reader.read(max_bytes)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close_write(self) -> None:
        self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        self.was_reset = True
        self.writer.transport.abort()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    accepted: asyncio.Future[SocketStream] = asyncio.get_running_loop().create_future()

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(SocketStream(reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    dialer_side = SocketStream(reader, writer)
    listener_side = await accepted
    yield dialer_side, listener_side
    for side in (dialer_side, listener_side):
        side.writer.close()
    server.close()
    await server.wait_closed()


FAST = dataclasses.replace(LIMITS, timeout_s=2.0)


async def test_select_and_handle_agree_and_leave_no_leftovers(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair

    async def dial() -> str:
        chosen = await select_protocol(dialer_side, ["/new/2", "/old/1"], limits=FAST)
        await dialer_side.write(b"payload")
        return chosen

    chosen, handled = await asyncio.gather(
        dial(), handle_protocols(listener_side, ["/old/1"], limits=FAST)
    )
    assert chosen == handled == "/old/1"
    assert await listener_side.readexactly(7) == b"payload"


async def test_all_refused_raises_handshake_error(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair
    listening = asyncio.create_task(handle_protocols(listener_side, ["/z/1"], limits=FAST))
    with pytest.raises(HandshakeError, match="/x/1"):
        await select_protocol(dialer_side, ["/x/1"], limits=FAST)
    listening.cancel()
    await asyncio.wait([listening])


async def test_lazy_writes_before_the_listener_answers(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair

    async def strict_listener() -> bytes:
        # Read proposal and request before answering: a dialer waiting for the echo
        # would deadlock here.
        request = await listener_side.readexactly(len(HEADER + msg("/rpc/1")) + 5)
        await listener_side.write(HEADER + msg("/rpc/1") + b"reply")
        return request

    listening = asyncio.create_task(strict_listener())
    lazy = await select_protocol_lazy(dialer_side, "/rpc/1", limits=FAST)  # type: ignore[arg-type]
    assert lazy.protocol == "/rpc/1"
    await lazy.write(b"hello")
    assert await lazy.readexactly(5) == b"reply"
    assert await listening == HEADER + msg("/rpc/1") + b"hello"


async def test_lazy_refusal_surfaces_on_first_read_and_resets(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair
    lazy = await select_protocol_lazy(dialer_side, "/rpc/2", limits=FAST)  # type: ignore[arg-type]
    await lazy.write(b"hello")
    await listener_side.write(HEADER + msg("na"))
    with pytest.raises(HandshakeError, match="/rpc/2"):
        await lazy.read()
    assert dialer_side.was_reset


async def test_lazy_garbage_echo_is_a_remote_error(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair
    lazy = await select_protocol_lazy(dialer_side, "/rpc/1", limits=FAST)  # type: ignore[arg-type]
    await listener_side.write(HEADER + b"\x05hello")
    with pytest.raises(RemoteProtocolError, match="newline"):
        await lazy.readexactly(1)
    assert dialer_side.was_reset


async def test_silent_peer_times_out(pair: tuple[SocketStream, SocketStream]) -> None:
    dialer_side, _ = pair
    limits = dataclasses.replace(LIMITS, timeout_s=0.2)
    with pytest.raises(HandshakeError, match=r"timeout_s=0\.2"):
        await select_protocol(dialer_side, ["/a/1"], limits=limits)


async def test_peer_closing_mid_negotiation_is_stream_closed(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair

    async def leave_early() -> None:
        await listener_side.readexactly(len(HEADER + msg("/a/1")))
        await listener_side.write(HEADER[:5])
        listener_side.writer.close()

    leaving = asyncio.create_task(leave_early())
    with pytest.raises(StreamClosed):
        await select_protocol(dialer_side, ["/a/1"], limits=FAST)
    await leaving


async def test_lazy_stream_delegates_the_stream_api(
    pair: tuple[SocketStream, SocketStream],
) -> None:
    dialer_side, listener_side = pair
    lazy = await select_protocol_lazy(dialer_side, "/rpc/1", limits=FAST)  # type: ignore[arg-type]
    assert lazy.connection is None
    await listener_side.write(HEADER + msg("/rpc/1") + b"data")
    assert await lazy.read(100) == b"data"
    await lazy.close_write()
    assert await listener_side.readexactly(len(HEADER + msg("/rpc/1"))) == HEADER + msg("/rpc/1")
    assert await listener_side.read() == b""
    lazy.reset()
    assert dialer_side.was_reset
