"""The TCP transport, upgraded the way libp2p does it (specs: connections/README.md, tls/tls.md).

Each connection climbs the same ladder on both sides:

1. a TCP connection (``TCP_NODELAY``) whose protocol, ``_Pipe``, serves the negotiations;
2. multistream-select agrees on ``/tls/1.0.0`` (the dialer proposes);
3. TLS 1.3 on the same socket, ALPN ``libp2p``, each side presenting the self-signed
   certificate of ``security.make_tls_certificate``, the remote's libp2p extension
   verified and compared with the PeerID the dialer expected;
4. multistream-select, inside TLS, agrees on ``/yamux/1.0.0``;
5. the TLS transport becomes a ``YamuxConnection``, which takes over as its protocol
   with whatever the peer already sent behind the negotiation.

Steps 2 to 5 are the ladder of ``_upgrade`` (which also runs it over relayed streams);
steps 2 to 4 are bounded by ``TcpLimits.handshake_timeout_s``. Every inbound handshake
runs in its own task, so garbage or silent clients cost the listener one timed-out task
and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref

from security import KeyPair, PeerId, make_tls_certificate

from ._base import ConnectionHandler
from ._errors import DialError, HandshakeError, MultiaddrError, PeerIdMismatch, TransportError
from ._limits import TransportLimits
from ._multiaddr import Multiaddr
from ._upgrade import TLS_PROTOCOL, YAMUX_PROTOCOL, _Pipe, _TlsContexts, negotiate_upgrade
from ._yamux_conn import YamuxConnection

__all__ = ["TLS_PROTOCOL", "YAMUX_PROTOCOL", "TcpListener", "TcpTransport"]

_log = logging.getLogger(__name__)


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


def _set_nodelay(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
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

    def _on_connect(self, pipe: _Pipe) -> None:
        if self._closed:
            pipe.transport.abort()
            return
        limit = self._transport._limits.tcp.max_pending_handshakes
        if len(self._handshakes) >= limit:
            _log.warning(
                "dropped TCP client %s: %d handshakes in progress reach "
                "TcpLimits.max_pending_handshakes=%d",
                pipe.transport.get_extra_info("peername"),
                len(self._handshakes),
                limit,
            )
            pipe.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._accept(pipe))
        self._handshakes.add(task)
        self._transport._track(task)

    async def _accept(self, pipe: _Pipe) -> None:
        try:
            connection = await self._transport._secure_inbound(pipe)
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
        limit = self._limits.tcp.read_chunk_bytes
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: _Pipe(limit, listener._on_connect),
                endpoint[0],
                endpoint[1],
                reuse_address=True,
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
        limit = self._limits.tcp.read_chunk_bytes
        try:
            async with asyncio.timeout_at(deadline):
                _, pipe = await loop.create_connection(lambda: _Pipe(limit), *endpoint)
        except TimeoutError:
            raise DialError(
                f"TCP connect to {addr} timed out after {budget:g}s", addr=addr
            ) from None
        except OSError as exc:
            raise DialError(f"TCP connect to {addr} failed: {exc}", addr=addr) from exc
        handshake_s = min(budget, self._limits.tcp.handshake_timeout_s)
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + handshake_s)):
                _set_nodelay(pipe.transport)
                remote_peer = await negotiate_upgrade(
                    pipe, self._tls, self._limits.multistream, dialer=True, expected=expected
                )
                connection = self._connect(pipe, remote_peer, is_client=True)
        except BaseException as exc:
            pipe.transport.abort()
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
        if self._closed:
            await connection.close()
            raise DialError(f"the TCP transport closed while dialing {addr}", addr=addr)
        return connection

    async def _secure_inbound(self, pipe: _Pipe) -> YamuxConnection | None:
        """Upgrade an accepted socket, or drop it (``None``) if the client fails."""
        peer = pipe.transport.get_extra_info("peername")
        try:
            async with asyncio.timeout(self._limits.tcp.handshake_timeout_s):
                if peer is None:
                    raise HandshakeError("the client left before its address could be read")
                _set_nodelay(pipe.transport)
                remote_peer = await negotiate_upgrade(
                    pipe, self._tls, self._limits.multistream, dialer=False, expected=None
                )
                return self._connect(pipe, remote_peer, is_client=False)
        except BaseException as exc:
            pipe.transport.abort()
            if isinstance(exc, TimeoutError | TransportError | OSError):
                _log.debug("dropped inbound TCP client %s: %r", peer, exc)
                return None
            if isinstance(exc, Exception):
                _log.exception("inbound TCP handshake with %s failed unexpectedly", peer)
                return None
            raise

    def _connect(self, pipe: _Pipe, remote_peer: PeerId, *, is_client: bool) -> YamuxConnection:
        transport, received = pipe.detach()
        connection = YamuxConnection(
            transport,
            is_client=is_client,
            local_peer=self._identity.peer_id,
            remote_peer=remote_peer,
            local_addr=_multiaddr_of(transport.get_extra_info("sockname")),
            remote_addr=_multiaddr_of(transport.get_extra_info("peername")),
            limits=self._limits.yamux,
            transport_name="tcp",
            received=received,
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
