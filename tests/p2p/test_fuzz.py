"""Hostile input at a live Host: random and mutated negotiations and frames on its streams.

Each example opens a raw stream to the Host (no negotiation on our side), writes the
input in random pieces, ends its side and reads until the Host ends the stream. The
Host must answer or close every such stream promptly, log no error, leave no
exception to the event loop, and keep serving a long-lived call and new calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import (
    IDENTIFY_PROTOCOL_ID,
    PING_PROTOCOL_ID,
    Host,
    HostLimits,
    RpcContext,
    RpcLimits,
    RpcReply,
    RpcStream,
)
from p2p._frames import encode_error, encode_message, encode_open
from p2p._negotiate import lazy_prefix
from security import KeyPair
from transport._base import Stream, Transport
from transport._errors import TransportError
from transport._limits import MIB, MultistreamLimits, TransportLimits
from transport._memory import MemoryHub, MemoryTransport
from transport._multiaddr import Multiaddr
from transport._multistream import encode_message as encode_multistream
from transport._tcp import TcpTransport

UNARY, STREAMING, USER = "/fuzz/unary/1", "/fuzz/stream/1", "/fuzz/user/1"
PROTOCOLS = [UNARY, STREAMING, USER, PING_PROTOCOL_ID, IDENTIFY_PROTOCOL_ID, "/not/served/1"]
NEGOTIATION = MultistreamLimits()
LIMITS = HostLimits(
    rpc=RpcLimits(max_frame_bytes=64 * 1024, request_read_timeout_s=5),
    transport=TransportLimits(multistream=MultistreamLimits(timeout_s=5)),
)


async def echo(ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
    return RpcReply(request, payload)


async def echo_stream(ctx: RpcContext, call: RpcStream) -> None:
    while (message := await call.recv()) is not None:
        await call.send(message.value, message.payload)


async def echo_bytes(stream: Stream, peer: object) -> None:
    while data := await stream.read():
        await stream.write(data)


values = st.none() | st.integers(-(2**40), 2**40) | st.text(max_size=20) | st.binary(max_size=20)
frames = st.one_of(
    st.builds(
        lambda v, p, d: (
            encode_message(v, None if p is None else len(p), deadline_s=d, max_frame_bytes=MIB)
            + (p or b"")
        ),
        values,
        st.none() | st.binary(max_size=64),
        st.none() | st.floats(-5, 60, allow_nan=False),
    ),
    st.builds(encode_open, st.none() | st.floats(-5, 60, allow_nan=False)),
    st.builds(encode_error, st.text(max_size=10), st.text(max_size=20)),
)


def mutate(rnd: random.Random, base: bytes) -> bytes:
    """``base`` with up to four random flips, insertions, deletions, cuts or repeats."""
    data = bytearray(base)
    for _ in range(rnd.randrange(5)):
        action = rnd.choice(["flip", "insert", "delete", "truncate", "repeat"])
        at = rnd.randrange(len(data) + 1)
        if action == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << rnd.randrange(8)
        elif action == "insert":
            data[at:at] = rnd.randbytes(rnd.randrange(1, 9))
        elif action == "delete":
            del data[at : at + rnd.randrange(1, 9)]
        elif action == "truncate":
            del data[at:]
        elif action == "repeat":
            data += data[at:]
    return bytes(data)


def hostile(rnd: random.Random, pool: list[bytes]) -> bytes:
    """One hostile stream: noise, or a negotiation and frames, either maybe mutated."""
    kind = rnd.choice(["garbage", "frames", "mutated frames", "mutated negotiation"])
    if kind == "garbage":
        return rnd.randbytes(rnd.randrange(300))
    prefix = lazy_prefix(rnd.choice(PROTOCOLS), NEGOTIATION)
    body = b"".join(rnd.choices(pool, k=rnd.randrange(5)))
    if kind == "frames":
        return prefix + body
    if kind == "mutated frames":
        return prefix + mutate(rnd, body)
    extra = encode_multistream(rnd.choice([*PROTOCOLS, "ls", "na"]), limits=NEGOTIATION)
    return mutate(rnd, prefix + extra + body)


BATCH = 5


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[bytes, list[int]]]:
    """``BATCH`` hostile streams with the points where their bytes are split into writes.

    Hypothesis draws the valid frames and the seed; a seeded generator mutates (fast,
    and still reproducible and shrinkable through the seed).
    """
    pool = draw(st.lists(frames, min_size=1, max_size=6))
    rnd = draw(st.randoms(use_true_random=False))
    return [
        (hostile(rnd, pool), [rnd.randrange(400) for _ in range(rnd.randrange(5))])
        for _ in range(BATCH)
    ]


class Arena:
    """A target Host, a prober Host connected to it, and what went wrong."""

    def __init__(self, make_transport: Callable[[KeyPair], Transport], listen: str) -> None:
        self.make_transport = make_transport
        self.listen = Multiaddr.from_string(listen)
        self.loop_errors: list[dict[str, Any]] = []
        self.thrown = 0

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: self.loop_errors.append(context)
        )
        target_key, prober_key = KeyPair.generate(), KeyPair.generate()
        self.target = Host(target_key, [self.make_transport(target_key)], LIMITS)
        self.prober = Host(prober_key, [self.make_transport(prober_key)], LIMITS)
        self.target.add_rpc_handler(UNARY, echo)
        self.target.add_rpc_stream_handler(STREAMING, echo_stream)
        self.target.set_stream_handler(USER, echo_bytes)
        await self.target.start([self.listen])
        await self.prober.start([])
        await self.prober.connect(self.target.addrs[0])
        self.bystander = await self.prober.rpc_open(self.target.peer_id, STREAMING)

    async def throw(self, data: bytes, cuts: list[int]) -> None:
        (conn,) = self.prober.connections(self.target.peer_id)
        stream = await conn.open_stream()
        try:
            start = 0
            for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
                if cut > start:
                    await stream.write(data[start:cut])
                start = cut
            await stream.close_write()
            async with asyncio.timeout(5):
                while await stream.read():
                    pass
        except TransportError:
            pass
        finally:
            await stream.close()

    async def throw_all(self, batch: list[tuple[bytes, list[int]]]) -> None:
        await asyncio.gather(*(self.throw(data, cuts) for data, cuts in batch))
        self.thrown += len(batch)
        if self.thrown % 500 < len(batch):
            await self.check()

    async def check(self) -> None:
        await self.bystander.send(self.thrown, b"bystander")
        reply = await self.bystander.recv()
        assert reply is not None and reply.value == self.thrown and reply.payload == b"bystander"
        answer = await self.prober.rpc_call(self.target.peer_id, UNARY, "still fine", timeout=5)
        assert answer.value == "still fine"

    async def stop(self) -> None:
        await self.check()
        await self.bystander.aclose()
        assert self.target.connected_peers() == [self.prober.peer_id]
        await self.prober.stop()
        await self.target.stop()


def run_arena(arena: Arena, streams: int, caplog: pytest.LogCaptureFixture) -> None:
    """Throw ``streams`` hostile streams, ``BATCH`` at a time (concurrently) per example."""
    caplog.set_level(logging.WARNING)
    with asyncio.Runner() as runner:
        runner.run(arena.start())

        @settings(
            max_examples=-(-streams // BATCH),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=batches())
        def attack(batch: list[tuple[bytes, list[int]]]) -> None:
            runner.run(arena.throw_all(batch))

        attack()
        runner.run(arena.stop())
    assert arena.thrown >= streams
    assert arena.loop_errors == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.timeout(600)
def test_ten_thousand_hostile_streams_over_memory(caplog: pytest.LogCaptureFixture) -> None:
    hub = MemoryHub()
    arena = Arena(lambda key: MemoryTransport(key, hub=hub), "/memory/0")
    run_arena(arena, 10_000, caplog)


@pytest.mark.timeout(300)
def test_hostile_streams_and_sockets_over_tcp(caplog: pytest.LogCaptureFixture) -> None:
    arena = Arena(TcpTransport, "/ip4/127.0.0.1/tcp/0")
    run_arena(arena, 1_000, caplog)


@pytest.mark.timeout(120)
async def test_garbage_before_the_handshake_leaves_a_tcp_host_serving() -> None:
    """Raw sockets sending noise or broken multistream/TLS openings at the listener."""
    target_key, prober_key = KeyPair.generate(), KeyPair.generate()
    target = Host(target_key, [TcpTransport(target_key)], LIMITS)
    target.add_rpc_handler(UNARY, echo)
    prober = Host(prober_key, [TcpTransport(prober_key)], LIMITS)
    await target.start([Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")])
    await prober.start([])
    host, port = target.listen_addrs[0].host_port()
    rng = random.Random(7)
    openings = [
        encode_multistream("/multistream/1.0.0", limits=NEGOTIATION),
        lazy_prefix("/tls/1.0.0", NEGOTIATION),
        lazy_prefix("/noise", NEGOTIATION),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # the start of a TLS ClientHello
    ]
    try:
        for n in range(60):
            opening = openings[n % len(openings)]
            noise = rng.randbytes(rng.randrange(0, 200))
            reader, writer = await asyncio.open_connection(host, port, family=socket.AF_INET)
            writer.write(opening[: rng.randrange(len(opening) + 1)] + noise)
            writer.write_eof()
            try:
                async with asyncio.timeout(15):
                    await reader.read()
            except (ConnectionError, OSError):
                pass
            writer.close()
            await writer.wait_closed()
        await prober.connect(target.addrs[0])
        assert (await prober.rpc_call(target.peer_id, UNARY, 1, timeout=5)).value == 1
    finally:
        await prober.stop()
        await target.stop()
