"""The iterative Kademlia lookup as a sans-IO state machine.

The shell asks ``next_queries(now)`` whom to query, sends FIND_NODE or FIND_VALUE to
each, and feeds back ``on_reply`` (with the contacts the peer returned and whether it
had the value) or ``on_failure``; ``handle_timer(now)`` at ``next_deadline()`` marks
slow peers as stalled, so they stop holding one of the ``alpha`` slots.

With ``disjoint_paths`` d > 1 (S/Kademlia), the seeds are dealt round-robin to d paths
that each run their own lookup and never query a peer another path queried: a region
of the ID space full of bad nodes can capture some paths, not all of them. A peer
belongs to the first path that learns of it, so no two paths ever query the same peer.

A path ends when the ``k`` nearest candidates it knows that have not failed or stalled
have all answered; a value lookup also ends once ``want`` peers answered with the value
and the requests already in flight have come back. A value lookup starts narrow: it
asks only ``want`` peers (one for a plain get) and widens to ``alpha`` as soon as any
answer, failure or stall comes back, so that when the nearest peer we know holds the
value, a get costs one request. At most ``max_per_ip_group_in_lookup`` candidates of
one IP group are ever admitted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from security import PeerId

from ._contact import Contact, ip_group
from ._limits import DhtLimits


class _State(Enum):
    WAITING = 0
    IN_FLIGHT = 1
    STALLED = 2
    SUCCEEDED = 3
    FAILED = 4


_LIVE = (_State.WAITING, _State.IN_FLIGHT, _State.SUCCEEDED)


@dataclass(slots=True)
class _Candidate:
    contact: Contact
    distance: int
    hops: int
    path: int
    state: _State = _State.WAITING
    sent_at: float = 0.0
    had_value: bool = False


class _Path:
    __slots__ = ("in_flight", "order")

    def __init__(self) -> None:
        self.order: list[tuple[int, _Candidate]] = []
        """Candidates by distance (distances are unique: every candidate has its own ID)."""
        self.in_flight = 0

    def nearest_live(self, k: int) -> list[_Candidate]:
        """The ``k`` nearest candidates that have neither failed nor stalled."""
        live: list[_Candidate] = []
        for _, candidate in self.order:
            if candidate.state in _LIVE:
                live.append(candidate)
                if len(live) == k:
                    break
        return live


class Lookup:
    """One iterative FIND_NODE or FIND_VALUE lookup for ``target``."""

    def __init__(
        self,
        target: int,
        seeds: Iterable[Contact],
        limits: DhtLimits,
        *,
        local: PeerId | None = None,
        find_value: bool = False,
        want: int = 1,
    ) -> None:
        self.target = target
        self.limits = limits
        self.find_value = find_value
        self.want = want
        self.queries_sent = 0
        self._local = local
        self._paths = [_Path() for _ in range(limits.disjoint_paths)]
        self._candidates: dict[PeerId, _Candidate] = {}
        self._groups: dict[str, int] = {}
        self._seen: set[int] = set()
        self._found = False
        self._holders = 0
        self._width = min(limits.alpha, want) if find_value else limits.alpha
        ordered = sorted(seeds, key=lambda c: c.node_id ^ target)
        admitted = [c for c in ordered if self._admit(c)]
        for i, contact in enumerate(admitted):
            self._add(i % len(self._paths), contact, hops=1)

    def _admit(self, contact: Contact) -> bool:
        if contact.node_id in self._seen or contact.peer_id == self._local:
            return False
        group = ip_group(contact.ip, exempt_private=self.limits.exempt_private_addrs)
        if group is not None:
            count = self._groups.get(group, 0)
            if count >= self.limits.max_per_ip_group_in_lookup:
                return False
            self._groups[group] = count + 1
        self._seen.add(contact.node_id)
        return True

    def _add(self, index: int, contact: Contact, hops: int) -> None:
        candidate = _Candidate(contact, contact.node_id ^ self.target, hops, index)
        self._candidates[contact.peer_id] = candidate
        bisect.insort(self._paths[index].order, (candidate.distance, candidate))

    def _set(self, candidate: _Candidate, state: _State) -> None:
        path = self._paths[candidate.path]
        if candidate.state is _State.IN_FLIGHT:
            path.in_flight -= 1
        if state is _State.IN_FLIGHT:
            path.in_flight += 1
        candidate.state = state

    @property
    def found(self) -> bool:
        """Whether ``want`` peers answered with the value (value lookups only)."""
        return self._found

    def next_queries(self, now: float) -> list[Contact]:
        """Peers to query now; each is marked in flight."""
        if self.find_value and self._found:
            return []
        picks: list[Contact] = []
        for path in self._paths:
            budget = self._width - path.in_flight
            if budget <= 0:
                continue
            for candidate in path.nearest_live(self.limits.k):
                if budget == 0:
                    break
                if candidate.state is not _State.WAITING:
                    continue
                self._set(candidate, _State.IN_FLIGHT)
                candidate.sent_at = now
                picks.append(candidate.contact)
                budget -= 1
        self.queries_sent += len(picks)
        return picks

    def _awaited(self, peer: PeerId) -> _Candidate | None:
        candidate = self._candidates.get(peer)
        if candidate is None or candidate.state not in (_State.IN_FLIGHT, _State.STALLED):
            return None
        return candidate

    def on_reply(self, peer: PeerId, contacts: Iterable[Contact], *, found: bool = False) -> None:
        """``peer`` answered with ``contacts`` (and, for FIND_VALUE, whether it had the value)."""
        candidate = self._awaited(peer)
        if candidate is None:
            return
        self._set(candidate, _State.SUCCEEDED)
        self._width = self.limits.alpha
        if found and self.find_value:
            candidate.had_value = True
            self._holders += 1
            self._found = self._holders >= self.want
        for contact in contacts:
            if self._admit(contact):
                self._add(candidate.path, contact, candidate.hops + 1)

    def on_failure(self, peer: PeerId) -> None:
        """The request to ``peer`` failed (error, refusal or timeout)."""
        candidate = self._awaited(peer)
        if candidate is not None:
            self._set(candidate, _State.FAILED)
            self._width = self.limits.alpha

    def next_deadline(self) -> float | None:
        """When the oldest request in flight will count as stalled."""
        sent = [c.sent_at for c in self._candidates.values() if c.state is _State.IN_FLIGHT]
        return min(sent) + self.limits.lookup_stall_s if sent else None

    def handle_timer(self, now: float) -> None:
        """Mark requests older than ``lookup_stall_s`` as stalled (they free their slot)."""
        cutoff = now - self.limits.lookup_stall_s
        for candidate in self._candidates.values():
            if candidate.state is _State.IN_FLIGHT and candidate.sent_at <= cutoff:
                self._set(candidate, _State.STALLED)
                self._width = self.limits.alpha

    def _path_done(self, path: _Path) -> bool:
        if self.find_value and self._found:
            return path.in_flight == 0
        return all(c.state is _State.SUCCEEDED for c in path.nearest_live(self.limits.k))

    @property
    def done(self) -> bool:
        return all(self._path_done(path) for path in self._paths)

    def pending(self) -> list[PeerId]:
        """Peers queried that have not answered yet (in flight or stalled)."""
        return [
            peer
            for peer, c in self._candidates.items()
            if c.state in (_State.IN_FLIGHT, _State.STALLED)
        ]

    def _succeeded(self) -> list[_Candidate]:
        found = [c for c in self._candidates.values() if c.state is _State.SUCCEEDED]
        found.sort(key=lambda c: c.distance)
        return found

    def closest(self, count: int | None = None) -> list[Contact]:
        """The nearest peers that answered, nearest first (``k`` of them by default)."""
        limit = self.limits.k if count is None else count
        return [c.contact for c in self._succeeded()[:limit]]

    def holders(self) -> list[Contact]:
        """Peers that answered with the value, nearest first."""
        return [c.contact for c in self._succeeded() if c.had_value]

    def cache_target(self) -> Contact | None:
        """The nearest peer that answered without the value, if it is nearer than a holder."""
        succeeded = self._succeeded()
        holders = [c for c in succeeded if c.had_value]
        if not holders:
            return None
        for candidate in succeeded:
            if not candidate.had_value:
                return candidate.contact if candidate.distance < holders[0].distance else None
        return None

    @property
    def hops(self) -> int:
        """Depth of the answer: hops to the first holder, else to the nearest peer that answered."""
        succeeded = self._succeeded()
        holders = [c.hops for c in succeeded if c.had_value]
        if holders:
            return min(holders)
        return succeeded[0].hops if succeeded else 0
