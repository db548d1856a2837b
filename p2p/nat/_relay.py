"""Relaying (circuit-relay-v2-like): reachable peers pipe streams for unreachable ones.

An unreachable peer reserves a slot on a reachable one (``reserve``) over a hop stream
it keeps open: the reservation lives while that stream does, up to
``RelayLimits.reservation_ttl_s``, and the holder renews it on the same stream at half
its lifetime, and drops it the moment that stream ends (the relay left or forgot it) or
a renewal fails, so that a dead relay's address is not advertised on. Meanwhile the
holder is reachable at ``/<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>``. A dialer
asks the relay to connect it; the relay opens a stop stream to the target and pipes
the two streams together, cutting the circuit past ``circuit_max_bytes`` or
``circuit_max_duration_s``. The two ends then run TLS and yamux over it (``_circuit``).
A relay refuses requests that reach it over a circuit: a relay is never reached through
a relay.

``/swarm/relay/hop/1.0.0`` (peer -> relay): ``{"type": "reserve"}`` answered
``{"ok": True, "ttl": s}``, repeated to renew; or ``{"type": "connect", "peer": id bytes}``
answered ``{"ok": True, "max_bytes", "max_seconds"}`` and followed by the circuit's bytes.
``/swarm/relay/stop/1.0.0`` (relay -> target): ``{"from": id bytes, "max_bytes",
"max_seconds"}`` answered ``{"ok": True}``, then the circuit's bytes. Any refusal is
``{"error": text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from security import InvalidPeerId, KeyPair, PeerId
from transport._base import Stream
from transport._errors import TransportError
from transport._multiaddr import Multiaddr

from .._errors import P2PError, PeerProtocolError
from ._circuit import TRANSPORT_NAME, CircuitTransport
from ._relay_limits import RelayLimits
from ._wire import encode_frame, field, read_frame

if TYPE_CHECKING:
    from .._host import Host

__all__ = ["HOP_PROTOCOL_ID", "STOP_PROTOCOL_ID", "Relay", "Reservation"]

_log = logging.getLogger("p2p.nat.relay")

HOP_PROTOCOL_ID = "/swarm/relay/hop/1.0.0"
STOP_PROTOCOL_ID = "/swarm/relay/stop/1.0.0"
_CIRCUIT = Multiaddr.from_string("/p2p-circuit")


@dataclass(frozen=True, slots=True)
class Reservation:
    """A slot held on a relay: where it makes us reachable and for how long."""

    relay: PeerId
    addr: Multiaddr
    """``/<relay addr>/p2p/<relay>/p2p-circuit`` (our own ``/p2p/`` is added by the Host)."""
    ttl_s: float


@dataclass(slots=True)
class _Held:
    """A reservation on the relay's side."""

    ip: str
    expires: float


class _CircuitCut(Exception):
    """A circuit went past one of its limits."""


def _ip_of(addr: Multiaddr) -> str:
    return addr.components[0][1] or ""


def _peer_field(message: dict[str, Any], name: str) -> PeerId:
    try:
        return PeerId.from_bytes(field(message, name, bytes))
    except InvalidPeerId as exc:
        raise PeerProtocolError(f"relay message field {name!r} is no PeerID: {exc}") from None


class Relay:
    """Uses relays (``reserve``, dialing circuit addresses) and, with ``serve=True``, is one.

    ``Relay(host, identity)``; ``start()`` registers the protocols and a circuit
    transport on the running Host (so its ``addrs`` list the reservations' circuit
    addresses and ``host.connect`` dials them); ``stop()`` drops reservations and circuits.
    """

    def __init__(
        self,
        host: Host,
        identity: KeyPair,
        *,
        serve: bool = False,
        limits: RelayLimits = RelayLimits(),  # noqa: B008 - frozen value
        clock: Callable[[], float] | None = None,
    ) -> None:
        if identity.peer_id != host.peer_id:
            raise ValueError("Relay needs the Host's own identity")
        self._host = host
        self._serve = serve
        self._limits = limits
        self._clock = clock
        self.transport = CircuitTransport(
            identity, self._open_circuit, self.circuit_addrs, host.limits.transport
        )
        self._reservations: dict[PeerId, tuple[Reservation, Stream, asyncio.Task[None]]] = {}
        self._held: dict[PeerId, _Held] = {}
        self._circuits: dict[PeerId, int] = {}
        self._circuit_count = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def start(self) -> None:
        self._host.set_stream_handler(STOP_PROTOCOL_ID, self._on_stop)
        self.set_serving(self._serve)
        await self._host.add_transport(self.transport, _CIRCUIT)

    @property
    def serving(self) -> bool:
        """Whether this peer relays for others (answers the hop protocol)."""
        return self._serve

    def set_serving(self, serve: bool) -> None:
        """Start or stop relaying for others; reservations and circuits held stay."""
        self._serve = serve
        if serve:
            self._host.set_stream_handler(HOP_PROTOCOL_ID, self._on_hop)
        else:
            self._host.remove_handler(HOP_PROTOCOL_ID)

    async def stop(self) -> None:
        self._host.remove_handler(STOP_PROTOCOL_ID)
        self._host.remove_handler(HOP_PROTOCOL_ID)
        for _, stream, task in self._reservations.values():
            task.cancel()
            stream.reset()
        self._reservations.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()

    # -- using relays ------------------------------------------------------------------

    @property
    def reservations(self) -> list[Reservation]:
        return [reservation for reservation, _, _ in self._reservations.values()]

    def circuit_addrs(self) -> list[Multiaddr]:
        return [reservation.addr for reservation in self.reservations]

    async def reserve(self, relay: PeerId | Multiaddr) -> Reservation:
        """Reserve a slot on ``relay`` (a direct connection) and keep renewing it.

        Raises ``P2PError`` when the relay refuses or cannot be reached directly.
        """
        peer = await self._host.connect(relay)
        existing = self._reservations.get(peer)
        if existing is not None:
            return existing[0]
        direct = [c for c in self._host.connections(peer) if c.transport_name != TRANSPORT_NAME]
        if not direct:
            raise P2PError(f"relay {peer} must be reached directly, not through a relay")
        stream, _ = await self._host.new_stream(peer, [HOP_PROTOCOL_ID])
        try:
            ttl = await self._ask_reservation(stream, peer)
        except BaseException:
            stream.reset()
            raise
        addr = direct[0].remote_addr.with_p2p(peer).encapsulate(_CIRCUIT)
        reservation = Reservation(peer, addr, ttl)
        task = asyncio.get_running_loop().create_task(self._keep(reservation, stream))
        self._reservations[peer] = (reservation, stream, task)
        return reservation

    async def _ask_reservation(self, stream: Stream, relay: PeerId) -> float:
        try:
            async with asyncio.timeout(self._limits.request_timeout_s):
                await stream.write(encode_frame({"type": "reserve"}))
                answer = await read_frame(stream, self._limits.max_message_bytes)
        except (TimeoutError, TransportError) as exc:
            raise P2PError(f"reservation on relay {relay} failed: {exc!r}") from exc
        if "error" in answer:
            raise P2PError(f"relay {relay} refused a reservation: {answer['error']}")
        ttl = answer.get("ttl")
        if not isinstance(ttl, float | int) or isinstance(ttl, bool) or ttl <= 0:
            raise PeerProtocolError(f"relay {relay} granted a reservation without a valid ttl")
        return float(ttl)

    async def _keep(self, reservation: Reservation, stream: Stream) -> None:
        """Renew at half the lifetime; drop the reservation as soon as the relay's stream
        ends (the relay left or forgot us) or a renewal fails."""
        try:
            ttl = reservation.ttl_s
            while True:
                try:
                    async with asyncio.timeout(ttl / 2):
                        data = await stream.read(1)
                except TimeoutError:
                    ttl = await self._ask_reservation(stream, reservation.relay)
                    continue
                raise P2PError(
                    "the relay closed the reservation stream"
                    if not data
                    else "the relay sent bytes on an idle reservation"
                )
        except (P2PError, TransportError) as exc:
            _log.info("reservation on relay %s ended: %s", reservation.relay, exc)
        finally:
            held = self._reservations.get(reservation.relay)
            if held is not None and held[2] is asyncio.current_task():
                del self._reservations[reservation.relay]
            stream.reset()

    async def _open_circuit(self, relay_addr: Multiaddr, target: PeerId) -> Stream:
        relay = await self._host.connect(relay_addr)
        if not any(c.transport_name != TRANSPORT_NAME for c in self._host.connections(relay)):
            raise P2PError(f"relay {relay} must be reached directly, not through a relay")
        stream, _ = await self._host.new_stream(relay, [HOP_PROTOCOL_ID])
        try:
            await stream.write(encode_frame({"type": "connect", "peer": target.to_bytes()}))
            answer = await read_frame(stream, self._limits.max_message_bytes)
            if "error" in answer:
                raise P2PError(f"relay {relay} could not connect us to {target}: {answer['error']}")
        except BaseException:
            stream.reset()
            raise
        return stream

    async def _on_stop(self, stream: Stream, relay: PeerId) -> None:
        message = await read_frame(stream, self._limits.max_message_bytes)
        source = _peer_field(message, "from")
        held = self._reservations.get(relay)
        if held is None or self.transport.listener is None:
            await stream.write(encode_frame({"error": "no reservation with this relay"}))
            return
        await stream.write(encode_frame({"ok": True}))
        await self.transport.accept(stream, held[0].addr, source)

    # -- serving as a relay ------------------------------------------------------------

    async def _on_hop(self, stream: Stream, peer: PeerId) -> None:
        conn = stream.connection
        message = await read_frame(stream, self._limits.max_message_bytes)
        if conn.transport_name == TRANSPORT_NAME:
            await stream.write(encode_frame({"error": "a relay is not reached through a relay"}))
            return
        kind = message.get("type")
        if kind == "reserve":
            await self._serve_reservation(stream, peer, _ip_of(conn.remote_addr))
        elif kind == "connect":
            await self._serve_connect(stream, peer, _peer_field(message, "peer"))
        else:
            raise PeerProtocolError(f"{peer} sent a relay request of unknown type {kind!r}")

    def _refuse_reservation(self, peer: PeerId, ip: str) -> str | None:
        now = self._now()
        for holder, held in list(self._held.items()):
            if held.expires <= now:
                del self._held[holder]
        if peer in self._held:
            return "this peer holds a reservation already"
        limits = self._limits
        if len(self._held) >= limits.max_reservations:
            return f"relay is full (RelayLimits.max_reservations={limits.max_reservations})"
        same_ip = sum(1 for held in self._held.values() if held.ip == ip)
        if same_ip >= limits.max_reservations_per_ip:
            return (
                f"{same_ip} reservations from {ip} already "
                f"(RelayLimits.max_reservations_per_ip={limits.max_reservations_per_ip})"
            )
        return None

    async def _serve_reservation(self, stream: Stream, peer: PeerId, ip: str) -> None:
        refusal = self._refuse_reservation(peer, ip)
        if refusal is not None:
            await stream.write(encode_frame({"error": refusal}))
            return
        ttl = self._limits.reservation_ttl_s
        held = _Held(ip, self._now() + ttl)
        self._held[peer] = held
        try:
            while True:
                await stream.write(encode_frame({"ok": True, "ttl": ttl}))
                async with asyncio.timeout(max(0.0, held.expires - self._now())):
                    message = await read_frame(stream, self._limits.max_message_bytes)
                if message.get("type") != "reserve":
                    raise PeerProtocolError(f"{peer} sent a non-renewal on its reservation")
                held.expires = self._now() + ttl
        except TimeoutError:
            _log.debug("reservation of %s expired", peer)
        finally:
            if self._held.get(peer) is held:
                del self._held[peer]

    def _refuse_circuit(self, source: PeerId, target: PeerId) -> str | None:
        limits = self._limits
        held = self._held.get(target)
        if held is None or held.expires <= self._now():
            return f"{target} holds no reservation on this relay"
        if self._circuit_count >= limits.max_circuits:
            return f"relay carries RelayLimits.max_circuits={limits.max_circuits} circuits"
        for peer in (source, target):
            if self._circuits.get(peer, 0) >= limits.max_circuits_per_peer:
                return (
                    f"{peer} has RelayLimits.max_circuits_per_peer="
                    f"{limits.max_circuits_per_peer} circuits"
                )
        return None

    async def _serve_connect(self, stream: Stream, source: PeerId, target: PeerId) -> None:
        limits = self._limits
        refusal = self._refuse_circuit(source, target)
        if refusal is not None:
            await stream.write(encode_frame({"error": refusal}))
            return
        grant = {
            "max_bytes": limits.circuit_max_bytes,
            "max_seconds": limits.circuit_max_duration_s,
        }
        self._circuit_count += 1
        for peer in (source, target):
            self._circuits[peer] = self._circuits.get(peer, 0) + 1
        try:
            try:
                async with asyncio.timeout(limits.request_timeout_s):
                    other, _ = await self._host.new_stream(target, [STOP_PROTOCOL_ID])
                    await other.write(encode_frame({"from": source.to_bytes(), **grant}))
                    answer = await read_frame(other, limits.max_message_bytes)
            except (TimeoutError, P2PError, TransportError) as exc:
                await stream.write(encode_frame({"error": f"{target} did not answer: {exc!r}"}))
                return
            if "error" in answer:
                other.reset()
                await stream.write(encode_frame({"error": f"{target}: {answer['error']}"}))
                return
            await stream.write(encode_frame({"ok": True, **grant}))
            await self._pipe(stream, other, source, target)
        finally:
            self._circuit_count -= 1
            for peer in (source, target):
                self._circuits[peer] -= 1
                if not self._circuits[peer]:
                    del self._circuits[peer]

    async def _pipe(self, a: Stream, b: Stream, source: PeerId, target: PeerId) -> None:
        """Copy both ways until both ends finish; past a limit, reset both."""
        limits = self._limits
        carried = [0]

        async def copy(src: Stream, dst: Stream) -> None:
            """One direction; a reset travels on, a closed destination only ends it."""
            while True:
                try:
                    data = await src.read(limits.pipe_chunk_bytes)
                except TransportError:
                    dst.reset()
                    return
                carried[0] += len(data)
                if carried[0] > limits.circuit_max_bytes:
                    raise _CircuitCut(f"carried over {limits.circuit_max_bytes} bytes")
                try:
                    await (dst.write(data) if data else dst.close_write())
                except TransportError:
                    return
                if not data:
                    return

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(copy(a, b)), loop.create_task(copy(b, a))]
        cut: BaseException | None = None
        try:
            async with asyncio.timeout(limits.circuit_max_duration_s):
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            cut = next((t.exception() for t in done if t.exception() is not None), None)
        except TimeoutError as exc:
            cut = exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if cut is not None:
            if not isinstance(cut, _CircuitCut | TimeoutError):
                raise cut
            _log.info("circuit %s -> %s cut: %r", source, target, cut)
            a.reset()
            b.reset()
            return
        with contextlib.suppress(TransportError):
            await b.close()
