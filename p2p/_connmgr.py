"""The connection manager's bookkeeping: which connections exist, limits, idleness.

Plain data and decisions, no I/O: the Host registers connections and stream counts
here and asks which connections to refuse, reuse or close for idleness; it does the
closing. ``now`` is always an argument (the event loop's clock).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from security import PeerId
from transport._base import Connection
from transport._multiaddr import Multiaddr

from ._errors import LimitExceeded
from ._limits import ConnectionLimits

RELAYED = "circuit"
"""``transport_name`` of relayed connections, used only when no direct one is open."""


@dataclass(slots=True, eq=False)
class ConnectionRecord:
    """One live connection and how busy it is."""

    conn: Connection
    peer: PeerId
    outbound: bool
    idle_since: float
    streams: int = 0
    """Streams open on it that the Host knows of (calls, handlers, streams handed out)."""
    closing: bool = field(default=False)

    def stream_opened(self) -> None:
        self.streams += 1

    def stream_closed(self, now: float) -> None:
        self.streams -= 1
        if not self.streams:
            self.idle_since = now


def order_addrs(addrs: Iterable[Multiaddr], preference: tuple[str, ...]) -> list[Multiaddr]:
    """``addrs`` sorted by transport preference (``ConnectionLimits.transport_preference``)."""
    rank = {kind: index for index, kind in enumerate(preference)}
    return sorted(addrs, key=lambda addr: rank.get(addr.transport_kind or "", len(rank)))


class ConnectionManager:
    """Live connections by peer, bounded by ``ConnectionLimits``."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._by_peer: dict[PeerId, list[ConnectionRecord]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, peer: PeerId) -> ConnectionRecord | None:
        """The connection to reuse for ``peer``: its oldest open direct one, else its
        oldest open relayed one."""
        records = self._by_peer.get(peer)
        if not records:
            return None
        first = records[0]
        if not first.closing and not first.conn.is_closed and first.conn.transport_name != RELAYED:
            return first
        fallback = None
        for record in records:
            if record.closing or record.conn.is_closed:
                continue
            if record.conn.transport_name != RELAYED:
                return record
            fallback = fallback or record
        return fallback

    def records(self, peer: PeerId | None = None) -> list[ConnectionRecord]:
        if peer is not None:
            return list(self._by_peer.get(peer, ()))
        return [record for records in self._by_peer.values() for record in records]

    def peers(self) -> list[PeerId]:
        return list(self._by_peer)

    def check_dial(self) -> None:
        """Raise ``LimitExceeded`` when no further connection may be opened."""
        if self._count >= self.limits.max_connections:
            raise LimitExceeded(
                f"{self._count} open connections reach "
                f"ConnectionLimits.max_connections={self.limits.max_connections}",
                value=self._count + 1,
                limit=self.limits.max_connections,
            )

    def admit(
        self, conn: Connection, peer: PeerId, *, outbound: bool, now: float
    ) -> ConnectionRecord | str:
        """Register ``conn``, or say why it must be refused (a limit's message)."""
        if self._count >= self.limits.max_connections:
            return (
                f"{self._count} open connections reach "
                f"ConnectionLimits.max_connections={self.limits.max_connections}"
            )
        records = self._by_peer.setdefault(peer, [])
        if len(records) >= self.limits.max_connections_per_peer:
            if not records:
                del self._by_peer[peer]
            return (
                f"{len(records)} connections to {peer} reach "
                "ConnectionLimits.max_connections_per_peer="
                f"{self.limits.max_connections_per_peer}"
            )
        record = ConnectionRecord(conn, peer, outbound, idle_since=now)
        records.append(record)
        self._count += 1
        return record

    def remove(self, record: ConnectionRecord) -> None:
        records = self._by_peer.get(record.peer)
        if records is None or record not in records:
            return
        records.remove(record)
        self._count -= 1
        if not records:
            del self._by_peer[record.peer]

    def idle(self, now: float) -> list[ConnectionRecord]:
        """Connections without streams for ``idle_timeout_s`` or longer, to be closed."""
        cutoff = now - self.limits.idle_timeout_s
        return [
            record
            for records in self._by_peer.values()
            for record in records
            if not record.streams and not record.closing and record.idle_since <= cutoff
        ]
