"""Relayed connections: TLS 1.3 and yamux over one stream that a relay pipes between two peers.

A circuit climbs the ladder of a TCP connection (``transport.StreamUpgrader``):
multistream-select agrees on ``/tls/1.0.0``, TLS 1.3 runs with each side's libp2p
certificate, and yamux runs inside TLS. The relay only sees ciphertext and cannot pose
as either end: the dialer checks the PeerID it expected, the listener learns the
dialer's from its certificate. ``CircuitTransport`` makes the result a ``Transport`` the
Host dials and listens with.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable

from security import KeyPair, PeerId
from transport._base import Connection, ConnectionHandler, Stream
from transport._errors import DialError, HandshakeError, MultiaddrError, TransportError
from transport._limits import TransportLimits
from transport._multiaddr import Multiaddr
from transport._upgrade import StreamUpgrader
from transport._yamux_conn import YamuxConnection

__all__ = ["CircuitListener", "CircuitTransport", "split_circuit"]

_log = logging.getLogger("p2p.nat.circuit")

TRANSPORT_NAME = "circuit"
_CIRCUIT = Multiaddr.from_string("/p2p-circuit")

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
        self._upgrader = StreamUpgrader(identity, limits)
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
        if addr.components[-1][0] == "p2p-circuit" and expected_peer is not None:
            addr = addr.with_p2p(expected_peer)  # as the peer store keeps it: no /p2p/<target>
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
        upgraded = await self._upgrader.upgrade(
            stream,
            dialer=True,
            expected=target,
            local_addr=relay.encapsulate(_CIRCUIT),
            remote_addr=addr,
            transport_name=TRANSPORT_NAME,
        )
        self._connections.add(upgraded.connection)
        return upgraded.connection

    async def accept(self, stream: Stream, relay_addr: Multiaddr, source: PeerId) -> None:
        """Serve a circuit the relay opened to us from ``source``, until it closes."""
        listener = self.listener
        if listener is None or self._closed:
            raise TransportError("not accepting relayed connections")
        circuit = relay_addr.encapsulate(_CIRCUIT)
        upgraded = await self._upgrader.upgrade(
            stream,
            dialer=False,
            expected=None,
            local_addr=circuit,
            remote_addr=circuit.with_p2p(source),
            transport_name=TRANSPORT_NAME,
        )
        connection = upgraded.connection
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
        await upgraded.released.wait()

    async def close(self) -> None:
        self._closed = True
        self.listener = None
        connections = list(self._connections)
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
