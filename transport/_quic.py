"""The QUIC transport: ``/ip4|ip6/<host>/udp/<port>/quic-v1``, libp2p-compatible.

TLS 1.3 with ALPN ``libp2p``; both sides present a self-signed certificate carrying the
libp2p public-key extension (specs tls/tls.md) and each checks the other's after the
handshake (:mod:`transport._quic_engine`). Stream multiplexing is QUIC's own.

Sockets: listening and dialing share one UDP socket per address family
(:mod:`transport._quic_endpoint`), so that hole punching sees the port peers know:

- ``listen`` binds the address asked for; a ``dial`` then goes out from that socket (a
  loopback-bound socket only serves loopback destinations, a wildcard one serves all);
- a ``dial`` with no suitable socket binds the family's wildcard address with an
  ephemeral port (``0.0.0.0:0`` or ``[::]:0``); it only ever sends to the addresses
  dialed. A later ``listen`` on that wildcard with port 0 (or the same port) reuses it,
  any other ``listen`` binds its own socket, which later dials then prefer;
- a socket without a listener answers new connections with CONNECTION_REFUSED (the
  dialer fails at once); closing a listener does that, then closes the socket once its
  last connection is gone.

Hole punching sends raw datagrams from the same socket: ``send_datagram`` and
``udp_socket`` (the first listener's socket).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from aioquic.quic.packet import QuicHeader

from security import KeyPair, PeerId, make_tls_certificate

from ._base import ConnectionHandler
from ._errors import ConnectionClosed, DialError, MultiaddrError, TransportError
from ._limits import QuicLimits
from ._multiaddr import Multiaddr
from ._quic_conn import QuicConnection, QuicStream
from ._quic_endpoint import NetworkAddress, QuicEndpoint
from ._quic_engine import LibP2PQuicConnection, quic_configuration

__all__ = ["QuicConnection", "QuicListener", "QuicStream", "QuicTransport"]

_log = logging.getLogger(__name__)

_FAMILIES = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}
_IP_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_WILDCARDS = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def _udp_target(addr: Multiaddr, *, with_peer: bool) -> tuple[int, str, int] | None:
    """``(family, host, port)`` of a QUIC address, or None if ``addr`` is not one."""
    components = addr.components
    if with_peer and components and components[-1][0] == "p2p":
        components = components[:-1]
    if len(components) != 3:
        return None
    (ip, host), (udp, port), (quic, _) = components
    if ip not in _FAMILIES or udp != "udp" or quic != "quic-v1" or host is None or port is None:
        return None
    return _FAMILIES[ip], host, int(port)


class QuicListener:
    """Accepts inbound QUIC connections on one endpoint."""

    def __init__(
        self, transport: QuicTransport, endpoint: QuicEndpoint, handler: ConnectionHandler
    ):
        self._transport = transport
        self._endpoint = endpoint
        self._handler = handler
        self._closed = False
        endpoint.serve(self._on_initial)

    @property
    def addrs(self) -> list[Multiaddr]:
        return [Multiaddr.for_quic(*self._endpoint.local_addr)]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._endpoint.retire()

    def _on_initial(
        self,
        endpoint: QuicEndpoint,
        header: QuicHeader,
        data: bytes,
        addr: NetworkAddress,
        now: float,
    ) -> None:
        limits = self._transport._limits
        if endpoint.pending_inbound_handshakes >= limits.max_pending_handshakes:
            return
        quic = LibP2PQuicConnection(
            configuration=self._transport._server_config,
            max_streams=limits.max_streams,
            original_destination_connection_id=header.destination_cid,
        )
        conn = QuicConnection(
            endpoint=endpoint,
            quic=quic,
            peer_addr=addr,
            local_peer=self._transport.local_peer,
            limits=limits,
            on_established=self._transport._start_handler(self._handler),
        )
        endpoint.add(conn, header.destination_cid, quic.host_cid)
        conn.receive(data, addr, now)
        if quic.accepted_initial:
            conn.start_handshake_timer()
            endpoint.schedule_transmit(conn)
        else:
            endpoint.forget(conn)


class QuicTransport:
    """Dials and listens for ``/ip4|ip6/.../udp/<port>/quic-v1`` addresses."""

    def __init__(
        self,
        identity: KeyPair,
        limits: QuicLimits = QuicLimits(),  # noqa: B008 - frozen value
    ) -> None:
        if not 0 < limits.keepalive_s < limits.idle_timeout_s:
            raise ValueError(
                f"QuicLimits.keepalive_s={limits.keepalive_s} must be positive and below "
                f"idle_timeout_s={limits.idle_timeout_s}, or idle connections time out"
            )
        certificate = make_tls_certificate(identity)
        self._identity = identity
        self._limits = limits
        self._client_config = quic_configuration(certificate, limits, is_client=True)
        self._server_config = quic_configuration(certificate, limits, is_client=False)
        self._endpoints: list[QuicEndpoint] = []
        self._listeners: list[QuicListener] = []
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._bind_lock = asyncio.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return "quic"

    @property
    def local_peer(self) -> PeerId:
        return self._identity.peer_id

    def can_dial(self, addr: Multiaddr) -> bool:
        return _udp_target(addr, with_peer=True) is not None

    def can_listen(self, addr: Multiaddr) -> bool:
        return _udp_target(addr, with_peer=False) is not None

    async def listen(self, addr: Multiaddr, handler: ConnectionHandler) -> QuicListener:
        target = _udp_target(addr, with_peer=False)
        if target is None:
            raise MultiaddrError(
                f"{addr} is not a QUIC address (/ip4|ip6/<host>/udp/<port>/quic-v1)"
            )
        if self._closed:
            raise TransportError(f"cannot listen on {addr}: the QUIC transport is closed")
        family, host, port = target
        async with self._bind_lock:
            endpoint = next(
                (
                    e
                    for e in self._endpoints
                    if e.is_alive
                    and e.on_initial is None
                    and e.family == family
                    and e.bound_ip == ipaddress.ip_address(host)
                    and port in (0, e.local_addr[1])
                ),
                None,
            )
            if endpoint is None:
                try:
                    endpoint = await self._bind(family, host, port)
                except OSError as exc:
                    raise TransportError(f"cannot listen on {addr}: {exc}") from None
            listener = QuicListener(self, endpoint, handler)
            self._listeners.append(listener)
        return listener

    async def dial(
        self,
        addr: Multiaddr,
        expected_peer: PeerId | None = None,
        *,
        timeout: float | None = None,
    ) -> QuicConnection:
        """Connect and authenticate; the remote must prove ``expected_peer``.

        ``expected_peer`` defaults to the address's ``/p2p/`` part; ``timeout`` (default
        ``QuicLimits.handshake_timeout_s``) bounds the handshake. Raises ``DialError``
        (timeout, refusal, no socket), ``PeerIdMismatch`` or ``HandshakeError`` (the
        peer's certificate, or ours, was rejected).
        """
        target = _udp_target(addr, with_peer=True)
        if target is None:
            raise DialError(f"{addr} is not a QUIC address", addr=addr)
        if self._closed:
            raise DialError(f"cannot dial {addr}: the QUIC transport is closed", addr=addr)
        family, host, port = target
        expected = expected_peer if expected_peer is not None else addr.peer_id
        try:
            endpoint = await self._dial_endpoint(family, host)
        except OSError as exc:
            raise DialError(f"cannot dial {addr}: no UDP socket: {exc}", addr=addr) from None
        peer_addr = endpoint.peer_address(host, port)
        quic = LibP2PQuicConnection(
            configuration=self._client_config, max_streams=self._limits.max_streams
        )
        conn = QuicConnection(
            endpoint=endpoint,
            quic=quic,
            peer_addr=peer_addr,
            local_peer=self.local_peer,
            limits=self._limits,
            expected_peer=expected,
        )
        endpoint.add(conn, quic.host_cid)
        limit = timeout if timeout is not None else self._limits.handshake_timeout_s
        try:
            conn.connect()
            async with asyncio.timeout(limit):
                await conn.wait_established()
        except TimeoutError:
            conn.close_now("handshake timeout")
            raise DialError(
                f"QUIC handshake with {addr} timed out after {limit:g} s", addr=addr
            ) from None
        except ConnectionClosed as exc:
            raise DialError(f"dial to {addr} abandoned: {exc}", addr=addr) from None
        except BaseException:
            conn.close_now("dial abandoned")
            raise
        return conn

    def send_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send a raw UDP datagram from the socket a dial to ``addr`` would use (hole punching).

        Raises ``TransportError`` if there is no such socket yet: listen (or dial) first.
        """
        host, port = addr
        try:
            family = _IP_FAMILIES[ipaddress.ip_address(host).version]
        except ValueError:
            raise MultiaddrError(f"{host!r} is not an IP address") from None
        endpoint = self._pick_endpoint(family, host)
        if endpoint is None:
            raise TransportError(f"no UDP socket can reach {host}; listen on QUIC first")
        endpoint.send_datagram(data, host, port)

    @property
    def udp_socket(self) -> socket.socket | None:
        """The socket of the first listener (the one peers know), else of the first dial."""
        endpoint = self._pick_endpoint(None, None)
        return endpoint.udp_socket if endpoint is not None else None

    async def close(self) -> None:
        self._closed = True
        for listener in self._listeners:
            await listener.close()
        endpoints, self._endpoints = self._endpoints, []
        await asyncio.gather(*(endpoint.close() for endpoint in endpoints))
        tasks = list(self._handler_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # internals

    def _start_handler(self, handler: ConnectionHandler) -> Callable[[QuicConnection], None]:
        """What a listener calls with each authenticated connection: ``handler`` in a task."""

        def start(conn: QuicConnection) -> None:
            task = asyncio.get_running_loop().create_task(self._serve(handler, conn))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)

        return start

    async def _serve(self, handler: ConnectionHandler, conn: QuicConnection) -> None:
        try:
            await handler(conn)
        except TransportError as exc:
            _log.debug("connection handler for %r ended: %s", conn, exc)
        except Exception:
            _log.exception("connection handler failed for %r", conn)

    def _pick_endpoint(self, family: int | None, host: str | None) -> QuicEndpoint | None:
        usable = [
            e
            for e in self._endpoints
            if e.is_open
            and (family is None or e.family == family)
            and (host is None or e.can_reach(host))
        ]
        usable.sort(key=lambda e: e.on_initial is None)
        return usable[0] if usable else None

    async def _dial_endpoint(self, family: int, host: str) -> QuicEndpoint:
        async with self._bind_lock:
            endpoint = self._pick_endpoint(family, host)
            if endpoint is None:
                endpoint = await self._bind(family, _WILDCARDS[family], 0)
            return endpoint

    async def _bind(self, family: int, host: str, port: int) -> QuicEndpoint:
        endpoint = await QuicEndpoint.bind(family, host, port, self._limits)
        self._endpoints.append(endpoint)
        return endpoint
