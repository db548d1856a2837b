"""The TCP transport, upgraded the way libp2p does it (specs: connections/README.md, tls/tls.md).

Each connection climbs the same ladder on both sides:

1. a TCP connection (asyncio streams, ``TCP_NODELAY``);
2. multistream-select agrees on ``/tls/1.0.0`` (the dialer proposes);
3. TLS 1.3 on the same socket, ALPN ``libp2p``, each side presenting the self-signed
   certificate of ``security.make_tls_certificate``. OpenSSL is told to accept any
   certificate (``_tls_verify``); the libp2p extension is then verified here and gives
   the remote PeerID, which the dialer compares with the one it expected;
4. multistream-select, inside TLS, agrees on ``/yamux/1.0.0``;
5. the TLS stream pair becomes a ``YamuxConnection``.

Steps 2 to 4 are bounded by ``TcpLimits.handshake_timeout_s``. Every inbound handshake
runs in its own task, so garbage or silent clients cost the listener one timed-out task
and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
import weakref
from collections.abc import Iterable, Iterator

from security import (
    LIBP2P_ALPN,
    InvalidCertificate,
    KeyPair,
    PeerId,
    TlsCertificate,
    make_tls_certificate,
    peer_id_from_certificate,
)

from ._base import ConnectionHandler
from ._errors import (
    DialError,
    HandshakeError,
    MultiaddrError,
    PeerIdMismatch,
    StreamClosed,
    TransportError,
)
from ._limits import TransportLimits
from ._multiaddr import Multiaddr
from ._multistream import handle_protocols, select_protocol
from ._tls_verify import request_any_peer_certificate
from ._yamux_conn import YamuxConnection

TLS_PROTOCOL = "/tls/1.0.0"
YAMUX_PROTOCOL = "/yamux/1.0.0"

_log = logging.getLogger(__name__)


class _SocketPipe:
    """``ByteStream`` over an asyncio stream pair, for the negotiations before yamux."""

    __slots__ = ("_reader", "_writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise StreamClosed(
                f"peer closed the connection after {len(exc.partial)} of {n} expected bytes"
            ) from None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)
        await self._writer.drain()


def _tcp_endpoint(addr: Multiaddr) -> tuple[str, int] | None:
    """``(host, port)`` of ``/ip4|ip6/<host>/tcp/<port>[/p2p/<id>]``, else ``None``."""
    components = addr.without_p2p().components
    if len(components) != 2 or components[0][0] not in ("ip4", "ip6"):
        return None
    if components[1][0] != "tcp":
        return None
    return addr.without_p2p().host_port()


def _multiaddr_of(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Multiaddr:
    return Multiaddr.for_tcp(sockaddr[0], sockaddr[1])


def _load_credentials(certificate: TlsCertificate, contexts: Iterable[ssl.SSLContext]) -> None:
    """Load key and certificate into ``contexts`` through a private file deleted at once."""
    with tempfile.TemporaryDirectory(prefix="swarm-tls-") as directory:
        path = os.path.join(directory, "credentials.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(certificate.key_pem + certificate.cert_pem)
        for context in contexts:
            context.load_cert_chain(path)


def _tls13_context(*, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([LIBP2P_ALPN])
    return context


class _TlsContexts:
    """The client and server TLS 1.3 contexts presenting one libp2p certificate."""

    def __init__(self, certificate: TlsCertificate) -> None:
        self.client = _tls13_context(server_side=False)
        self.client.check_hostname = False
        self.client.verify_mode = ssl.CERT_NONE
        self._server = _tls13_context(server_side=True)
        self._server.num_tickets = 0
        _load_credentials(certificate, (self.client, self._server))
        self._server_ready = False

    def server(self) -> ssl.SSLContext:
        """The server context, with the client-certificate hook installed on first use."""
        if not self._server_ready:
            request_any_peer_certificate(self._server)
            self._server_ready = True
        return self._server


def _authenticate(writer: asyncio.StreamWriter, peer: str) -> PeerId:
    """The PeerID proven by the remote's TLS certificate (libp2p extension verified)."""
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise HandshakeError(f"{peer} presented no TLS certificate")
    try:
        return peer_id_from_certificate(der)
    except InvalidCertificate as exc:
        raise HandshakeError(
            f"{peer} presented a TLS certificate that proves no libp2p identity: {exc}"
        ) from None


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Name the handshake step in which a transport, socket or TLS error happened."""
    try:
        yield
    except (TransportError, OSError) as exc:
        raise HandshakeError(f"{name}: {exc}") from exc


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpListener:
    """A listening TCP socket; each accepted client is upgraded in its own task."""

    def __init__(self, transport: TcpTransport, handler: ConnectionHandler) -> None:
        self._transport = transport
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._closed = False
        self._addrs: list[Multiaddr] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def addrs(self) -> list[Multiaddr]:
        return list(self._addrs)

    def _started(self, server: asyncio.Server) -> None:
        self._server = server
        self._addrs = [_multiaddr_of(sock.getsockname()) for sock in server.sockets]

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        limit = self._transport._limits.tcp.max_pending_handshakes
        if len(self._handshakes) >= limit:
            _log.warning(
                "dropped TCP client %s: %d handshakes in progress reach "
                "TcpLimits.max_pending_handshakes=%d",
                writer.get_extra_info("peername"),
                len(self._handshakes),
                limit,
            )
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._accept(reader, writer))
        self._handshakes.add(task)
        self._transport._track(task)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            connection = await self._transport._secure_inbound(reader, writer)
        finally:
            self._handshakes.discard(asyncio.current_task())  # type: ignore[arg-type]
        if connection is not None:
            await self._transport._serve(connection, self._handler)

    def __repr__(self) -> str:
        return f"<TcpListener {' '.join(map(str, self._addrs)) or 'closed'}>"

    async def close(self) -> None:
        """Stop accepting and abandon handshakes in progress; connections made stay open."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._addrs = []
        pending = list(self._handshakes)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._transport._listeners.discard(self)


class TcpTransport:
    """libp2p's TCP transport: TLS 1.3 security and yamux multiplexing over TCP."""

    def __init__(
        self,
        identity: KeyPair,
        limits: TransportLimits = TransportLimits(),  # noqa: B008 - frozen value
    ) -> None:
        self._identity = identity
        self._limits = limits
        self._tls = _TlsContexts(make_tls_certificate(identity))
        self._listeners: set[TcpListener] = set()
        self._connections: weakref.WeakSet[YamuxConnection] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def name(self) -> str:
        return "tcp"

    def __repr__(self) -> str:
        return f"<TcpTransport {self._identity.peer_id}>"

    def can_dial(self, addr: Multiaddr) -> bool:
        return _tcp_endpoint(addr) is not None

    def can_listen(self, addr: Multiaddr) -> bool:
        return addr.peer_id is None and _tcp_endpoint(addr) is not None

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def listen(self, addr: Multiaddr, handler: ConnectionHandler) -> TcpListener:
        """Listen on ``/ip4|ip6/<host>/tcp/<port>`` (port 0 picks one; see ``addrs``).

        ``handler`` runs once per authenticated inbound connection, in the task that
        upgraded it. Raises ``HandshakeError`` when this Python cannot request client
        certificates (``_tls_verify``), ``TransportError`` when the port cannot be bound.
        """
        if self._closed:
            raise TransportError(f"cannot listen on {addr}: the TCP transport is closed")
        endpoint = _tcp_endpoint(addr) if addr.peer_id is None else None
        if endpoint is None:
            raise MultiaddrError(
                f"TcpTransport cannot listen on {addr}: expected /ip4|ip6/<host>/tcp/<port>"
            )
        self._tls.server()
        listener = TcpListener(self, handler)
        try:
            server = await asyncio.start_server(
                listener._on_connect,
                endpoint[0],
                endpoint[1],
                reuse_address=True,
                limit=self._limits.tcp.read_chunk_bytes,
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on {addr}: {exc}") from exc
        if self._closed:
            server.close()
            raise TransportError(f"the TCP transport closed while listening on {addr}")
        listener._started(server)
        self._listeners.add(listener)
        return listener

    async def dial(
        self,
        addr: Multiaddr,
        expected_peer: PeerId | None = None,
        *,
        timeout: float | None = None,
    ) -> YamuxConnection:
        """Connect to ``addr`` and authenticate the remote.

        ``expected_peer`` defaults to the address's ``/p2p/`` part. ``timeout`` (default
        ``TransportLimits.dial_timeout_s``) bounds the whole dial, and
        ``TcpLimits.handshake_timeout_s`` the upgrade after the TCP connect.
        """
        if self._closed:
            raise DialError(f"cannot dial {addr}: the TCP transport is closed", addr=addr)
        endpoint = _tcp_endpoint(addr)
        if endpoint is None:
            raise MultiaddrError(
                f"TcpTransport cannot dial {addr}: expected /ip4|ip6/<host>/tcp/<port>"
            )
        expected = expected_peer if expected_peer is not None else addr.peer_id
        budget = self._limits.dial_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(
                    endpoint[0], endpoint[1], limit=self._limits.tcp.read_chunk_bytes
                )
        except TimeoutError:
            raise DialError(
                f"TCP connect to {addr} timed out after {budget:g}s", addr=addr
            ) from None
        except OSError as exc:
            raise DialError(f"TCP connect to {addr} failed: {exc}", addr=addr) from exc
        handshake_s = min(budget, self._limits.tcp.handshake_timeout_s)
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + handshake_s)):
                _set_nodelay(writer)
                remote_peer = await self._upgrade(reader, writer, dialer=True, expected=expected)
        except BaseException as exc:
            writer.transport.abort()
            if isinstance(exc, TimeoutError):
                raise HandshakeError(
                    f"handshake with {addr} did not finish within {handshake_s:g}s "
                    "(TcpLimits.handshake_timeout_s or the dial timeout)"
                ) from None
            if isinstance(exc, PeerIdMismatch):
                raise PeerIdMismatch(expected=expected, actual=exc.actual, addr=addr) from None
            if isinstance(exc, TransportError | OSError):
                raise HandshakeError(f"handshake with {addr} failed: {exc}") from exc
            raise
        connection = self._connect(reader, writer, remote_peer, is_client=True)
        if self._closed:
            await connection.close()
            raise DialError(f"the TCP transport closed while dialing {addr}", addr=addr)
        return connection

    async def _secure_inbound(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> YamuxConnection | None:
        """Upgrade an accepted socket, or drop it (``None``) if the client fails."""
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(self._limits.tcp.handshake_timeout_s):
                if peer is None:
                    raise HandshakeError("the client left before its address could be read")
                _set_nodelay(writer)
                remote_peer = await self._upgrade(reader, writer, dialer=False, expected=None)
        except BaseException as exc:
            writer.transport.abort()
            if isinstance(exc, TimeoutError | TransportError | OSError):
                _log.debug("dropped inbound TCP client %s: %r", peer, exc)
                return None
            if isinstance(exc, Exception):
                _log.exception("inbound TCP handshake with %s failed unexpectedly", peer)
                return None
            raise
        return self._connect(reader, writer, remote_peer, is_client=False)

    async def _upgrade(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        dialer: bool,
        expected: PeerId | None,
    ) -> PeerId:
        """Negotiate TLS, authenticate the remote, negotiate yamux; return the remote PeerID."""
        pipe = _SocketPipe(reader, writer)
        negotiation = self._limits.multistream
        peer = f"TCP peer {writer.get_extra_info('peername')}"
        with _step(f"negotiating {TLS_PROTOCOL}"):
            if dialer:
                await select_protocol(pipe, [TLS_PROTOCOL], limits=negotiation)
            else:
                await handle_protocols(pipe, [TLS_PROTOCOL], limits=negotiation)
        with _step("TLS 1.3 handshake"):
            await writer.start_tls(self._tls.client if dialer else self._tls.server())
        remote_peer = _authenticate(writer, peer)
        if expected is not None and remote_peer != expected:
            raise PeerIdMismatch(expected=expected, actual=remote_peer)
        if dialer:
            with _step(
                f"negotiating {YAMUX_PROTOCOL} inside TLS (a listener that refuses our "
                "certificate closes the connection here)"
            ):
                await select_protocol(pipe, [YAMUX_PROTOCOL], limits=negotiation)
        else:
            with _step(f"negotiating {YAMUX_PROTOCOL} inside TLS"):
                await handle_protocols(pipe, [YAMUX_PROTOCOL], limits=negotiation)
        return remote_peer

    def _connect(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        remote_peer: PeerId,
        *,
        is_client: bool,
    ) -> YamuxConnection:
        connection = YamuxConnection(
            reader,
            writer,
            is_client=is_client,
            local_peer=self._identity.peer_id,
            remote_peer=remote_peer,
            local_addr=_multiaddr_of(writer.get_extra_info("sockname")),
            remote_addr=_multiaddr_of(writer.get_extra_info("peername")),
            limits=self._limits.yamux,
            transport_name="tcp",
        )
        connection.start()
        self._connections.add(connection)
        return connection

    async def _serve(self, connection: YamuxConnection, handler: ConnectionHandler) -> None:
        try:
            await handler(connection)
        except Exception:
            _log.exception("connection handler failed for %s", connection.remote_peer)

    async def close(self) -> None:
        """Close every listener and connection, and end the tasks serving them."""
        self._closed = True
        for listener in list(self._listeners):
            await listener.close()
        connections = list(self._connections)
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
