"""The request-answering side of one DHT node, sans-IO.

``DhtCore`` holds the routing table and the record store and turns one inbound
request into one reply. The asyncio shell (``_node.py``) and the in-process simulator
both drive it; neither reads a clock inside: ``now`` is an argument.
"""

from __future__ import annotations

from collections import Counter

from security import PeerId

from ._contact import Contact
from ._errors import RateLimited, RecordRejected, RefusalCode
from ._ids import key_id
from ._limits import DhtLimits
from ._messages import FindNode, FindValue, Ping, Reply, Request, Store
from ._records import Entry, ValidatorChain
from ._routing import RoutingTable, Update
from ._store import RateLimiter, RecordStore


class DhtCore:
    """Routing table, record store and request rate limits of one node."""

    def __init__(
        self,
        local: PeerId,
        limits: DhtLimits,
        *,
        now: float,
        validators: ValidatorChain | None = None,
    ) -> None:
        self.local = local
        self.limits = limits
        self.table = RoutingTable(local, limits, now=now)
        self.store = RecordStore(limits, validators)
        self.requests: Counter[str] = Counter()
        self._rate = RateLimiter(
            limits.request_rate_per_s, limits.request_burst, limits.max_tracked_peers
        )

    @property
    def refusals(self) -> Counter[RefusalCode]:
        """Refused stores and requests by code, since start."""
        return self.store.refusals

    def handle(
        self, sender: Contact | None, peer: PeerId, request: Request, now: float
    ) -> tuple[Reply, Update | None]:
        """Answer ``request`` from ``peer``; ``sender`` is its contact if it runs in server mode.

        The second value is the routing-table update for the sender, whose ``ping``
        (if any) the shell must check before the table evicts anyone.
        """
        if not self._rate.allow(peer, now):
            self.refusals[RefusalCode.RATE_LIMITED] += 1
            return Reply(
                refused=RefusalCode.RATE_LIMITED,
                message=f"over DhtLimits.request_rate_per_s={self.limits.request_rate_per_s}",
            ), None
        update = self.table.update(sender, now) if sender is not None else None
        k = self.limits.k
        match request:
            case Ping():
                self.requests["ping"] += 1
                reply = Reply()
            case FindNode(target):
                self.requests["find_node"] += 1
                reply = Reply(peers=tuple(self.table.closest(target, k, exclude=(peer,))))
            case FindValue(key):
                self.requests["find_value"] += 1
                entries = self.store.get(key, now)
                if entries:
                    reply = Reply(entries=tuple(entries))
                else:
                    closest = self.table.closest(key_id(key), k, exclude=(peer,))
                    reply = Reply(peers=tuple(closest))
            case Store(_, entries):
                self.requests["store"] += 1
                reply = self._store(peer, entries, now)
        return reply, update

    def _store(self, peer: PeerId, entries: tuple[Entry, ...], now: float) -> Reply:
        try:
            self.store.admit(peer, now)
        except RateLimited as exc:
            return Reply(refused=exc.code, message=str(exc))
        codes = []
        for entry in entries:
            try:
                self.store.put(entry, peer, now)
                codes.append(RefusalCode.OK)
            except RecordRejected as exc:
                codes.append(exc.code)
        return Reply(codes=tuple(codes))
