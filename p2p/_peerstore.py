"""What the Host knows about other peers: addresses, protocols, agent, latency, last seen.

Filled from dials, accepted connections, identify and ping. Everything in it may come
from an untrusted peer, so it is bounded by ``PeerStoreLimits``: the least recently seen
peer and a peer's oldest addresses make room for new ones. Times are the event loop's
clock (``loop.time()``), passed in by the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from security import PeerId
from transport._multiaddr import Multiaddr

from ._limits import PeerStoreLimits

_LATENCY_WEIGHT = 0.3
"""Weight of a new latency sample in the moving average."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A snapshot of one peer's record."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    """Known addresses without ``/p2p/``, oldest first."""
    protocols: frozenset[str] = frozenset()
    agent_version: str | None = None
    protocol_version: str | None = None
    latency_s: float | None = None
    """Exponential moving average of measured round trips."""
    last_seen: float | None = None


@dataclass(slots=True)
class _Record:
    addrs: dict[Multiaddr, None] = field(default_factory=dict)
    protocols: frozenset[str] = frozenset()
    agent_version: str | None = None
    protocol_version: str | None = None
    latency_s: float | None = None
    last_seen: float | None = None


class PeerStore:
    """PeerID -> what is known about that peer, bounded by ``PeerStoreLimits``."""

    def __init__(self, limits: PeerStoreLimits) -> None:
        self._limits = limits
        self._records: OrderedDict[PeerId, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, peer: object) -> bool:
        return peer in self._records

    def peers(self) -> list[PeerId]:
        """Known peers, least recently seen first."""
        return list(self._records)

    def get(self, peer: PeerId) -> PeerInfo | None:
        record = self._records.get(peer)
        if record is None:
            return None
        return PeerInfo(
            peer_id=peer,
            addrs=tuple(record.addrs),
            protocols=record.protocols,
            agent_version=record.agent_version,
            protocol_version=record.protocol_version,
            latency_s=record.latency_s,
            last_seen=record.last_seen,
        )

    def addrs(self, peer: PeerId) -> tuple[Multiaddr, ...]:
        record = self._records.get(peer)
        return tuple(record.addrs) if record is not None else ()

    def _record(self, peer: PeerId) -> _Record:
        record = self._records.get(peer)
        if record is None:
            while len(self._records) >= self._limits.max_peers:
                self._records.popitem(last=False)
            record = self._records[peer] = _Record()
        return record

    def add_addrs(self, peer: PeerId, addrs: Iterable[Multiaddr]) -> None:
        """Remember addresses (``/p2p/`` suffixes dropped); the newest are kept."""
        record = self._record(peer)
        for addr in addrs:
            if addr.components[-1][0] == "p2p":
                if len(addr.components) == 1:
                    continue
                addr = addr.without_p2p()
            record.addrs.pop(addr, None)
            record.addrs[addr] = None
        excess = len(record.addrs) - self._limits.max_addrs_per_peer
        for stale in list(record.addrs)[: max(0, excess)]:
            del record.addrs[stale]

    def remove_addr(self, peer: PeerId, addr: Multiaddr) -> None:
        record = self._records.get(peer)
        if record is not None:
            record.addrs.pop(addr, None)

    def set_protocols(self, peer: PeerId, protocols: Iterable[str]) -> None:
        limit = self._limits.max_protocols_per_peer
        kept: list[str] = []
        for protocol in protocols:
            if len(kept) == limit:
                break
            kept.append(protocol)
        self._record(peer).protocols = frozenset(kept)

    def set_agent(self, peer: PeerId, agent_version: str, protocol_version: str) -> None:
        record = self._record(peer)
        cap = self._limits.max_agent_version_chars
        record.agent_version = agent_version[:cap]
        record.protocol_version = protocol_version[:cap]

    def record_latency(self, peer: PeerId, seconds: float) -> None:
        record = self._record(peer)
        previous = record.latency_s
        record.latency_s = (
            seconds if previous is None else previous + _LATENCY_WEIGHT * (seconds - previous)
        )

    def seen(self, peer: PeerId, now: float) -> None:
        """Mark ``peer`` active at ``now``; it becomes the last to be evicted."""
        self._record(peer).last_seen = now
        self._records.move_to_end(peer)

    def remove(self, peer: PeerId) -> None:
        self._records.pop(peer, None)
