"""The request-answering side of one DHT node, sans-IO.

``DhtCore`` holds the routing table and the record store and turns one inbound
request into one reply. The asyncio shell (``_node.py``) and the in-process simulator
both drive it; neither reads a clock inside: ``now`` is an argument.

Identity proof-of-work gates membership: a sender in server mode whose proof is weaker
than ``DhtLimits.pow_difficulty`` is refused (``RefusalCode.INSUFFICIENT_POW``) and
never enters the table, and ``proven`` is what the shell asks of every reply before
the answering node may enter the table or steer a lookup.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from security import PeerId, proof_bits

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
        score: Callable[[PeerId], float] | None = None,
    ) -> None:
        self.local = local
        self.limits = limits
        self.table = RoutingTable(local, limits, now=now, score=score)
        self.store = RecordStore(limits, validators)
        self.requests: Counter[str] = Counter()
        self.proof = b""
        """Our own identity proof-of-work nonce, sent with every reply (the shell sets it)."""
        self.rejected_by_pow = 0
        """Senders refused and replies ignored for a missing or weak proof-of-work."""
        self._rate = RateLimiter(
            limits.request_rate_per_s, limits.request_burst, limits.max_tracked_peers
        )

    @property
    def refusals(self) -> Counter[RefusalCode]:
        """Refused stores and requests by code, since start."""
        return self.store.refusals

    def proven(self, peer: PeerId, proof: bytes) -> bool:
        """Whether ``proof`` is an identity proof-of-work for ``peer`` that meets our difficulty."""
        required = self.limits.pow_difficulty
        return not required or proof_bits(peer.public_key(), proof) >= required

    def handle(
        self,
        sender: Contact | None,
        peer: PeerId,
        request: Request,
        now: float,
        proof: bytes = b"",
    ) -> tuple[Reply, Update | None]:
        """Answer ``request`` from ``peer``; ``sender`` is its contact if it runs in server
        mode, and ``proof`` then its identity proof-of-work nonce.

        The second value is the routing-table update for the sender, whose ``ping``
        (if any) the shell must check before the table evicts anyone.
        """
        if not self._rate.allow(peer, now):
            self.refusals[RefusalCode.RATE_LIMITED] += 1
            return Reply(
                refused=RefusalCode.RATE_LIMITED,
                message=f"over DhtLimits.request_rate_per_s={self.limits.request_rate_per_s}",
            ), None
        if sender is not None and not self.proven(peer, proof):
            self.refusals[RefusalCode.INSUFFICIENT_POW] += 1
            self.rejected_by_pow += 1
            bits = proof_bits(peer.public_key(), proof)
            return Reply(
                refused=RefusalCode.INSUFFICIENT_POW,
                message=f"identity proof-of-work of {bits} bits, this node requires "
                f"DhtLimits.pow_difficulty={self.limits.pow_difficulty}; solve one with "
                "security.solve_pow (or ask as a client, without a 'from' field)",
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
        if self.proof and reply.refused is RefusalCode.OK:
            reply = replace(reply, proof=self.proof)
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
