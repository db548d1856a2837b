"""The Kademlia routing table: k-buckets by XOR distance, sans-IO.

Each bucket keeps at most ``k`` contacts in least-recently-seen order and a bounded
replacement cache. A full bucket never drops a live contact for a newcomer: the table
answers "ping X first" (``Update.ping``), and the shell reports back with
``ping_result``; only a contact that failed is replaced, by the most recently seen
replacement. IP-group caps (per bucket and per table) keep one operator from filling
the table with cheap identities. ``now`` is always an argument.

An optional ``score`` (a reputation hook, e.g. ``ReputationBook.contact_score``) ranks
peers: one scoring below 0 is refused (and evicted at once when a newcomer needs its
slot), a full bucket pings its lowest-scoring contact first (the least recently seen
among equals), and a freed slot goes to the best-scoring replacement (the most
recently seen among equals). Without it the table is plain Kademlia.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

from security import PeerId

from ._contact import Contact, ip_group
from ._ids import ID_BITS, bucket_index, node_id, random_id_in_bucket
from ._limits import DhtLimits


class Admission(Enum):
    """What ``RoutingTable.update`` did with a contact."""

    ADDED = "added"
    """It took a free slot."""
    REFRESHED = "refreshed"
    """It was already there and is now the most recently seen."""
    CACHED = "cached"
    """Its bucket is full: it waits in the replacement cache."""
    REJECTED = "rejected"
    """Its IP group already has as many slots as the caps allow, its score is below 0, or
    it is ourselves."""


@dataclass(frozen=True, slots=True)
class Update:
    """The outcome of ``RoutingTable.update``; ``ping`` asks the shell to check a contact."""

    admission: Admission
    ping: Contact | None = None


class _Bucket:
    __slots__ = ("contacts", "last_lookup", "pinging", "replacements")

    def __init__(self, now: float) -> None:
        self.contacts: OrderedDict[int, Contact] = OrderedDict()
        """By node ID, least recently seen first."""
        self.replacements: OrderedDict[int, Contact] = OrderedDict()
        """By node ID, most recently seen last."""
        self.pinging: int | None = None
        self.last_lookup = now


class RoutingTable:
    """k-buckets around ``local``, with replacement caches and IP-diversity caps."""

    def __init__(
        self,
        local: PeerId,
        limits: DhtLimits,
        *,
        now: float,
        score: Callable[[PeerId], float] | None = None,
    ) -> None:
        self.local_peer = local
        self.local_id = node_id(local)
        self.limits = limits
        self.score = score
        self.rejected_by_diversity = 0
        self.rejected_by_score = 0
        self._created = now
        self._buckets: dict[int, _Bucket] = {}
        self._all: dict[int, Contact] = {}
        self._groups: dict[str, int] = {}
        self._failures: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, PeerId) and node_id(peer_id) in self._all

    def __iter__(self) -> Iterator[Contact]:
        return iter(list(self._all.values()))

    def get(self, peer_id: PeerId) -> Contact | None:
        return self._all.get(node_id(peer_id))

    def group_count(self, group: str) -> int:
        """How many contacts of IP group ``group`` the whole table holds."""
        return self._groups.get(group, 0)

    def bucket_sizes(self) -> dict[int, int]:
        return {i: len(b.contacts) for i, b in sorted(self._buckets.items()) if b.contacts}

    def filled(self, target: int) -> bool:
        """Whether the bucket ``target`` falls in holds ``refresh_min_contacts`` contacts."""
        bucket = self._buckets.get(bucket_index(self.local_id, target))
        return bucket is not None and len(bucket.contacts) >= self.limits.refresh_min_contacts

    def _group(self, contact: Contact) -> str | None:
        return ip_group(contact.ip, exempt_private=self.limits.exempt_private_addrs)

    def _bucket(self, index: int) -> _Bucket:
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Bucket(self._created)
        return bucket

    def _allows(self, bucket: _Bucket, group: str | None) -> bool:
        if group is None:
            return True
        if self._groups.get(group, 0) >= self.limits.max_per_ip_group_in_table:
            return False
        in_bucket = sum(1 for c in bucket.contacts.values() if self._group(c) == group)
        return in_bucket < self.limits.max_per_ip_group_per_bucket

    def _insert(self, bucket: _Bucket, contact: Contact) -> None:
        bucket.contacts[contact.node_id] = contact
        self._all[contact.node_id] = contact
        group = self._group(contact)
        if group is not None:
            self._groups[group] = self._groups.get(group, 0) + 1

    def update(self, contact: Contact, now: float) -> Update:
        """Note that ``contact`` is alive: it answered us, or asked us in server mode."""
        ident = contact.node_id
        if ident == self.local_id:
            return Update(Admission.REJECTED)
        bucket = self._bucket(bucket_index(self.local_id, ident))
        if self._failures:
            self._failures.pop(ident, None)
        known = bucket.contacts.get(ident)
        if known is not None:
            if (
                known is not contact
                and contact.addrs
                and contact != known
                and self._group(contact) == self._group(known)
            ):
                bucket.contacts[ident] = self._all[ident] = contact
            bucket.contacts.move_to_end(ident)
            return Update(Admission.REFRESHED)
        score = self.score
        if score is not None and score(contact.peer_id) < 0:
            bucket.replacements.pop(ident, None)
            self.rejected_by_score += 1
            return Update(Admission.REJECTED)
        if not self._allows(bucket, self._group(contact)):
            bucket.replacements.pop(ident, None)
            self.rejected_by_diversity += 1
            return Update(Admission.REJECTED)
        if len(bucket.contacts) < self.limits.k:
            bucket.replacements.pop(ident, None)
            self._insert(bucket, contact)
            return Update(Admission.ADDED)
        bucket.replacements.pop(ident, None)
        bucket.replacements[ident] = contact
        while len(bucket.replacements) > self.limits.replacement_cache_size:
            bucket.replacements.popitem(last=False)
        if score is not None:
            weakest = min(bucket.contacts.values(), key=lambda c: score(c.peer_id))
            if score(weakest.peer_id) < 0:
                self.remove(weakest.peer_id)
                return Update(Admission.ADDED if ident in self._all else Admission.CACHED)
        else:
            weakest = next(iter(bucket.contacts.values()))
        if bucket.pinging is not None:
            return Update(Admission.CACHED)
        bucket.pinging = weakest.node_id
        return Update(Admission.CACHED, ping=weakest)

    def ping_result(self, peer_id: PeerId, alive: bool, now: float) -> None:
        """The shell's answer to ``Update.ping``: keep ``peer_id`` if alive, else replace it."""
        ident = node_id(peer_id)
        bucket = self._buckets.get(bucket_index(self.local_id, ident))
        if bucket is None:
            return
        if bucket.pinging == ident:
            bucket.pinging = None
        if alive:
            if ident in bucket.contacts:
                self._failures.pop(ident, None)
                bucket.contacts.move_to_end(ident)
        else:
            self.remove(peer_id)

    def failed(self, peer_id: PeerId) -> bool:
        """Count a failed request to ``peer_id``; True once it is removed for it."""
        ident = node_id(peer_id)
        if ident not in self._all:
            return False
        count = self._failures.get(ident, 0) + 1
        if count < self.limits.max_failures:
            self._failures[ident] = count
            return False
        self.remove(peer_id)
        return True

    def remove(self, peer_id: PeerId) -> bool:
        """Drop ``peer_id`` and promote the most recently seen replacement that fits."""
        ident = node_id(peer_id)
        bucket = self._buckets.get(bucket_index(self.local_id, ident))
        if bucket is None:
            return False
        bucket.replacements.pop(ident, None)
        contact = bucket.contacts.pop(ident, None)
        if contact is None:
            return False
        del self._all[ident]
        self._failures.pop(ident, None)
        if bucket.pinging == ident:
            bucket.pinging = None
        group = self._group(contact)
        if group is not None:
            remaining = self._groups[group] - 1
            if remaining:
                self._groups[group] = remaining
            else:
                del self._groups[group]
        candidates = list(reversed(bucket.replacements.values()))
        if self.score is not None:
            score = self.score
            candidates = [c for c in candidates if score(c.peer_id) >= 0]
            candidates.sort(key=lambda c: score(c.peer_id), reverse=True)
        for candidate in candidates:
            if self._allows(bucket, self._group(candidate)):
                del bucket.replacements[candidate.node_id]
                self._insert(bucket, candidate)
                break
        return True

    def closest(self, target: int, count: int, *, exclude: Iterable[PeerId] = ()) -> list[Contact]:
        """Up to ``count`` contacts nearest to ``target`` by XOR distance, nearest first."""
        skip = [node_id(peer) for peer in exclude]
        wanted = count + len(skip)
        if len(self._all) > 8 * wanted:
            nearest = heapq.nsmallest(wanted, self._all, key=target.__xor__)
        else:
            nearest = sorted(self._all, key=target.__xor__)[:wanted]
        return [self._all[i] for i in nearest if i not in skip][:count]

    def touch(self, target: int, now: float) -> None:
        """A lookup for ``target`` ran: its bucket needs no refresh for a while."""
        index = bucket_index(self.local_id, target)
        if index >= 0:
            self._bucket(index).last_lookup = now

    def refresh_targets(self, now: float, rng: random.Random, *, force: bool = False) -> list[int]:
        """Random IDs to look up, one per bucket not looked up within the refresh interval.

        Only buckets from the nearest non-empty one outwards count: the ones below it are
        empty in any network of realistic size (the self-lookup covers that region). A
        refresh lookup may stop once its bucket is ``filled``.
        """
        occupied = [i for i, b in self._buckets.items() if b.contacts]
        if not occupied:
            return []
        due = now - self.limits.refresh_interval_s
        targets = []
        for index in range(min(occupied), ID_BITS):
            bucket = self._buckets.get(index)
            last = bucket.last_lookup if bucket is not None else self._created
            if force or last <= due:
                targets.append(random_id_in_bucket(self.local_id, index, rng))
        return targets
