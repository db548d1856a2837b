"""``YamuxConnection`` over real loopback TCP sockets: bulk data, many streams, resets,
closing, keep-alive and a misbehaving raw peer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
import time
from collections.abc import AsyncIterator

import pytest

from security import KeyPair
from transport._base import Connection, Stream
from transport._errors import ConnectionClosed, StreamClosed, StreamReset
from transport._limits import KIB, MIB, MultistreamLimits, YamuxLimits
from transport._multiaddr import Multiaddr
from transport._multistream import handle_protocols, select_protocol_lazy
from transport._yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    encode_header,
)
from transport._yamux_conn import YamuxConnection, YamuxStream

CLIENT_ID = KeyPair.generate().peer_id
SERVER_ID = KeyPair.generate().peer_id
LIMITS = YamuxLimits()
SOCKET_LIMIT = 256 * KIB
Side = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[Side, Side]]:
    accepted: asyncio.Future[Side]
    accepted = asyncio.get_running_loop().create_future()

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, limit=SOCKET_LIMIT)
    port = server.sockets[0].getsockname()[1]
    client_side = await asyncio.open_connection("127.0.0.1", port, limit=SOCKET_LIMIT)
    server_side = await accepted
    try:
        yield client_side, server_side
    finally:
        for _, writer in (client_side, server_side):
            writer.transport.abort()
        server.close()
        await server.wait_closed()


def wrap(
    side: Side,
    *,
    is_client: bool,
    limits: YamuxLimits,
    received: bytes = b"",
) -> YamuxConnection:
    _, writer = side
    local, remote = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    connection = YamuxConnection(
        writer.transport,
        is_client=is_client,
        local_peer=CLIENT_ID if is_client else SERVER_ID,
        remote_peer=SERVER_ID if is_client else CLIENT_ID,
        local_addr=Multiaddr.for_tcp(local[0], local[1]),
        remote_addr=Multiaddr.for_tcp(remote[0], remote[1]),
        limits=limits,
        received=received,
    )
    connection.start()
    return connection


@contextlib.asynccontextmanager
async def connected(
    limits: YamuxLimits = LIMITS,
) -> AsyncIterator[tuple[YamuxConnection, YamuxConnection]]:
    async with socket_pair() as (client_side, server_side):
        client = wrap(client_side, is_client=True, limits=limits)
        server = wrap(server_side, is_client=False, limits=limits)
        try:
            yield client, server
        finally:
            await client.close()
            await server.close()


async def read_all(stream: YamuxStream, chunk: int = 1 * MIB) -> bytes:
    parts = []
    while data := await stream.read(chunk):
        parts.append(data)
    return b"".join(parts)


async def test_fulfils_the_transport_contracts() -> None:
    async with connected() as (client, server):
        assert isinstance(client, Connection)
        stream = await client.open_stream()
        assert isinstance(stream, Stream)
        assert stream.connection is client
        assert client.transport_name == "tcp"
        assert client.local_peer == CLIENT_ID and client.remote_peer == SERVER_ID
        assert client.remote_addr == server.local_addr
        assert not client.is_closed
        await stream.write(b"x")
        inbound = await server.accept_stream()
        assert inbound.stream_id == stream.stream_id == 1


@pytest.mark.timeout(60)
async def test_64_mib_over_one_stream_arrive_intact() -> None:
    payload = random.Random(7).randbytes(64 * MIB)
    async with connected() as (client, server):

        async def send() -> None:
            stream = await client.open_stream()
            view = memoryview(payload)
            for offset in range(0, len(payload), 4 * MIB):
                await stream.write(view[offset : offset + 4 * MIB])
            await stream.close_write()

        async def receive() -> str:
            stream = await server.accept_stream()
            digest = hashlib.sha256()
            while data := await stream.read(1 * MIB):
                digest.update(data)
            return digest.hexdigest()

        started = time.perf_counter()
        _, digest = await asyncio.gather(send(), receive())
        elapsed = time.perf_counter() - started
    assert digest == hashlib.sha256(payload).hexdigest()
    print(f"\nyamux over loopback TCP: 64 MiB in {elapsed:.2f}s = {64 / elapsed:.0f} MiB/s")


@pytest.mark.timeout(30)
async def test_100_concurrent_streams_echo() -> None:
    async with connected() as (client, server):

        async def echo_server() -> None:
            async with asyncio.TaskGroup() as group:
                for _ in range(100):
                    stream = await server.accept_stream()
                    group.create_task(echo(stream))

        async def echo(stream: YamuxStream) -> None:
            await stream.write(await read_all(stream))
            await stream.close()

        async def call(i: int) -> bool:
            stream = await client.open_stream()
            message = i.to_bytes(4, "big") * 2500
            await stream.write(message)
            await stream.close_write()
            return await read_all(stream) == message

        serving = asyncio.create_task(echo_server())
        results = await asyncio.gather(*(call(i) for i in range(100)))
        await serving
    assert all(results)


async def test_reset_propagates_to_pending_reads_and_writes() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"hello")
        inbound = await server.accept_stream()
        assert await inbound.readexactly(5) == b"hello"
        pending_read = asyncio.create_task(inbound.read())
        await asyncio.sleep(0.01)
        stream.reset()
        with pytest.raises(StreamReset, match="reset by the peer"):
            await pending_read
        with pytest.raises(StreamReset):
            await inbound.write(b"too late")
        with pytest.raises(StreamReset, match="reset locally"):
            await stream.read()
        # The connection and its other streams are unaffected.
        other = await client.open_stream()
        await other.write(b"fine")
        assert await (await server.accept_stream()).readexactly(4) == b"fine"


async def test_closing_the_connection_fails_everything_pending() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"hi")
        inbound = await server.accept_stream()
        await inbound.readexactly(2)
        unread = await server.open_stream()
        blocked_write = asyncio.create_task(unread.write(bytes(2 * MIB)))
        await client.accept_stream()  # and never read
        own_read = asyncio.create_task(stream.read())
        own_accept = asyncio.create_task(client.accept_stream())
        peer_read = asyncio.create_task(inbound.read())
        await asyncio.sleep(0.05)
        assert not blocked_write.done()
        await client.close()
        for task in (own_read, own_accept, peer_read, blocked_write):
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(task, 5)
        await asyncio.wait_for(server.wait_closed(), 5)
        assert client.is_closed and server.is_closed
        with pytest.raises(ConnectionClosed):
            await client.open_stream()


async def test_data_received_before_the_close_can_still_be_read() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"last words")
        inbound = await server.accept_stream()
        await client.close()
        await asyncio.wait_for(server.wait_closed(), 5)
        assert await inbound.read() == b"last words"
        with pytest.raises(ConnectionClosed, match="closed by peer"):
            await inbound.read()


async def test_half_close_and_short_readexactly() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"abc")
        await stream.close_write()
        with pytest.raises(StreamClosed):
            await stream.write(b"more")
        inbound = await server.accept_stream()
        with pytest.raises(StreamClosed, match="3 of the 5"):
            await inbound.readexactly(5)
        assert await inbound.read() == b"abc"  # a failed readexactly consumes nothing
        assert await inbound.read() == b""
        await inbound.write(b"reply")
        await inbound.close()
        assert await read_all(stream) == b"reply"


async def test_writer_waits_for_a_slow_reader() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        writing = asyncio.create_task(stream.write(bytes(1 * MIB)))
        inbound = await server.accept_stream()
        await asyncio.sleep(0.1)
        assert not writing.done()  # 256 KiB window, nobody reading
        assert len(await inbound.readexactly(1 * MIB)) == 1 * MIB
        await asyncio.wait_for(writing, 5)


async def test_concurrent_readers_and_writers_on_one_stream() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"?")
        inbound = await server.accept_stream()
        await inbound.readexactly(1)
        readers = [asyncio.create_task(inbound.readexactly(1 * MIB)) for _ in range(2)]
        await asyncio.sleep(0.01)
        await asyncio.gather(stream.write(b"a" * MIB), stream.write(b"b" * MIB))
        first, second = await asyncio.wait_for(asyncio.gather(*readers), 5)
        # Each write arrives contiguous, and neither reader is forgotten.
        assert {first, second} == {b"a" * MIB, b"b" * MIB}


async def test_cancelled_readexactly_loses_nothing() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"12345")
        inbound = await server.accept_stream()
        waiting = asyncio.create_task(inbound.readexactly(10))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.write(b"67")
        assert await inbound.readexactly(0) == b""
        assert await inbound.readexactly(7) == b"1234567"


async def test_closed_stream_discards_and_lets_the_peer_finish() -> None:
    async with connected() as (client, server):
        stream = await client.open_stream()
        await stream.write(b"x")
        inbound = await server.accept_stream()
        await inbound.close()
        with pytest.raises(StreamClosed):
            await inbound.read()
        # More than a window: it only gets through if the closed side keeps granting.
        await asyncio.wait_for(stream.write(bytes(1 * MIB)), 5)
        assert await stream.read() == b""


async def test_lazy_negotiation_over_a_yamux_stream() -> None:
    limits = MultistreamLimits(timeout_s=5.0)
    async with connected() as (client, server):

        async def serve() -> None:
            inbound = await server.accept_stream()
            assert await handle_protocols(inbound, ["/rpc/1"], limits=limits) == "/rpc/1"
            request = await inbound.readexactly(7)
            await inbound.write(request.upper())
            await inbound.close()

        serving = asyncio.create_task(serve())
        stream = await select_protocol_lazy(await client.open_stream(), "/rpc/1", limits=limits)
        await stream.write(b"request")
        assert await stream.readexactly(7) == b"REQUEST"
        assert await stream.read() == b""
        await serving


async def test_go_away_from_the_peer_stops_new_streams() -> None:
    async with connected() as (client, server):
        server._core.go_away()
        server._flush()
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionClosed, match="GoAway"):
            await client.open_stream()
        assert not client.is_closed


async def test_garbage_from_a_raw_peer_gets_go_away_and_close() -> None:
    async with socket_pair() as (raw, server_side):
        server = wrap(server_side, is_client=False, limits=LIMITS)
        reader, writer = raw
        writer.write(bytes.fromhex("07 00 0000 00000001 00000000"))
        seen = await asyncio.wait_for(reader.read(), 5)  # until EOF
        await asyncio.wait_for(server.wait_closed(), 5)
        assert server.is_closed
        assert seen.endswith(encode_header(TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))
        with pytest.raises(ConnectionClosed, match="version 7"):
            await server.accept_stream()
        await server.close()


async def test_silent_peer_is_dropped_by_keepalive() -> None:
    limits = dataclasses.replace(LIMITS, keepalive_s=0.1)
    async with socket_pair() as (raw, server_side):
        server = wrap(server_side, is_client=False, limits=limits)
        reader, _ = raw
        ping = await asyncio.wait_for(reader.readexactly(12), 5)
        assert HEADER.unpack(ping)[1:3] == (TYPE_PING, FLAG_SYN)
        started = time.perf_counter()
        await asyncio.wait_for(server.wait_closed(), 5)
        assert time.perf_counter() - started < 1.0
        with pytest.raises(ConnectionClosed, match="keepalive_s"):
            await server.open_stream()
        await server.close()


async def test_answered_pings_keep_the_connection_and_measure_rtt() -> None:
    limits = dataclasses.replace(LIMITS, keepalive_s=0.2)
    async with connected(limits) as (client, server):
        await asyncio.sleep(0.7)
        assert not client.is_closed and not server.is_closed
        assert client.rtt_s is not None and 0 < client.rtt_s < 1


async def test_bytes_read_before_the_takeover_reach_their_stream() -> None:
    async with socket_pair() as (raw, server_side):
        _, peer = raw
        reader, _ = server_side
        opening = encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
        peer.write(opening + encode_header(TYPE_DATA, 0, 1, 5) + b"ear")
        # What a negotiation read past its end, cut inside a frame.
        early = await reader.readexactly(len(opening) + 12 + 3)
        server = wrap(server_side, is_client=False, limits=LIMITS, received=early)
        peer.write(b"ly" + encode_header(TYPE_DATA, 0, 1, 4) + b" on!")
        stream = await asyncio.wait_for(server.accept_stream(), 5)
        assert await asyncio.wait_for(stream.readexactly(9), 5) == b"early on!"
        peer.transport.abort()
        await server.close()


async def test_an_accepted_stream_is_acknowledged_before_its_reader_waits() -> None:
    async with socket_pair() as (raw, server_side):
        server = wrap(server_side, is_client=False, limits=LIMITS)
        reader, peer = raw
        assert HEADER.unpack(await reader.readexactly(12))[1] == TYPE_PING
        peer.write(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
        stream = await asyncio.wait_for(server.accept_stream(), 5)
        reading = asyncio.create_task(stream.read())
        ack = HEADER.unpack(await asyncio.wait_for(reader.readexactly(12), 5))
        assert ack[1:4] == (TYPE_WINDOW_UPDATE, FLAG_ACK, 1)
        reading.cancel()
        peer.transport.abort()
        await server.close()


async def test_a_reply_follows_the_acknowledgement_and_precedes_the_fin() -> None:
    async with socket_pair() as (raw, server_side):
        server = wrap(server_side, is_client=False, limits=LIMITS)
        reader, peer = raw
        assert HEADER.unpack(await reader.readexactly(12))[1] == TYPE_PING
        peer.write(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
        peer.write(encode_header(TYPE_DATA, 0, 1, 2) + b"hi")
        stream = await asyncio.wait_for(server.accept_stream(), 5)
        assert await stream.readexactly(2) == b"hi"
        await stream.write(b"yo")
        await stream.close()
        frames = await asyncio.wait_for(reader.readexactly(3 * 12 + 2), 5)
        assert HEADER.unpack(frames[:12])[1:4] == (TYPE_WINDOW_UPDATE, FLAG_ACK, 1)
        assert HEADER.unpack(frames[12:24])[1:] == (TYPE_DATA, 0, 1, 2)
        assert frames[24:26] == b"yo"
        assert HEADER.unpack(frames[26:])[1:4] == (TYPE_WINDOW_UPDATE, FLAG_FIN, 1)
        peer.transport.abort()
        await server.close()
