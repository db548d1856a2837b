"""The QUIC transport on real UDP sockets on loopback: libp2p TLS, one socket, typed failures."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aioquic.asyncio import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection as AioquicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicProtocolVersion
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from security import LIBP2P_ALPN, KeyPair, make_tls_certificate
from transport._base import Connection, Listener, Stream, Transport
from transport._errors import (
    ConnectionClosed,
    DialError,
    HandshakeError,
    MultiaddrError,
    PeerIdMismatch,
)
from transport._limits import KIB, MIB, QuicLimits
from transport._multiaddr import Multiaddr
from transport._quic import QuicTransport
from transport._quic_engine import BAD_CERTIFICATE

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = Multiaddr.from_string("/ip4/127.0.0.1/udp/0/quic-v1")
WAIT_S = 5.0
TINY = dataclasses.replace(
    QuicLimits(), idle_timeout_s=1.0, keepalive_s=0.25, stream_send_buffer_bytes=64 * KIB
)


class Peer:
    """A QuicTransport whose authenticated inbound connections land in a queue."""

    def __init__(self, limits: QuicLimits = QuicLimits(), identity: KeyPair | None = None) -> None:  # noqa: B008
        self.identity = identity or KeyPair.generate()
        self.transport = QuicTransport(self.identity, limits)
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.listener: Listener | None = None

    async def listen(self, addr: Multiaddr = LOOPBACK) -> Peer:
        self.listener = await self.transport.listen(addr, self._on_connection)
        return self

    async def _on_connection(self, conn: Connection) -> None:
        await self.accepted.put(conn)

    @property
    def addr(self) -> Multiaddr:
        assert self.listener is not None
        return self.listener.addrs[0]

    async def next_connection(self) -> Connection:
        async with asyncio.timeout(WAIT_S):
            return await self.accepted.get()


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    async with asyncio.timeout(WAIT_S):
        for peer in made:
            await peer.transport.close()


def make_peer(
    peers: list[Peer],
    limits: QuicLimits = QuicLimits(),  # noqa: B008
    identity: KeyPair | None = None,
) -> Peer:
    peer = Peer(limits, identity)
    peers.append(peer)
    return peer


async def connect(
    peers: list[Peer],
    limits: QuicLimits = QuicLimits(),  # noqa: B008
) -> tuple[Peer, Peer, Connection, Connection]:
    server = await make_peer(peers, limits).listen()
    client = make_peer(peers, limits)
    async with asyncio.timeout(WAIT_S):
        outbound = await client.transport.dial(server.addr, server.identity.peer_id)
    return server, client, outbound, await server.next_connection()


async def serve_echo(conn: Connection) -> None:
    async def echo(stream: Stream) -> None:
        while chunk := await stream.read():
            await stream.write(chunk)
        await stream.close_write()

    tasks = set()
    try:
        while True:
            stream = await conn.accept_stream()
            tasks.add(asyncio.get_running_loop().create_task(echo(stream)))
    except ConnectionClosed:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_all(stream: Stream, chunk: int = 1 << 20) -> bytes:
    parts = []
    while data := await stream.read(chunk):
        parts.append(data)
    return b"".join(parts)


def plain_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A valid self-signed certificate without the libp2p public-key extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-a-libp2p-peer")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate, key


async def raw_client_handshake(
    configuration: QuicConfiguration, server: Multiaddr
) -> tuple[bool, ConnectionTerminated | None]:
    """Run a bare aioquic client against ``server`` on a loopback socket.

    Returns whether the server confirmed the handshake (HANDSHAKE_DONE) and how the
    connection ended, if it did within ``WAIT_S``.
    """
    loop = asyncio.get_running_loop()
    host, port = server.host_port()
    quic = AioquicConnection(configuration=configuration)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        quic.connect((host, port), now=loop.time())
        deadline = loop.time() + WAIT_S
        while loop.time() < deadline:
            for data, addr in quic.datagrams_to_send(now=loop.time()):
                sock.sendto(data, addr)
            timer = quic.get_timer()
            wait = min(deadline, timer if timer is not None else deadline) - loop.time()
            try:
                async with asyncio.timeout(max(wait, 0.001)):
                    data, addr = await loop.sock_recvfrom(sock, 65535)
                quic.receive_datagram(data, addr, now=loop.time())
            except TimeoutError:
                quic.handle_timer(now=loop.time())
            while (event := quic.next_event()) is not None:
                if isinstance(event, ConnectionTerminated):
                    return quic._handshake_confirmed, event
            if quic._close_event is not None:
                return quic._handshake_confirmed, quic._close_event
        return quic._handshake_confirmed, None


class _Forger(KeyPair):
    """An identity whose signatures are garbage: its certificate proves nobody."""

    __slots__ = ()

    def sign(self, data: bytes) -> bytes:
        return bytes(64)


# authentication


async def test_connect_authenticates_both_sides(peers: list[Peer]) -> None:
    server, client, outbound, inbound = await connect(peers)
    assert isinstance(client.transport, Transport) and isinstance(server.listener, Listener)
    assert isinstance(outbound, Connection) and isinstance(inbound, Connection)
    assert isinstance(await outbound.open_stream(), Stream)
    assert outbound.transport_name == inbound.transport_name == "quic"
    assert outbound.local_peer == client.identity.peer_id
    assert outbound.remote_peer == server.identity.peer_id
    assert inbound.local_peer == server.identity.peer_id
    assert inbound.remote_peer == client.identity.peer_id
    assert outbound.remote_addr == server.addr
    assert inbound.remote_addr.host_port()[1] == outbound.local_addr.host_port()[1]


async def test_expected_peer_comes_from_the_p2p_part_too(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    client = make_peer(peers)
    stranger = KeyPair.generate().peer_id
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(PeerIdMismatch) as caught:
            await client.transport.dial(server.addr, stranger)
        with pytest.raises(PeerIdMismatch):
            await client.transport.dial(server.addr.with_p2p(stranger))
        conn = await client.transport.dial(server.addr.with_p2p(server.identity.peer_id))
    assert caught.value.expected == stranger
    assert caught.value.actual == server.identity.peer_id
    assert conn.remote_peer == server.identity.peer_id
    assert server.accepted.qsize() == 1, "refused dials never reach the handler"


async def test_client_certificate_without_libp2p_extension_is_refused(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    certificate, key = plain_certificate()
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[LIBP2P_ALPN],
        verify_mode=ssl.CERT_NONE,
        certificate=certificate,
        private_key=key,
    )
    confirmed, ended = await raw_client_handshake(configuration, server.addr)
    assert not confirmed, "the server must not confirm a handshake it refuses"
    assert ended is not None and ended.error_code == BAD_CERTIFICATE
    assert "libp2p" in ended.reason_phrase
    assert server.accepted.empty()
    client = make_peer(peers)
    async with asyncio.timeout(WAIT_S):
        conn = await client.transport.dial(server.addr, server.identity.peer_id)
    assert conn.remote_peer == server.identity.peer_id, "the listener keeps serving"


async def test_client_without_certificate_is_refused(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[LIBP2P_ALPN], verify_mode=ssl.CERT_NONE
    )
    confirmed, ended = await raw_client_handshake(configuration, server.addr)
    assert not confirmed
    assert ended is not None and ended.error_code == BAD_CERTIFICATE


async def test_dial_with_a_forged_identity_fails_with_handshake_error(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    forger = make_peer(peers, identity=_Forger.generate())
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(HandshakeError, match=r"failed \(code 0x12a"):
            await forger.transport.dial(server.addr, server.identity.peer_id)
        honest = make_peer(peers)
        conn = await honest.transport.dial(server.addr, server.identity.peer_id)
    assert conn.remote_peer == server.identity.peer_id
    assert server.accepted.qsize() == 1


async def test_server_without_libp2p_certificate_fails_dial(peers: list[Peer]) -> None:
    certificate, key = plain_certificate()
    configuration = QuicConfiguration(
        is_client=False, alpn_protocols=[LIBP2P_ALPN], certificate=certificate, private_key=key
    )
    server = await serve("127.0.0.1", 0, configuration=configuration)
    try:
        port = server._transport.get_extra_info("sockname")[1]
        client = make_peer(peers)
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(HandshakeError, match="libp2p public-key extension"):
                await client.transport.dial(Multiaddr.for_quic("127.0.0.1", port))
    finally:
        server.close()


# streams


async def test_echo_on_many_streams(peers: list[Peer]) -> None:
    _, _, outbound, inbound = await connect(peers)
    echo = asyncio.get_running_loop().create_task(serve_echo(inbound))
    try:
        async with asyncio.timeout(WAIT_S * 2):
            for i in range(50):
                stream = await outbound.open_stream()
                message = f"message {i} ".encode() * (i + 1)
                await stream.write(message)
                assert await stream.readexactly(len(message)) == message
                await stream.close_write()
                assert await stream.read() == b""
    finally:
        echo.cancel()
        await asyncio.gather(echo, return_exceptions=True)


@pytest.mark.timeout(300)
async def test_64_mib_over_one_stream_arrive_intact(peers: list[Peer]) -> None:
    _, _, outbound, inbound = await connect(peers)
    payload = os.urandom(64 * MIB)
    sender = await outbound.open_stream()

    async def send() -> None:
        await sender.write(payload)
        await sender.close_write()

    started = time.perf_counter()
    task = asyncio.get_running_loop().create_task(send())
    async with asyncio.timeout(240):
        receiver = await inbound.accept_stream()
        digest = hashlib.sha256()
        size = 0
        while data := await receiver.read(1 << 20):
            digest.update(data)
            size += len(data)
        await task
    elapsed = time.perf_counter() - started
    assert size == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    print(f"\nQUIC, one stream, 64 MiB: {64 / elapsed:.1f} MiB/s ({elapsed:.1f} s)")


async def test_hundred_concurrent_streams(peers: list[Peer]) -> None:
    _, _, outbound, inbound = await connect(peers)
    echo = asyncio.get_running_loop().create_task(serve_echo(inbound))

    async def round_trip(i: int) -> bytes:
        stream = await outbound.open_stream()
        await stream.write(i.to_bytes(2, "big") * (1000 + 97 * i))
        await stream.close_write()
        return await read_all(stream)

    try:
        async with asyncio.timeout(30):
            replies = await asyncio.gather(*(round_trip(i) for i in range(100)))
    finally:
        echo.cancel()
        await asyncio.gather(echo, return_exceptions=True)
    assert replies == [i.to_bytes(2, "big") * (1000 + 97 * i) for i in range(100)]


async def test_stream_write_waits_for_acknowledgements(peers: list[Peer]) -> None:
    limits = dataclasses.replace(QuicLimits(), stream_send_buffer_bytes=256 * KIB)
    _, _, outbound, inbound = await connect(peers, limits)
    stream = await outbound.open_stream()
    quic = outbound._quic  # the aioquic connection: how much it holds for the stream
    peak = 0

    async def send() -> None:
        nonlocal peak
        for _ in range(32):
            await stream.write(bytes(128 * KIB))
            peak = max(peak, quic.unacked_bytes(stream.stream_id))
        await stream.close_write()

    task = asyncio.get_running_loop().create_task(send())
    async with asyncio.timeout(60):
        received = await read_all(await inbound.accept_stream())
        await task
    assert len(received) == 4 * MIB
    assert 0 < peak <= 256 * KIB


# connection loss

_VANISHING_PEER = """
import asyncio, json, sys
from security import KeyPair
from transport._limits import QuicLimits
from transport._multiaddr import Multiaddr
from transport._quic import QuicTransport

async def main():
    identity = KeyPair.generate()
    transport = QuicTransport(identity, QuicLimits())

    async def handler(conn):
        while True:
            stream = await conn.accept_stream()
            print(json.dumps({"stream": stream.stream_id}), flush=True)

    listener = await transport.listen(Multiaddr.from_string(sys.argv[1]), handler)
    print(json.dumps({"addr": str(listener.addrs[0]), "peer": str(identity.peer_id)}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_peer_process_vanishing_fails_pending_reads_and_writes(peers: list[Peer]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _VANISHING_PEER,
        str(LOOPBACK),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            hello = json.loads(await process.stdout.readline())
        client = make_peer(peers, TINY)
        async with asyncio.timeout(WAIT_S):
            conn = await client.transport.dial(Multiaddr.from_string(hello["addr"]))
            reader = await conn.open_stream()
            await reader.write(b"?")
            writer = await conn.open_stream()
            await writer.write(b"!")
            for _ in range(2):
                assert "stream" in json.loads(await process.stdout.readline())
        loop = asyncio.get_running_loop()
        pending_read = loop.create_task(reader.read())

        async def write_forever() -> None:
            while True:
                await writer.write(bytes(16 * KIB))

        pending_write = loop.create_task(write_forever())
        await asyncio.sleep(0.2)
        assert not pending_read.done() and not pending_write.done()
        process.send_signal(signal.SIGKILL)
        await process.wait()
        killed = loop.time()
        async with asyncio.timeout(TINY.idle_timeout_s + 3.0):
            for task in (pending_read, pending_write):
                with pytest.raises(ConnectionClosed, match="0x"):
                    await task
            await conn.wait_closed()
        assert loop.time() - killed < TINY.idle_timeout_s + 2.0
        assert conn.is_closed
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_keepalive_follows_a_shorter_peer_idle_timeout(peers: list[Peer]) -> None:
    identity = KeyPair.generate()
    certificate = make_tls_certificate(identity)
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=[LIBP2P_ALPN],
        certificate=certificate.certificate,
        private_key=certificate.private_key,
        idle_timeout=1.0,
    )
    server = await serve("127.0.0.1", 0, configuration=configuration)  # aioquic never pings
    try:
        port = server._transport.get_extra_info("sockname")[1]
        client = make_peer(peers)
        async with asyncio.timeout(WAIT_S):
            conn = await client.transport.dial(
                Multiaddr.for_quic("127.0.0.1", port), identity.peer_id
            )
        await asyncio.sleep(3.0)
        assert not conn.is_closed, "pings every 0.5 s, not every QuicLimits.keepalive_s=15 s"
    finally:
        server.close()


def test_keepalive_must_be_below_the_idle_timeout() -> None:
    with pytest.raises(ValueError, match="keepalive_s"):
        QuicTransport(KeyPair.generate(), dataclasses.replace(QuicLimits(), keepalive_s=60.0))


async def test_remote_close_fails_pending_read_at_once(peers: list[Peer]) -> None:
    _, _, outbound, inbound = await connect(peers)
    stream = await outbound.open_stream()
    await stream.write(b"x")
    accepted = await inbound.accept_stream()
    assert await accepted.readexactly(1) == b"x"
    pending = asyncio.get_running_loop().create_task(stream.read())
    await asyncio.sleep(0.05)
    await inbound.close()
    async with asyncio.timeout(1.0):
        with pytest.raises(ConnectionClosed):
            await pending
    with pytest.raises(ConnectionClosed):
        await accepted.read()


async def test_stalled_handshakes_are_bounded_and_dropped(peers: list[Peer]) -> None:
    limits = dataclasses.replace(QuicLimits(), max_pending_handshakes=1, handshake_timeout_s=0.5)
    server = await make_peer(peers, limits).listen()
    stalled = AioquicConnection(
        configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[LIBP2P_ALPN], verify_mode=ssl.CERT_NONE
        )
    )
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        stalled.connect(server.addr.host_port(), now=loop.time())
        for data, addr in stalled.datagrams_to_send(now=loop.time()):
            sock.sendto(data, addr)
        client = make_peer(peers)
        with pytest.raises(DialError, match="timed out"):
            await client.transport.dial(server.addr, timeout=0.3)
        await asyncio.sleep(0.3)
        async with asyncio.timeout(WAIT_S):
            conn = await client.transport.dial(server.addr, server.identity.peer_id)
    assert conn.remote_peer == server.identity.peer_id
    assert server.accepted.qsize() == 1


async def test_handshake_timeout_is_a_dial_error(peers: list[Peer]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        addr = Multiaddr.for_quic("127.0.0.1", silent.getsockname()[1])
        client = make_peer(peers)
        started = time.perf_counter()
        with pytest.raises(DialError, match="timed out") as caught:
            await client.transport.dial(addr, timeout=0.3)
    assert caught.value.addr == addr
    assert time.perf_counter() - started < 2.0


async def test_socket_without_listener_refuses_at_once(peers: list[Peer]) -> None:
    _, _, outbound, _ = await connect(peers)
    dial_port = outbound.local_addr.host_port()[1]
    third = make_peer(peers)
    started = time.perf_counter()
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(DialError, match="refused"):
            await third.transport.dial(Multiaddr.for_quic("127.0.0.1", dial_port))
    assert time.perf_counter() - started < 1.0
    assert not outbound.is_closed


# one socket


async def test_listener_and_dials_share_one_socket(peers: list[Peer]) -> None:
    a = await make_peer(peers).listen()
    b = await make_peer(peers).listen()
    async with asyncio.timeout(WAIT_S):
        outbound = await a.transport.dial(b.addr, b.identity.peer_id)
        inbound = await b.next_connection()
    assert outbound.local_addr == a.addr
    assert inbound.remote_addr == a.addr, "b sees a's listening port: the one to punch"
    assert a.transport.udp_socket is not None
    assert a.transport.udp_socket.getsockname()[1] == a.addr.host_port()[1]


async def test_dial_before_listen_then_dials_use_the_listener_socket(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    node = make_peer(peers)
    async with asyncio.timeout(WAIT_S):
        early = await node.transport.dial(server.addr, server.identity.peer_id)
        await node.listen()
        late = await node.transport.dial(server.addr, server.identity.peer_id)
    assert early.local_addr.value_for("ip4") == "0.0.0.0"
    assert late.local_addr == node.addr
    await early.open_stream()
    assert not early.is_closed, "the first socket keeps serving its connection"


async def test_listen_on_the_dial_socket_address_reuses_it(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    node = make_peer(peers)
    async with asyncio.timeout(WAIT_S):
        early = await node.transport.dial(server.addr, server.identity.peer_id)
        await node.listen(Multiaddr.from_string("/ip4/0.0.0.0/udp/0/quic-v1"))
        port = node.addr.host_port()[1]
        assert early.local_addr.host_port()[1] == port
        inbound = await make_peer(peers).transport.dial(
            Multiaddr.for_quic("127.0.0.1", port), node.identity.peer_id
        )
    assert inbound.remote_peer == node.identity.peer_id
    assert not early.is_closed


async def test_two_connections_between_the_same_sockets_stay_apart(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen()
    client = await make_peer(peers).listen()
    echo_tasks = []
    async with asyncio.timeout(WAIT_S):
        conns = [await client.transport.dial(server.addr) for _ in range(2)]
        for _ in conns:
            inbound = await server.next_connection()
            echo_tasks.append(asyncio.get_running_loop().create_task(serve_echo(inbound)))
        try:
            for i, conn in enumerate(conns):
                stream = await conn.open_stream()
                await stream.write(f"conn {i}".encode())
                await stream.close_write()
                assert await read_all(stream) == f"conn {i}".encode()
        finally:
            for task in echo_tasks:
                task.cancel()
            await asyncio.gather(*echo_tasks, return_exceptions=True)
    assert conns[0].local_addr == conns[1].local_addr == client.addr


async def test_send_datagram_leaves_from_the_listening_port(peers: list[Peer]) -> None:
    node = await make_peer(peers).listen()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind(("127.0.0.1", 0))
        target.setblocking(False)
        node.transport.send_datagram(b"punch", target.getsockname())
        async with asyncio.timeout(WAIT_S):
            data, source = await asyncio.get_running_loop().sock_recvfrom(target, 64)
    assert data == b"punch"
    assert source == ("127.0.0.1", node.addr.host_port()[1])


async def test_ipv6_loopback(peers: list[Peer]) -> None:
    server = await make_peer(peers).listen(Multiaddr.from_string("/ip6/::1/udp/0/quic-v1"))
    client = make_peer(peers)
    async with asyncio.timeout(WAIT_S):
        conn = await client.transport.dial(server.addr, server.identity.peer_id)
    assert conn.remote_addr == server.addr
    assert conn.local_addr.value_for("ip6") == "::"


async def test_only_quic_addresses_are_taken(peers: list[Peer]) -> None:
    transport = make_peer(peers).transport
    tcp = Multiaddr.from_string("/ip4/127.0.0.1/tcp/4001")
    assert not transport.can_dial(tcp) and not transport.can_listen(tcp)
    assert transport.can_dial(LOOPBACK.with_p2p(KeyPair.generate().peer_id))
    assert not transport.can_listen(LOOPBACK.with_p2p(KeyPair.generate().peer_id))
    with pytest.raises(MultiaddrError):
        await transport.listen(tcp, Peer()._on_connection)
    with pytest.raises(DialError):
        await transport.dial(tcp)


# robustness


def _garbage(dcid: bytes) -> list[bytes]:
    long_header = bytes([0xC0]) + QuicProtocolVersion.VERSION_1.to_bytes(4, "big")
    return [
        b"",
        b"\x00",
        os.urandom(5),
        os.urandom(1500),
        bytes([0x40]) + dcid + os.urandom(40),
        long_header
        + bytes([8])
        + os.urandom(8)
        + bytes([8])
        + os.urandom(8)
        + b"\x00\x44\xb0"
        + os.urandom(1300),
        long_header + bytes([21]) + os.urandom(21),
        long_header + bytes([8]) + dcid + bytes([8]) + os.urandom(8) + os.urandom(1300),
        bytes([0xC0])
        + (0x1A2A3A4A).to_bytes(4, "big")
        + bytes([8])
        + os.urandom(8)
        + bytes([8])
        + os.urandom(8)
        + bytes(1200),
    ]


async def test_garbage_datagrams_do_not_break_the_listener(peers: list[Peer]) -> None:
    server, _, outbound, inbound = await connect(peers)
    port = server.addr.host_port()[1]
    live_cid = next(iter(inbound.cids))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind(("127.0.0.1", 0))
        attacker.setblocking(False)
        for _ in range(20):
            for datagram in _garbage(live_cid):
                attacker.sendto(datagram, ("127.0.0.1", port))
        await asyncio.sleep(0.3)
        replies = []
        while True:
            try:
                replies.append(attacker.recv(65535))
            except BlockingIOError:
                break
    assert replies, "an unsupported version is answered with version negotiation"
    assert all(reply[1:5] == bytes(4) for reply in replies), "nothing but version negotiation"
    echo = asyncio.get_running_loop().create_task(serve_echo(inbound))
    try:
        async with asyncio.timeout(WAIT_S):
            stream = await outbound.open_stream()
            await stream.write(b"still here")
            await stream.close_write()
            assert await read_all(stream) == b"still here"
            late = await make_peer(peers).transport.dial(server.addr, server.identity.peer_id)
    finally:
        echo.cancel()
        await asyncio.gather(echo, return_exceptions=True)
    assert late.remote_peer == server.identity.peer_id
    assert not outbound.is_closed and not inbound.is_closed


async def test_transport_close_releases_the_port(peers: list[Peer]) -> None:
    server, _, outbound, inbound = await connect(peers)
    port = server.addr.host_port()[1]
    async with asyncio.timeout(WAIT_S):
        await server.transport.close()
        await outbound.wait_closed()
    assert inbound.is_closed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))
