"""One UDP socket carrying many QUIC connections, outbound and inbound alike.

Listening and dialing share the socket: a NAT maps one socket to one public port, so
this is what lets hole punching work, and it is one port to open in a firewall.
:class:`QuicEndpoint` demultiplexes every datagram by its destination connection ID to
the connection that issued that ID; an Initial packet for an unknown ID starts an
inbound connection when a listener is attached, and is refused otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import platform
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder

from ._limits import QuicLimits
from ._quic_engine import CONNECTION_ID_BYTES, SUPPORTED_VERSIONS

if TYPE_CHECKING:
    from ._quic_conn import QuicConnection

_log = logging.getLogger(__name__)

NetworkAddress = Any
"""What the socket reports: ``(host, port)`` for IPv4, ``(host, port, flow, scope)`` for IPv6."""

_MAX_UDP_PAYLOAD = 65535

InitialHandler = Callable[["QuicEndpoint", QuicHeader, bytes, NetworkAddress, float], None]
"""Called with a new Initial packet while a listener is attached."""


_FORCE_OPTIONS = (
    {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32}
    if sys.platform == "linux"
    and platform.machine().startswith(("x86", "i686", "amd64", "aarch64", "arm", "riscv", "ppc"))
    else {}
)
"""SO_RCVBUFFORCE and SO_SNDBUFFORCE of Linux's asm-generic/socket.h, which Python's socket
module does not name: as root they pass net.core.rmem_max / wmem_max."""


def _size_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte kernel buffers, past the system maximum when allowed (root).

    With Linux's default of about 200 KiB, a bulk transfer overflows the receive buffer
    and QUIC's congestion controller reads the drops as congestion. Without root, the
    kernel caps the size at net.core.rmem_max / wmem_max.
    """
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        forced = _FORCE_OPTIONS.get(option)
        if forced is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, forced, size)
        if sock.getsockopt(socket.SOL_SOCKET, option) < size:
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
            except OSError as exc:
                _log.debug("UDP buffer size %d refused: %s", size, exc)


def _refusal(header: QuicHeader) -> bytes:
    """A server Initial closing the connection with CONNECTION_REFUSED (RFC 9000 10.2.3)."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=header.destination_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    frame = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=16)
    frame.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    frame.push_uint_var(QuicFrameType.PADDING)
    frame.push_uint_var(0)
    datagrams, _ = builder.flush()
    return datagrams[0]


class QuicEndpoint(asyncio.DatagramProtocol):
    """A bound UDP socket and the QUIC connections it carries."""

    def __init__(self, sock: socket.socket, limits: QuicLimits) -> None:
        self._sock = sock
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._by_cid: dict[bytes, QuicConnection] = {}
        self._connections: set[QuicConnection] = set()
        self._dirty: dict[QuicConnection, None] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._retired = False
        self._lost = asyncio.Event()
        self.on_initial: InitialHandler | None = None
        """Set while a listener serves this socket."""
        host, port = sock.getsockname()[:2]
        self.family = sock.family
        self.local_addr: tuple[str, int] = (host, port)
        self.bound_ip = ipaddress.ip_address(host)

    @classmethod
    async def bind(cls, family: int, host: str, port: int, limits: QuicLimits) -> QuicEndpoint:
        """Bind a socket of ``family`` to ``(host, port)``; raises ``OSError``."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _size_buffers(sock, limits.udp_buffer_bytes)
            sock.bind((host, port))
            sock.setblocking(False)
            endpoint = cls(sock, limits)
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: endpoint, sock=sock)
        except BaseException:
            sock.close()
            raise
        return endpoint

    @property
    def udp_socket(self) -> socket.socket:
        return self._sock

    @property
    def is_open(self) -> bool:
        """Usable for new connections: neither closed nor retired."""
        return not self._retired and self.is_alive

    @property
    def is_alive(self) -> bool:
        """The socket is still open (perhaps retired, serving its last connections)."""
        return not self._lost.is_set() and not (
            self._transport is not None and self._transport.is_closing()
        )

    def can_reach(self, host: str) -> bool:
        """Whether this socket can send to ``host``: a wildcard bind, or the same scope."""
        return (
            self.bound_ip.is_unspecified
            or self.bound_ip.is_loopback == ipaddress.ip_address(host).is_loopback
        )

    def peer_address(self, host: str, port: int) -> NetworkAddress:
        """``(host, port)`` in the form this socket reports senders in."""
        return (host, port) if self.family == socket.AF_INET else (host, port, 0, 0)

    @property
    def pending_inbound_handshakes(self) -> int:
        """Inbound connections still authenticating (bounded by ``max_pending_handshakes``)."""
        return sum(1 for conn in self._connections if conn.is_inbound_handshake)

    # connection bookkeeping

    def add(self, conn: QuicConnection, *cids: bytes) -> None:
        self._connections.add(conn)
        for cid in cids:
            self.add_cid(cid, conn)

    def add_cid(self, cid: bytes, conn: QuicConnection) -> None:
        self._by_cid[cid] = conn
        conn.cids.add(cid)

    def retire_cid(self, cid: bytes) -> None:
        conn = self._by_cid.pop(cid, None)
        if conn is not None:
            conn.cids.discard(cid)

    def forget(self, conn: QuicConnection) -> None:
        """Drop a connection that aioquic has finished with."""
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.cids.clear()
        self._connections.discard(conn)
        self._dirty.pop(conn, None)
        if self._retired and not self._connections:
            self._close_socket()

    # sending

    def schedule_transmit(self, conn: QuicConnection) -> None:
        """Send ``conn``'s datagrams once this event-loop turn is over (coalescing writes)."""
        self._dirty[conn] = None
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._paused or not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            conn.transmit()

    def sendto(self, data: bytes, addr: NetworkAddress) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def send_datagram(self, data: bytes, host: str, port: int) -> None:
        """Send a raw datagram from this socket (hole punching)."""
        self.sendto(data, self.peer_address(host, port))

    # asyncio.DatagramProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        # asyncio reads one datagram per event-loop turn; read what else is queued, so
        # that aioquic answers a burst once, not once per datagram.
        self._receive_safely(data, addr)
        for _ in range(self._limits.datagrams_per_read - 1):
            try:
                data, addr = self._sock.recvfrom(_MAX_UDP_PAYLOAD)
            except OSError:
                break
            self._receive_safely(data, addr)
        self._flush()

    def error_received(self, exc: Exception) -> None:
        _log.debug("UDP socket %s: %s", self.local_addr, exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._dirty and self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for conn in list(self._connections):
            conn.socket_lost()
        self._connections.clear()
        self._by_cid.clear()
        self._dirty.clear()
        self._lost.set()

    def _receive_safely(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            self._receive(data, addr)
        except Exception:  # whatever a datagram holds, the socket keeps serving the others
            _log.exception("dropped a datagram from %s", addr)

    def _receive(self, data: bytes, addr: NetworkAddress) -> None:
        # The destination connection ID sits at a fixed place (RFC 9000 17.2 and 17.3): find
        # the connection without parsing the whole header, which aioquic parses again.
        if len(data) < 7:
            return
        if data[0] & 0x80:
            cid = data[6 : 6 + data[5]]
        else:
            cid = data[1 : 1 + CONNECTION_ID_BYTES]
        conn = self._by_cid.get(cid)
        if conn is not None:
            conn.receive(data, addr, self._loop.time())
            self._dirty[conn] = None
            return
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_BYTES)
        except ValueError:
            return
        if header.packet_type != QuicPacketType.INITIAL:
            return
        if header.version not in SUPPORTED_VERSIONS:
            self.sendto(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=list(SUPPORTED_VERSIONS),
                ),
                addr,
            )
        elif self.on_initial is not None:
            self.on_initial(self, header, data, addr, self._loop.time())
        else:
            self.sendto(_refusal(header), addr)

    # closing

    def serve(self, on_initial: InitialHandler) -> None:
        """Start a listener's service on this socket (taking it back from retirement)."""
        self._retired = False
        self.on_initial = on_initial

    def retire(self) -> None:
        """Take no new connections; close the socket once the current ones are gone."""
        self._retired = True
        self.on_initial = None
        if not self._connections:
            self._close_socket()

    async def close(self) -> None:
        """Close every connection (their CONNECTION_CLOSE goes out first), then the socket."""
        self._retired = True
        self.on_initial = None
        for conn in list(self._connections):
            conn.close_now()
        self._close_socket()
        await self._lost.wait()

    def _close_socket(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
