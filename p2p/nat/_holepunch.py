"""Hole punching (DCUtR-like): a relayed connection becomes a direct QUIC one.

When a peer accepts a relayed connection it starts a punch over it (it is the
*initiator*; the dialer of the circuit is the *responder*):

1. the initiator sends ``{"type": "connect", "addrs": [...]}`` with its public QUIC
   addresses (what others observed); the responder answers with its own, and the
   initiator measures the round trip;
2. the initiator sends ``{"type": "sync"}`` and, half a round trip later (when the sync
   arrives), starts sending random probe datagrams from its QUIC socket to the
   responder's addresses; the responder dials the initiator's addresses from its QUIC
   socket as soon as the sync arrives. The probes open the initiator's NAT for the
   responder's handshake; the handshake opens the responder's NAT for the probes, which
   QUIC ignores;
3. the responder answers ``{"ok": bool}``; on success the direct connection carries
   every new stream (the Host prefers direct connections) and the initiator closes the
   relayed one as soon as the streams still on it have ended (``Host.retire``).

``HolePunchLimits.attempts`` tries, then the peers stay relayed. Both sides send from
their one QUIC socket, whose NAT mapping the relay observed: a port-restricted cone NAT
keeps that port for the other peer too, a symmetric NAT does not (the punch then fails).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from security import PeerId
from transport._base import Connection, Stream
from transport._errors import MultiaddrError, TransportError
from transport._limits import KIB
from transport._multiaddr import Multiaddr
from transport._quic import QuicTransport

from .._errors import P2PError, PeerProtocolError
from ._circuit import TRANSPORT_NAME
from ._wire import encode_frame, field, read_frame

if TYPE_CHECKING:
    from .._host import Host
    from ._relay import Relay

__all__ = ["PROTOCOL_ID", "HolePunchLimits", "HolePuncher", "PunchResult", "punch_delay"]

_log = logging.getLogger("p2p.nat.holepunch")

PROTOCOL_ID = "/swarm/holepunch/1.0.0"


@dataclass(frozen=True, slots=True)
class HolePunchLimits:
    """Bounds and pacing of hole punching."""

    max_message_bytes: int = 4 * KIB
    max_addrs: int = 8
    attempts: int = 3
    """Punches tried per relayed connection before staying relayed."""
    dial_timeout_s: float = 3.0
    """How long the responder's direct dial may take, per attempt."""
    probe_interval_s: float = 0.02
    """The initiator sends one probe per responder address this often while it waits."""
    probe_bytes: int = 64
    """Below QUIC's smallest datagram: a QUIC endpoint drops it unread."""
    retry_delay_s: float = 0.5
    request_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class PunchResult:
    peer: PeerId
    direct: bool
    attempts: int
    rtt_s: float | None
    """The round trip over the relay, measured by the last attempt."""


def punch_delay(sent_at: float, answered_at: float) -> tuple[float, float]:
    """(round trip, wait after sending the sync): half a round trip, when the sync lands."""
    rtt = max(0.0, answered_at - sent_at)
    return rtt, rtt / 2


def _udp_endpoints(addrs: Sequence[Multiaddr], limit: int) -> list[tuple[Multiaddr, str, int]]:
    """Dialable QUIC addresses (no wildcard IP) with their host and port."""
    out: list[tuple[Multiaddr, str, int]] = []
    for addr in addrs:
        if addr.transport_kind != "quic":
            continue
        try:
            addr = addr.without_p2p()
            host, port = addr.host_port()
            if ipaddress.ip_address(host).is_unspecified or port == 0:
                continue
        except (MultiaddrError, ValueError):
            continue
        if all(addr != known for known, _, _ in out):
            out.append((addr, host, port))
        if len(out) >= limit:
            break
    return out


def _decode_addrs(message: dict[str, Any]) -> list[Multiaddr]:
    addrs = []
    for raw in field(message, "addrs", list):
        try:
            addrs.append(Multiaddr.from_bytes(raw))
        except (MultiaddrError, TypeError):
            continue
    return addrs


class HolePuncher:
    """Turns relayed connections into direct QUIC ones.

    ``HolePuncher(host, quic, relay)``; ``start()`` serves the protocol and punches every
    relayed connection ``relay`` accepts; ``results`` lists the outcomes.
    """

    def __init__(
        self,
        host: Host,
        quic: QuicTransport,
        relay: Relay,
        *,
        limits: HolePunchLimits = HolePunchLimits(),
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._host = host
        self._quic = quic
        self._relay = relay
        self._limits = limits
        self._random_bytes = random_bytes
        self._tasks: set[asyncio.Task[Any]] = set()
        self.results: list[PunchResult] = []

    async def start(self) -> None:
        self._host.set_stream_handler(PROTOCOL_ID, self._on_stream)
        self._relay.transport.on_accepted = self._on_relayed

    async def stop(self) -> None:
        self._host.remove_handler(PROTOCOL_ID)
        self._relay.transport.on_accepted = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _public_addrs(self) -> list[Multiaddr]:
        observed = sorted(self._host.observed_addrs.items(), key=lambda item: -item[1])
        addrs = [addr for addr, _ in observed] + self._host.listen_addrs
        return [addr for addr, _, _ in _udp_endpoints(addrs, self._limits.max_addrs)]

    def _on_relayed(self, conn: Connection) -> None:
        task = asyncio.get_running_loop().create_task(self.punch(conn.remote_peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- initiator ---------------------------------------------------------------------

    async def punch(self, peer: PeerId) -> PunchResult:
        """Try to replace the relayed connection to ``peer`` with a direct one."""
        rtt = None
        attempt = 0
        direct = False
        for attempt in range(1, self._limits.attempts + 1):
            try:
                direct, rtt = await self._attempt(peer)
            except (P2PError, TransportError, TimeoutError) as exc:
                _log.info("hole punch %d to %s broke off: %r", attempt, peer, exc)
            if direct:
                break
            await asyncio.sleep(self._limits.retry_delay_s)
        result = PunchResult(peer, direct, attempt, rtt)
        _log.info("hole punch to %s: %s", peer, result)
        self.results.append(result)
        if direct:
            for conn in self._host.connections(peer):
                if conn.transport_name == TRANSPORT_NAME:
                    self._host.retire(conn)
        return result

    async def _attempt(self, peer: PeerId) -> tuple[bool, float]:
        limits = self._limits
        loop = asyncio.get_running_loop()
        stream, _ = await self._host.new_stream(peer, [PROTOCOL_ID])
        try:
            if stream.connection.transport_name != TRANSPORT_NAME:
                return True, 0.0
            async with asyncio.timeout(limits.request_timeout_s):
                sent_at = loop.time()
                own = [a.to_bytes() for a in self._public_addrs()]
                await stream.write(encode_frame({"type": "connect", "addrs": own}))
                answer = await read_frame(stream, limits.max_message_bytes)
                rtt, wait = punch_delay(sent_at, loop.time())
                targets = _udp_endpoints(_decode_addrs(answer), limits.max_addrs)
                await stream.write(encode_frame({"type": "sync"}))
            await asyncio.sleep(wait)
            async with asyncio.TaskGroup() as group:
                prober = group.create_task(self._probe([(h, p) for _, h, p in targets]))
                try:
                    async with asyncio.timeout(limits.dial_timeout_s + limits.request_timeout_s):
                        outcome = await read_frame(stream, limits.max_message_bytes)
                finally:
                    prober.cancel()
            if outcome.get("ok") is not True:
                return False, rtt
            async with asyncio.timeout(limits.request_timeout_s):
                while not any(c.transport_name == "quic" for c in self._host.connections(peer)):  # noqa: ASYNC110
                    await asyncio.sleep(limits.probe_interval_s)
            return True, rtt
        finally:
            await stream.close()

    async def _probe(self, targets: list[tuple[str, int]]) -> None:
        while True:
            for target in targets:
                try:
                    self._quic.send_datagram(self._random_bytes(self._limits.probe_bytes), target)
                except (TransportError, OSError) as exc:
                    _log.debug("probe to %s failed: %s", target, exc)
            await asyncio.sleep(self._limits.probe_interval_s)

    # -- responder ---------------------------------------------------------------------

    async def _on_stream(self, stream: Stream, peer: PeerId) -> None:
        limits = self._limits
        if stream.connection.transport_name != TRANSPORT_NAME:
            raise PeerProtocolError(f"{peer} asked for a hole punch over a direct connection")
        async with asyncio.timeout(limits.request_timeout_s):
            message = await read_frame(stream, limits.max_message_bytes)
            if message.get("type") != "connect":
                raise PeerProtocolError(f"{peer} began a hole punch without connect")
            targets = _udp_endpoints(_decode_addrs(message), limits.max_addrs)
            own = [a.to_bytes() for a in self._public_addrs()]
            await stream.write(encode_frame({"type": "connect", "addrs": own}))
            sync = await read_frame(stream, limits.max_message_bytes)
            if sync.get("type") != "sync":
                raise PeerProtocolError(f"{peer} sent no sync in its hole punch")
        ok = await self._dial(peer, [addr for addr, _, _ in targets])
        await stream.write(encode_frame({"ok": ok}))

    async def _dial(self, peer: PeerId, addrs: list[Multiaddr]) -> bool:
        for addr in addrs:
            try:
                conn = await self._quic.dial(addr, peer, timeout=self._limits.dial_timeout_s)
            except (TransportError, OSError) as exc:
                _log.debug("direct dial of %s at %s failed: %r", peer, addr, exc)
                continue
            try:
                self._host.add_connection(conn)
            except P2PError as exc:
                _log.info("direct connection to %s refused: %s", peer, exc)
                await conn.close()
                return False
            return True
        return False
