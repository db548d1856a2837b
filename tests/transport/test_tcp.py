"""The TCP transport on real loopback sockets: TLS 1.3 + yamux, as libp2p runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from security import KeyPair, TlsCertificate
from transport import _tcp
from transport._base import Connection, Listener, Stream, Transport
from transport._errors import (
    DialError,
    HandshakeError,
    MultiaddrError,
    PeerIdMismatch,
    TransportError,
)
from transport._limits import MIB, TcpLimits, TransportLimits
from transport._multiaddr import Multiaddr
from transport._multistream import PROTOCOL_ID, encode_message, select_protocol
from transport._tcp import TLS_PROTOCOL, TcpTransport
from transport._tls_verify import request_any_peer_certificate

LOOPBACK = Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")
FAST = dataclasses.replace(
    TransportLimits(), tcp=dataclasses.replace(TcpLimits(), handshake_timeout_s=0.5)
)


class StreamPipe:
    """``ByteStream`` over an asyncio stream pair, for a hand-made client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)
        await self._writer.drain()


class Server:
    """A listening TcpTransport whose accepted connections land in a queue."""

    def __init__(self, limits: TransportLimits = TransportLimits()) -> None:  # noqa: B008
        self.identity = KeyPair.generate()
        self.transport = TcpTransport(self.identity, limits)
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.listener: Listener | None = None

    async def start(self, addr: Multiaddr = LOOPBACK) -> Server:
        self.listener = await self.transport.listen(addr, self._on_connection)
        return self

    async def _on_connection(self, connection: Connection) -> None:
        await self.accepted.put(connection)

    @property
    def addr(self) -> Multiaddr:
        assert self.listener is not None
        return self.listener.addrs[0]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = await Server(FAST).start()
    yield srv
    await srv.transport.close()


@pytest.fixture
async def client() -> AsyncIterator[TcpTransport]:
    transport = TcpTransport(KeyPair.generate(), FAST)
    yield transport
    await transport.close()


async def echo_streams(connection: Connection) -> None:
    """Echo every inbound stream of ``connection`` until it closes."""

    async def echo(stream: Stream) -> None:
        while data := await stream.read(MIB):
            await stream.write(data)
        await stream.close()

    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            stream = await connection.accept_stream()
            task = asyncio.create_task(echo(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except TransportError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_all(stream: Stream) -> bytes:
    chunks = []
    while data := await stream.read(MIB):
        chunks.append(data)
    return b"".join(chunks)


async def roundtrip(connection: Connection, payload: bytes) -> bytes:
    stream = await connection.open_stream()
    await stream.write(payload)
    await stream.close_write()
    reply = await read_all(stream)
    await stream.close()
    return reply


def certificate_without_extension() -> TlsCertificate:
    """A well-formed self-signed certificate that proves no libp2p identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-libp2p")])
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
    return TlsCertificate(
        certificate=certificate,
        private_key=key,
        cert_der=certificate.public_bytes(serialization.Encoding.DER),
        cert_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def assert_serving(server: Server) -> None:
    """A well-behaved client still gets a connection through."""
    identity = KeyPair.generate()
    transport = TcpTransport(identity, FAST)
    try:
        connection = await transport.dial(server.addr, server.identity.peer_id)
        inbound = await asyncio.wait_for(server.accepted.get(), 5)
        assert inbound.remote_peer == identity.peer_id
        await connection.close()
    finally:
        await transport.close()


async def assert_dropped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The listener closes a bad client's socket (end of stream or reset)."""
    try:
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()


def test_is_a_transport() -> None:
    transport = TcpTransport(KeyPair.generate())
    assert isinstance(transport, Transport)
    assert transport.name == "tcp"


def test_accepts_only_tcp_addresses() -> None:
    transport = TcpTransport(KeyPair.generate())
    peer = KeyPair.generate().peer_id
    tcp4 = Multiaddr.from_string("/ip4/10.0.0.1/tcp/4001")
    assert transport.can_dial(tcp4)
    assert transport.can_dial(tcp4.with_p2p(peer))
    assert transport.can_dial(Multiaddr.from_string("/ip6/::1/tcp/4001"))
    assert transport.can_listen(tcp4)
    assert not transport.can_listen(tcp4.with_p2p(peer))
    for text in ("/ip4/10.0.0.1/udp/4001/quic-v1", "/memory/x", "/dns4/example.com/tcp/1"):
        assert not transport.can_dial(Multiaddr.from_string(text))
        assert not transport.can_listen(Multiaddr.from_string(text))


async def test_unsupported_addresses_raise(client: TcpTransport) -> None:
    quic = Multiaddr.from_string("/ip4/127.0.0.1/udp/1/quic-v1")
    with pytest.raises(MultiaddrError, match="quic-v1"):
        await client.dial(quic)

    async def ignore(connection: Connection) -> None:
        pass

    with pytest.raises(MultiaddrError, match="quic-v1"):
        await client.listen(quic, ignore)


async def test_connect_and_mutual_authentication(server: Server) -> None:
    listener = server.listener
    assert isinstance(listener, Listener)
    assert server.addr.host_port()[1] != 0
    identity = KeyPair.generate()
    client = TcpTransport(identity, FAST)
    try:
        connection = await client.dial(server.addr, server.identity.peer_id)
        inbound = await asyncio.wait_for(server.accepted.get(), 5)
        assert isinstance(connection, Connection)
        assert connection.transport_name == inbound.transport_name == "tcp"
        assert connection.remote_peer == inbound.local_peer == server.identity.peer_id
        assert connection.local_peer == inbound.remote_peer == identity.peer_id
        assert connection.remote_addr == inbound.local_addr == server.addr
        assert inbound.remote_addr == connection.local_addr
        assert connection.local_addr.host_port()[0] == "127.0.0.1"
    finally:
        await client.close()


async def test_expected_peer_defaults_to_the_p2p_part(server: Server, client: TcpTransport) -> None:
    connection = await client.dial(server.addr.with_p2p(server.identity.peer_id))
    assert connection.remote_peer == server.identity.peer_id
    stranger = KeyPair.generate().peer_id
    with pytest.raises(PeerIdMismatch):
        await client.dial(server.addr.with_p2p(stranger))


async def test_wrong_expected_peer_is_refused(server: Server, client: TcpTransport) -> None:
    stranger = KeyPair.generate().peer_id
    with pytest.raises(PeerIdMismatch) as caught:
        await client.dial(server.addr, stranger)
    assert caught.value.expected == stranger
    assert caught.value.actual == server.identity.peer_id
    assert caught.value.addr == server.addr
    assert str(server.addr) in str(caught.value)
    await assert_serving(server)


async def test_certificate_without_libp2p_extension_is_refused(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _tcp, "make_tls_certificate", lambda identity: certificate_without_extension()
    )
    impostor = TcpTransport(KeyPair.generate(), FAST)
    monkeypatch.undo()
    try:
        with pytest.raises(HandshakeError, match=str(server.addr)):
            await impostor.dial(server.addr, server.identity.peer_id)
    finally:
        await impostor.close()
    assert server.accepted.empty()
    await assert_serving(server)


async def test_dialer_refuses_listener_without_libp2p_extension(
    client: TcpTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _tcp, "make_tls_certificate", lambda identity: certificate_without_extension()
    )
    impostor = Server(FAST)
    monkeypatch.undo()
    await impostor.start()
    try:
        with pytest.raises(HandshakeError, match="proves no libp2p identity"):
            await client.dial(impostor.addr)
    finally:
        await impostor.transport.close()


async def test_client_without_certificate_is_refused(server: Server) -> None:
    reader, writer = await asyncio.open_connection(*server.addr.host_port())
    pipe = StreamPipe(reader, writer)
    await select_protocol(pipe, [TLS_PROTOCOL], limits=FAST.multistream)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        await writer.start_tls(context)
        await writer.drain()
    except (ssl.SSLError, ConnectionResetError):
        pass
    with pytest.raises((asyncio.IncompleteReadError, ssl.SSLError, ConnectionResetError)):
        async with asyncio.timeout(5):
            await reader.readexactly(1)
    writer.transport.abort()
    assert server.accepted.empty()
    await assert_serving(server)


async def test_garbage_instead_of_multistream_is_dropped(server: Server) -> None:
    reader, writer = await asyncio.open_connection(*server.addr.host_port())
    writer.write(b"\xff\xff\xff\x7fGET / HTTP/1.1\r\nHost: swarm\r\n\r\n")
    await assert_dropped(reader, writer)
    await assert_serving(server)


async def test_bytes_behind_the_tls_proposal_are_refused_at_once() -> None:
    """TLS starts on the socket, so bytes already read behind the proposal would be lost:
    the listener drops such a client without waiting out its handshake timeout."""
    limits = dataclasses.replace(FAST, tcp=dataclasses.replace(FAST.tcp, handshake_timeout_s=5.0))
    srv = await Server(limits).start()
    try:
        reader, writer = await asyncio.open_connection(*srv.addr.host_port())
        proposal = b"".join(
            encode_message(text, limits=FAST.multistream) for text in (PROTOCOL_ID, TLS_PROTOCOL)
        )
        started = time.monotonic()
        writer.write(proposal + b"\x16\x03\x01 not yet")
        await assert_dropped(reader, writer)
        assert time.monotonic() - started < 2.0
        assert srv.accepted.empty()
        await assert_serving(srv)
    finally:
        await srv.transport.close()


async def test_streams_opened_at_once_by_the_listener_arrive(client: TcpTransport) -> None:
    """The listener's first frames travel with its last negotiation answer: the dialer
    hands them to yamux instead of losing them."""

    async def greet(connection: Connection) -> None:
        stream = await connection.open_stream()
        await stream.write(b"welcome")
        await stream.close()

    listener = await client.listen(LOOPBACK, greet)
    dialer = TcpTransport(KeyPair.generate(), FAST)
    try:
        connection = await dialer.dial(listener.addrs[0])
        stream = await asyncio.wait_for(connection.accept_stream(), 5)
        assert await asyncio.wait_for(read_all(stream), 5) == b"welcome"
    finally:
        await dialer.close()


async def test_silent_client_times_out_without_blocking_others(server: Server) -> None:
    reader, writer = await asyncio.open_connection(*server.addr.host_port())
    started = time.monotonic()
    await assert_serving(server)
    await assert_dropped(reader, writer)
    assert time.monotonic() - started >= 0.4
    assert server.accepted.empty()


async def test_handshakes_in_progress_are_bounded() -> None:
    limits = dataclasses.replace(
        FAST, tcp=dataclasses.replace(FAST.tcp, handshake_timeout_s=5.0, max_pending_handshakes=1)
    )
    srv = await Server(limits).start()
    try:
        first = await asyncio.open_connection(*srv.addr.host_port())
        assert await first[0].readexactly(20)  # the listener's multistream header: accepted
        second = await asyncio.open_connection(*srv.addr.host_port())
        await assert_dropped(*second)
        first[1].write_eof()
        await assert_dropped(*first)
        await assert_serving(srv)
    finally:
        await srv.transport.close()


async def test_raw_tcp_listener_is_a_handshake_error(client: TcpTransport) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    raw = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    addr = Multiaddr.for_tcp("127.0.0.1", port)
    try:
        with pytest.raises(HandshakeError, match=str(addr)):
            await client.dial(addr)
    finally:
        raw.close()


async def test_refused_connection_is_a_dial_error(client: TcpTransport) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    addr = Multiaddr.for_tcp("127.0.0.1", port)
    with pytest.raises(DialError, match=str(addr)) as caught:
        await client.dial(addr)
    assert caught.value.addr == addr


async def test_echo_on_streams(server: Server, client: TcpTransport) -> None:
    connection = await client.dial(server.addr)
    inbound = await asyncio.wait_for(server.accepted.get(), 5)
    echo = asyncio.create_task(echo_streams(inbound))
    try:
        for payload in (b"x", b"hello swarm", os.urandom(300_000)):
            assert await roundtrip(connection, payload) == payload
    finally:
        await connection.close()
        await asyncio.wait_for(echo, 5)


async def test_streams_in_both_directions(server: Server, client: TcpTransport) -> None:
    connection = await client.dial(server.addr)
    inbound = await asyncio.wait_for(server.accepted.get(), 5)
    echo = asyncio.create_task(echo_streams(connection))
    try:
        assert await roundtrip(inbound, b"from the listener") == b"from the listener"
    finally:
        await inbound.close()
        await asyncio.wait_for(echo, 5)


@pytest.mark.timeout(60)
async def test_64_mib_over_one_stream(server: Server, client: TcpTransport) -> None:
    block = hashlib.sha256(b"swarm").digest() * (MIB // 32)
    total = 64 * MIB
    connection = await client.dial(server.addr)
    inbound = await asyncio.wait_for(server.accepted.get(), 5)

    async def receive() -> tuple[int, str]:
        stream = await inbound.accept_stream()
        digest = hashlib.sha256()
        size = 0
        while data := await stream.read(MIB):
            digest.update(data)
            size += len(data)
        await stream.close()
        return size, digest.hexdigest()

    receiver = asyncio.create_task(receive())
    started = time.perf_counter()
    stream = await connection.open_stream()
    for index in range(total // MIB):
        await stream.write(block[index:] + block[:index])
    await stream.close_write()
    size, digest = await asyncio.wait_for(receiver, 50)
    elapsed = time.perf_counter() - started
    await stream.close()
    expected = hashlib.sha256()
    for index in range(total // MIB):
        expected.update(block[index:] + block[:index])
    assert size == total
    assert digest == expected.hexdigest()
    print(f"\nTCP+TLS+yamux: 64 MiB over one stream in {elapsed:.2f}s = {64 / elapsed:.0f} MiB/s")


@pytest.mark.timeout(60)
async def test_100_concurrent_streams(server: Server, client: TcpTransport) -> None:
    connection = await client.dial(server.addr)
    inbound = await asyncio.wait_for(server.accepted.get(), 5)
    echo = asyncio.create_task(echo_streams(inbound))
    payloads = [os.urandom(1000 + 97 * index) for index in range(100)]
    try:
        replies = await asyncio.gather(*(roundtrip(connection, p) for p in payloads))
        assert replies == payloads
    finally:
        await connection.close()
        await asyncio.wait_for(echo, 5)


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.fail("this Python has no IPv6 support")
    srv = Server(FAST)
    try:
        await srv.start(Multiaddr.from_string("/ip6/::1/tcp/0"))
    except TransportError as exc:
        await srv.transport.close()
        pytest.fail(f"no IPv6 loopback on this machine: {exc}")
    transport = TcpTransport(KeyPair.generate(), FAST)
    try:
        assert srv.addr.components[0] == ("ip6", "::1")
        connection = await transport.dial(srv.addr, srv.identity.peer_id)
        assert connection.remote_addr == srv.addr
    finally:
        await transport.close()
        await srv.transport.close()


async def test_close_ends_listeners_and_connections(server: Server, client: TcpTransport) -> None:
    connection = await client.dial(server.addr)
    inbound = await asyncio.wait_for(server.accepted.get(), 5)
    addr = server.addr
    await server.transport.close()
    assert server.listener is not None and server.listener.addrs == []
    assert inbound.is_closed
    await asyncio.wait_for(connection.wait_closed(), 5)
    with pytest.raises(DialError):
        await client.dial(addr)
    with pytest.raises(DialError, match="closed"):
        await server.transport.dial(addr)
    with pytest.raises(TransportError, match="closed"):
        await server.transport.listen(LOOPBACK, server._on_connection)


async def test_listener_close_keeps_connections(server: Server, client: TcpTransport) -> None:
    connection = await client.dial(server.addr)
    inbound = await asyncio.wait_for(server.accepted.get(), 5)
    echo = asyncio.create_task(echo_streams(inbound))
    assert server.listener is not None
    await server.listener.close()
    try:
        assert await roundtrip(connection, b"still here") == b"still here"
    finally:
        await connection.close()
        await asyncio.wait_for(echo, 5)


def test_verify_hook_requires_a_peer_certificate() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert context.verify_mode == ssl.CERT_NONE
    request_any_peer_certificate(context)
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_credentials_are_not_left_on_disk() -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    TcpTransport(KeyPair.generate())
    created = set(os.listdir(tempfile.gettempdir())) - before
    assert not [name for name in created if name.startswith("swarm-tls-")]
