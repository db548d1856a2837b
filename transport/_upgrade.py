"""The libp2p upgrade ladder (specs: connections/README.md, tls/tls.md) over any byte stream.

A raw byte stream becomes an authenticated, multiplexed connection in three steps, the
same on both sides:

1. multistream-select agrees on ``/tls/1.0.0`` (the dialer proposes);
2. TLS 1.3, ALPN ``libp2p``, each side presenting the self-signed certificate of
   ``security.make_tls_certificate``. OpenSSL is told to accept any certificate
   (``_tls_verify``); the libp2p extension is then verified here and gives the remote
   PeerID, which the dialer compares with the one it expected;
3. multistream-select, inside TLS, agrees on ``/yamux/1.0.0``; the TLS transport then
   becomes a ``YamuxConnection`` with whatever the peer sent behind the negotiation.

``TcpTransport`` runs it on TCP sockets. ``StreamUpgrader`` runs it on a ``Stream`` of
another connection (a relay circuit is one): ``_StreamTransport`` makes the stream an
``asyncio.Transport`` so that asyncio's TLS and ``YamuxConnection`` run on it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from security import (
    LIBP2P_ALPN,
    InvalidCertificate,
    KeyPair,
    PeerId,
    TlsCertificate,
    make_tls_certificate,
    peer_id_from_certificate,
)

from ._base import Stream
from ._errors import HandshakeError, PeerIdMismatch, StreamClosed, TransportError
from ._limits import KIB, MultistreamLimits, TransportLimits
from ._multiaddr import Multiaddr
from ._multistream import handle_protocols, select_protocol
from ._tls_verify import request_any_peer_certificate
from ._yamux_conn import YamuxConnection

__all__ = ["TLS_PROTOCOL", "YAMUX_PROTOCOL", "StreamUpgrader", "UpgradedStream"]

TLS_PROTOCOL = "/tls/1.0.0"
YAMUX_PROTOCOL = "/yamux/1.0.0"
_HIGH_WATER_BYTES = 256 * KIB
_LOW_WATER_BYTES = 64 * KIB


class _Pipe(asyncio.Protocol):
    """The connection's protocol until yamux takes over: a ``ByteStream`` for the
    negotiations, before and inside TLS.

    What the peer sends beyond the negotiation stays buffered and goes to yamux with
    the transport (``detach``). The buffer is bounded: past ``limit`` unread bytes the
    socket is no longer read until the handshake reads them.
    """

    transport: asyncio.Transport
    """The TCP transport, then the TLS one; set by ``connection_made``."""

    def __init__(self, limit: int, on_connected: Callable[[_Pipe], None] | None = None) -> None:
        self._limit = limit
        self._on_connected = on_connected
        self._buffer = bytearray()
        self._eof = False
        self._lost: str | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._limit and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> None:
        self._eof = True
        self._wake_reader()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = "the connection was closed" if exc is None else f"the connection broke: {exc}"
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- ByteStream --------------------------------------------------------------------

    async def readexactly(self, n: int) -> bytes:
        buffer = self._buffer
        while len(buffer) < n:
            if self._eof or self._lost is not None:
                reason = self._lost or "peer closed the connection"
                raise StreamClosed(f"{reason} after {len(buffer)} of {n} expected bytes")
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        data = bytes(buffer[:n])
        del buffer[:n]
        if self._reading_paused and len(buffer) <= self._limit:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost is not None:
            raise StreamClosed(self._lost)
        self.transport.write(data)
        while self._writing_paused and self._lost is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    # -- upgrades ----------------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool) -> None:
        """Run the TLS handshake; this pipe then reads and writes through TLS."""
        if self._buffer:
            raise HandshakeError(
                f"peer sent {len(self._buffer)} bytes before its TLS handshake could start"
            )
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(self.transport, self, context, server_side=server_side)
        if tls is None:
            raise HandshakeError("the connection closed during the TLS handshake")
        self.transport = tls

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the transport: it and what the peer sent past the negotiation."""
        if self._eof or self._lost is not None:
            raise StreamClosed("peer closed the connection right after the handshake")
        received = bytes(self._buffer)
        self._buffer.clear()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        return self.transport, received


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


def _authenticate(transport: asyncio.Transport, peer: str) -> PeerId:
    """The PeerID proven by the remote's TLS certificate (libp2p extension verified)."""
    ssl_object = transport.get_extra_info("ssl_object")
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


async def negotiate_upgrade(
    pipe: _Pipe,
    tls: _TlsContexts,
    negotiation: MultistreamLimits,
    *,
    dialer: bool,
    expected: PeerId | None,
) -> PeerId:
    """Negotiate TLS, authenticate the remote, negotiate yamux; return the remote PeerID."""
    peer = f"peer {pipe.transport.get_extra_info('peername')}"
    with _step(f"negotiating {TLS_PROTOCOL}"):
        if dialer:
            await select_protocol(pipe, [TLS_PROTOCOL], limits=negotiation)
        else:
            await handle_protocols(pipe, [TLS_PROTOCOL], limits=negotiation)
    with _step("TLS 1.3 handshake"):
        context = tls.client if dialer else tls.server()
        await pipe.start_tls(context, server_side=not dialer)
    remote_peer = _authenticate(pipe.transport, peer)
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


class _StreamTransport(asyncio.Transport):
    """An ``asyncio.Transport`` whose bytes travel on a ``Stream`` of another connection.

    A reader task feeds the protocol what the stream delivers; a writer task writes what
    the protocol queued, in order, and signals ``pause_writing`` past a high-water mark.
    ``close`` half-closes and reads on until the peer's end (up to ``linger_s``), so that
    the peer's last bytes (TLS close_notify) are not reset away.
    """

    _start_tls_compatible = True

    def __init__(self, stream: Stream, extra: dict[str, Any], linger_s: float) -> None:
        super().__init__(extra)
        self._stream = stream
        self._linger_s = linger_s
        self._protocol: asyncio.BaseProtocol | None = None
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._wake_writer = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._eof_wanted = False
        self._lost = False
        self.lost = asyncio.Event()
        """Set once the stream is done with: the owner of the stream may close it then."""
        self._write_paused = False
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._write_loop())]

    # -- asyncio.Transport -------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._eof_wanted or not data:
            return
        self._out.append(bytes(data))
        self._out_bytes += len(data)
        self._wake_writer.set()
        if self._out_bytes > _HIGH_WATER_BYTES and not self._write_paused:
            self._write_paused = True
            if self._protocol is not None:
                self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._eof_wanted = True
        self._wake_writer.set()

    def get_write_buffer_size(self) -> int:
        return self._out_bytes

    def close(self) -> None:
        self._closing = True
        self._wake_writer.set()

    def abort(self) -> None:
        self._closing = True
        self._stream.reset()
        self._lose(None)

    def _force_close(self, exc: BaseException | None) -> None:
        """What asyncio's TLS calls on a fatal error (a peer's data after our close_notify
        makes the TLS shutdown fail): drop the stream at once."""
        self._closing = True
        self._stream.reset()
        self._lose(exc if isinstance(exc, Exception) else None)

    # -- pumps -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._reading.wait()
                data = await self._stream.read(_HIGH_WATER_BYTES)
                if not data:
                    break
                self._deliver(data)
        except TransportError as exc:
            self._lose(exc)
            return
        protocol = self._protocol
        if protocol is not None and not self._lost:
            keep_open = protocol.eof_received()  # type: ignore[attr-defined]
            if not keep_open:
                self.close()

    def _deliver(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._lost:
            protocol = self._protocol
            if isinstance(protocol, asyncio.BufferedProtocol):
                buffer = protocol.get_buffer(len(view))
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                protocol.buffer_updated(n)
                view = view[n:]
            else:
                protocol.data_received(bytes(view))  # type: ignore[union-attr]
                return

    async def _write_loop(self) -> None:
        stream = self._stream
        eof_sent = False
        try:
            while True:
                if self._out:
                    data = b"".join(self._out)
                    self._out.clear()
                    self._out_bytes = 0
                    await stream.write(data)
                    if self._write_paused and self._out_bytes <= _LOW_WATER_BYTES:
                        self._write_paused = False
                        if self._protocol is not None:
                            self._protocol.resume_writing()
                    continue
                if self._closing:
                    await stream.close_write()
                    self._reading.set()
                    await asyncio.wait(self._tasks[:1], timeout=self._linger_s)
                    await stream.close()
                    break
                if self._eof_wanted and not eof_sent:
                    await stream.close_write()
                    eof_sent = True
                self._wake_writer.clear()
                await self._wake_writer.wait()
        except TransportError as exc:
            self._lose(exc)
            return
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.lost.set()
        if exc is not None:
            self._stream.reset()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._protocol is not None:
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, exc)


@dataclass(frozen=True, slots=True)
class UpgradedStream:
    """A connection made over a stream, and when that stream is no longer used."""

    connection: YamuxConnection
    released: asyncio.Event
    """Set once the carrying stream is done with: its owner may let it go then."""


class StreamUpgrader:
    """Secures (TLS 1.3, libp2p certificate) and multiplexes (yamux) any ``Stream``.

    ``StreamUpgrader(identity, limits)`` makes the certificate once;
    ``await upgrader.upgrade(stream, dialer=..., ...)`` runs the ladder on one stream and
    returns the ``YamuxConnection`` it carries, under ``transport_name``. Both ends of
    the stream must call it, one as the dialer.
    """

    def __init__(
        self,
        identity: KeyPair,
        limits: TransportLimits = TransportLimits(),  # noqa: B008 - frozen value
    ) -> None:
        self._identity = identity
        self._limits = limits
        self._tls = _TlsContexts(make_tls_certificate(identity))

    async def upgrade(
        self,
        stream: Stream,
        *,
        dialer: bool,
        expected: PeerId | None,
        local_addr: Multiaddr,
        remote_addr: Multiaddr,
        transport_name: str,
    ) -> UpgradedStream:
        """Secure and multiplex ``stream``; raises ``HandshakeError`` or ``PeerIdMismatch``.

        The dialer's connection gets ``remote_addr`` with the proven ``/p2p/`` appended.
        The handshake is bounded by ``TcpLimits.handshake_timeout_s``.
        """
        limits = self._limits
        extra = {"peername": str(remote_addr), "sockname": None}
        carrier = _StreamTransport(stream, extra, limits.yamux.close_timeout_s)
        pipe = _Pipe(limits.tcp.read_chunk_bytes)
        carrier.attach(pipe)
        try:
            async with asyncio.timeout(limits.tcp.handshake_timeout_s):
                remote_peer = await negotiate_upgrade(
                    pipe, self._tls, limits.multistream, dialer=dialer, expected=expected
                )
            transport, received = pipe.detach()
        except BaseException as exc:
            carrier.abort()
            if isinstance(exc, TimeoutError):
                raise HandshakeError(
                    f"handshake with {remote_addr} did not finish within "
                    f"{limits.tcp.handshake_timeout_s:g}s (TcpLimits.handshake_timeout_s)"
                ) from None
            raise
        connection = YamuxConnection(
            transport,
            is_client=dialer,
            local_peer=self._identity.peer_id,
            remote_peer=remote_peer,
            local_addr=local_addr,
            remote_addr=remote_addr.with_p2p(remote_peer) if dialer else remote_addr,
            limits=limits.yamux,
            transport_name=transport_name,
            received=received,
        )
        connection.start()
        return UpgradedStream(connection, carrier.lost)
