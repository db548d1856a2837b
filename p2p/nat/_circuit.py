"""Relayed connections: TLS 1.3 and yamux over one stream that a relay pipes between two peers.

A circuit climbs the ladder of a TCP connection (``transport/_tcp.py``): multistream-select
agrees on ``/tls/1.0.0``, TLS 1.3 runs with each side's libp2p certificate, and yamux
runs inside TLS. The relay only sees ciphertext and cannot pose as either end: the
dialer checks the PeerID it expected, the listener learns the dialer's from its
certificate. ``_StreamTransport`` makes the relayed stream an ``asyncio.Transport`` so
that asyncio's TLS and ``YamuxConnection`` run on it unchanged; ``CircuitTransport``
makes the result a ``Transport`` the Host dials and listens with.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from security import KeyPair, PeerId
from transport._base import Connection, ConnectionHandler, Stream
from transport._errors import DialError, HandshakeError, MultiaddrError, TransportError
from transport._limits import KIB, TransportLimits
from transport._multiaddr import Multiaddr
from transport._tcp import TcpTransport, _Pipe
from transport._yamux_conn import YamuxConnection

__all__ = ["CircuitListener", "CircuitTransport", "split_circuit", "upgrade_circuit"]

_log = logging.getLogger("p2p.nat.circuit")

TRANSPORT_NAME = "circuit"
_HIGH_WATER_BYTES = 256 * KIB
_LOW_WATER_BYTES = 64 * KIB

CircuitOpener = Callable[[Multiaddr, PeerId], Awaitable[Stream]]
"""``await open(relay_addr, target)``: a stream the relay pipes to ``target``."""


def split_circuit(addr: Multiaddr) -> tuple[Multiaddr, PeerId]:
    """``/<relay addr>/p2p/<relay>/p2p-circuit/p2p/<target>`` as (relay address, target)."""
    names = [name for name, _ in addr.components]
    if names.count("p2p-circuit") != 1:
        raise MultiaddrError(f"{addr} is not a relay circuit address with one relay")
    cut = names.index("p2p-circuit")
    relay = Multiaddr.from_string(
        "".join(f"/{n}/{v}" if v else f"/{n}" for n, v in addr.components[:cut])
    )
    rest = addr.components[cut + 1 :]
    target = addr.peer_id
    if relay.peer_id is None or len(rest) != 1 or target is None:
        raise MultiaddrError(f"{addr} must read /<relay addr>/p2p/<relay>/p2p-circuit/p2p/<target>")
    if relay.transport_kind not in ("quic", "tcp"):
        raise MultiaddrError(f"{addr}: a relay is reached directly, over QUIC or TCP")
    return relay, target


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


async def upgrade_circuit(
    stream: Stream,
    upgrader: TcpTransport,
    limits: TransportLimits,
    *,
    dialer: bool,
    expected: PeerId | None,
    local_peer: PeerId,
    local_addr: Multiaddr,
    remote_addr: Multiaddr,
) -> tuple[YamuxConnection, asyncio.Event]:
    """Secure and multiplex a relayed stream; ``HandshakeError`` or ``PeerIdMismatch``.

    Returns the connection and an event set once the stream is no longer used.
    """
    extra = {"peername": str(remote_addr), "sockname": None}
    carrier = _StreamTransport(stream, extra, limits.yamux.close_timeout_s)
    pipe = _Pipe(limits.tcp.read_chunk_bytes)
    carrier.attach(pipe)
    try:
        async with asyncio.timeout(limits.tcp.handshake_timeout_s):
            remote_peer = await upgrader._upgrade(pipe, dialer=dialer, expected=expected)
        transport, received = pipe.detach()
    except BaseException as exc:
        carrier.abort()
        if isinstance(exc, TimeoutError):
            raise HandshakeError(
                f"relayed handshake with {remote_addr} did not finish within "
                f"{limits.tcp.handshake_timeout_s:g}s (TcpLimits.handshake_timeout_s)"
            ) from None
        raise
    connection = YamuxConnection(
        transport,
        is_client=dialer,
        local_peer=local_peer,
        remote_peer=remote_peer,
        local_addr=local_addr,
        remote_addr=remote_addr.with_p2p(remote_peer) if dialer else remote_addr,
        limits=limits.yamux,
        transport_name=TRANSPORT_NAME,
        received=received,
    )
    connection.start()
    return connection, carrier.lost


class CircuitListener:
    """Accepts circuits while open; ``addrs`` are the live reservations' circuit addresses."""

    def __init__(self, transport: CircuitTransport, handler: ConnectionHandler) -> None:
        self._transport = transport
        self.handler = handler

    @property
    def addrs(self) -> list[Multiaddr]:
        return self._transport.circuit_addrs()

    async def close(self) -> None:
        if self._transport.listener is self:
            self._transport.listener = None


class CircuitTransport:
    """Dials ``…/p2p/<relay>/p2p-circuit/p2p/<target>`` and accepts circuits a relay opens.

    ``open_circuit`` asks the relay for a stream to the target; ``circuit_addrs`` lists
    where this peer can be reached (its reservations). Both come from ``Relay``.
    """

    def __init__(
        self,
        identity: KeyPair,
        open_circuit: CircuitOpener,
        circuit_addrs: Callable[[], list[Multiaddr]],
        limits: TransportLimits = TransportLimits(),  # noqa: B008 - frozen value
    ) -> None:
        self._identity = identity
        self._open_circuit = open_circuit
        self.circuit_addrs = circuit_addrs
        self._limits = limits
        self._upgrader = TcpTransport(identity, limits)
        self._connections: weakref.WeakSet[YamuxConnection] = weakref.WeakSet()
        self.listener: CircuitListener | None = None
        self.on_accepted: Callable[[Connection], None] | None = None
        """Called with each relayed connection accepted (hole punching starts there)."""
        self._closed = False

    @property
    def name(self) -> str:
        return TRANSPORT_NAME

    def can_dial(self, addr: Multiaddr) -> bool:
        return addr.transport_kind == "circuit"

    def can_listen(self, addr: Multiaddr) -> bool:
        return addr.transport_kind == "circuit" and addr.components == (("p2p-circuit", None),)

    async def listen(self, addr: Multiaddr, handler: ConnectionHandler) -> CircuitListener:
        """Listen on ``/p2p-circuit``: accept what relays holding our reservations open."""
        if not self.can_listen(addr):
            raise MultiaddrError(f"CircuitTransport listens on /p2p-circuit only, not {addr}")
        if self._closed:
            raise TransportError("the circuit transport is closed")
        self.listener = CircuitListener(self, handler)
        return self.listener

    async def dial(
        self, addr: Multiaddr, expected_peer: PeerId | None = None, *, timeout: float | None = None
    ) -> YamuxConnection:
        if self._closed:
            raise DialError(f"cannot dial {addr}: the circuit transport is closed", addr=addr)
        relay, target = split_circuit(addr)
        if expected_peer is not None and expected_peer != target:
            raise DialError(f"{addr} leads to {target}, not to {expected_peer}", addr=addr)
        budget = self._limits.dial_timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(budget):
                stream = await self._open_circuit(relay, target)
        except TimeoutError:
            raise DialError(
                f"relay of {addr} did not answer within {budget:g}s", addr=addr
            ) from None
        connection, _ = await upgrade_circuit(
            stream,
            self._upgrader,
            self._limits,
            dialer=True,
            expected=target,
            local_peer=self._identity.peer_id,
            local_addr=relay.encapsulate(Multiaddr.from_string("/p2p-circuit")),
            remote_addr=addr,
        )
        self._connections.add(connection)
        return connection

    async def accept(self, stream: Stream, relay_addr: Multiaddr, source: PeerId) -> None:
        """Serve a circuit the relay opened to us from ``source``, until it closes."""
        listener = self.listener
        if listener is None or self._closed:
            raise TransportError("not accepting relayed connections")
        circuit = relay_addr.encapsulate(Multiaddr.from_string("/p2p-circuit"))
        connection, released = await upgrade_circuit(
            stream,
            self._upgrader,
            self._limits,
            dialer=False,
            expected=None,
            local_peer=self._identity.peer_id,
            local_addr=circuit,
            remote_addr=circuit.with_p2p(source),
        )
        if connection.remote_peer != source:
            await connection.close()
            raise HandshakeError(
                f"relay announced {source} but the circuit proved {connection.remote_peer}"
            )
        self._connections.add(connection)
        try:
            await listener.handler(connection)
            if self.on_accepted is not None and not connection.is_closed:
                self.on_accepted(connection)
        except Exception:
            _log.exception("connection handler failed for relayed %s", source)
        await connection.wait_closed()
        await released.wait()

    async def close(self) -> None:
        self._closed = True
        self.listener = None
        connections = list(self._connections)
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
        await self._upgrader.close()
