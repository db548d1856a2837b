"""Thousands of DHT nodes in one process, requests answered by direct function calls.

``SimNetwork`` runs the same sans-IO cores as the real node (``DhtCore``, ``Lookup``,
``RoutingTable``, ``RecordStore``) with no transport and no event loop: a request is a
call to the destination's ``DhtCore.handle``, a dead node is one that does not answer,
and time is ``SimNetwork.now``, advanced by the caller. The queries of one lookup
round are answered one after another before the next round, as parallel replies
would be. Tests use it to check routing, churn and attacks at scale; the benchmark
uses it for 1,000 and 2,000 nodes. Every node pays its identity proof-of-work at
``DhtLimits.pow_difficulty`` (pass ``proof=`` to ``add_node`` to model one that did
not), and replies are checked for it as the real node checks them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from security import PeerId, solve_pow

from ._contact import Contact
from ._core import DhtCore
from ._errors import RefusalCode
from ._ids import key_id, node_id
from ._limits import DhtLimits
from ._lookup import Lookup
from ._messages import FindNode, FindValue, Ping, Reply, Request, Store
from ._records import Entry, ValidatorChain

Behaviour = Callable[["SimNetwork", PeerId, Request], Reply]
"""How a misbehaving node answers: (network, its own PeerID, request) -> reply."""


@dataclass(frozen=True, slots=True)
class SimResult:
    """One lookup's outcome: the merged entries found and what it cost."""

    entries: tuple[Entry, ...]
    hops: int
    messages: int
    lookup: Lookup | None


class SimNetwork:
    """An in-process Kademlia network of ``DhtCore`` nodes on a hand-advanced clock."""

    def __init__(self, limits: DhtLimits | None = None, *, seed: int = 0, now: float = 0.0):
        self.limits = limits or DhtLimits()
        self.rng = random.Random(seed)
        self.now = now
        self.cores: dict[PeerId, DhtCore] = {}
        self.contacts: dict[PeerId, Contact] = {}
        self.alive: set[PeerId] = set()
        self.behaviours: dict[PeerId, Behaviour] = {}
        self.messages = 0
        self.validators = ValidatorChain()

    def new_peer_id(self) -> PeerId:
        """A PeerID from seeded randomness (any 32 bytes make a valid Ed25519-shaped ID)."""
        return PeerId.from_public_key(self.rng.randbytes(32))

    def add_node(
        self,
        bootstrap: PeerId | None = None,
        *,
        peer_id: PeerId | None = None,
        ip: str | None = None,
        behaviour: Behaviour | None = None,
        proof: bytes | None = None,
    ) -> PeerId:
        """Create a node and join it through ``bootstrap``: ping, self-lookup, refresh.

        ``proof`` is its identity proof-of-work nonce; None solves one.
        """
        peer = peer_id or self.new_peer_id()
        core = DhtCore(peer, self.limits, now=self.now, validators=self.validators)
        if proof is None:
            proof = solve_pow(peer.public_key(), self.limits.pow_difficulty).nonce
        core.proof = proof
        self.cores[peer] = core
        self.contacts[peer] = Contact(peer, (), ip)
        self.alive.add(peer)
        if behaviour is not None:
            self.behaviours[peer] = behaviour
        if bootstrap is not None:
            self.join(peer, bootstrap)
        return peer

    def join(self, peer: PeerId, bootstrap: PeerId) -> None:
        table = self.cores[peer].table
        reply = self.call(peer, self.contacts[bootstrap], Ping())
        if reply is not None and reply.refused is RefusalCode.OK:
            self._seen(peer, self.contacts[bootstrap])
        self.lookup(peer, node_id(peer))
        for target in table.refresh_targets(self.now, self.rng, force=True):
            self.lookup(peer, target, until=lambda t=target: table.filled(t))

    def kill(self, peer: PeerId) -> None:
        """The node stops answering, without telling anyone."""
        self.alive.discard(peer)

    def call(self, src: PeerId, dst: Contact, request: Request) -> Reply | None:
        """Deliver ``request`` from ``src`` to ``dst``; None if ``dst`` does not answer."""
        self.messages += 1
        target = dst.peer_id
        if target not in self.alive:
            return None
        behaviour = self.behaviours.get(target)
        if behaviour is not None:
            reply = behaviour(self, target, request)
        else:
            core = self.cores[target]
            sender = self.contacts[src] if src in self.alive else None
            proof = self.cores[src].proof
            reply, update = core.handle(sender, src, request, self.now, proof)
            if update is not None and update.ping is not None:
                self._ping(target, update.ping)
        local = self.cores[src]
        if reply.refused is RefusalCode.OK and not local.proven(target, reply.proof):
            local.rejected_by_pow += 1
            local.table.remove(target)
            return Reply(refused=RefusalCode.INSUFFICIENT_POW)
        return reply

    def _ping(self, src: PeerId, contact: Contact) -> None:
        self.messages += 1
        alive = contact.peer_id in self.alive
        if alive:
            alive = self.cores[src].proven(contact.peer_id, self.cores[contact.peer_id].proof)
        self.cores[src].table.ping_result(contact.peer_id, alive, self.now)

    def _seen(self, peer: PeerId, contact: Contact) -> None:
        update = self.cores[peer].table.update(contact, self.now)
        if update.ping is not None:
            self._ping(peer, update.ping)

    def lookup(
        self,
        src: PeerId,
        target: int,
        *,
        key: bytes | None = None,
        until: Callable[[], bool] | None = None,
    ) -> SimResult:
        """An iterative lookup from ``src``: FIND_VALUE ``key`` if given, else FIND_NODE.

        ``until`` ends it early once true (checked before each round).
        """
        core = self.cores[src]
        lookup = Lookup(
            target,
            core.table.closest(target, self.limits.k),
            self.limits,
            local=src,
            find_value=key is not None,
        )
        request: Request = FindValue(key) if key is not None else FindNode(target)
        found: list[Entry] = []
        while not lookup.done and (until is None or not until()):
            queries = lookup.next_queries(self.now)
            if not queries:
                break
            for contact in queries:
                reply = self.call(src, contact, request)
                if reply is None or reply.refused is not RefusalCode.OK:
                    lookup.on_failure(contact.peer_id)
                    core.table.failed(contact.peer_id)
                    continue
                self._seen(src, contact)
                valid = core.store.valid(reply.entries, self.now)
                found.extend(valid)
                lookup.on_reply(contact.peer_id, reply.peers, found=bool(valid))
        core.table.touch(target, self.now)
        merged = tuple(self.validators.merge(found))
        return SimResult(merged, lookup.hops, lookup.queries_sent, lookup)

    def store(self, src: PeerId, entry: Entry) -> int:
        """Store ``entry`` on the ``k`` nodes nearest its key; returns how many accepted."""
        target = key_id(entry.key)
        result = self.lookup(src, target)
        assert result.lookup is not None
        closest = result.lookup.closest()
        accepted = 0
        for contact in closest:
            reply = self.call(src, contact, Store(entry.key, (entry,)))
            if reply is not None and reply.codes == (RefusalCode.OK,):
                accepted += 1
        own = node_id(src) ^ target
        if len(closest) < self.limits.k or own < closest[-1].node_id ^ target:
            self.cores[src].store.put(entry, None, self.now)
            accepted += 1
        return accepted

    def get(self, src: PeerId, key: bytes) -> SimResult:
        """Find ``key`` from ``src``: its own store first, then a FIND_VALUE lookup."""
        local = self.cores[src].store.get(key, self.now)
        if local:
            return SimResult(tuple(local), 0, 0, None)
        return self.lookup(src, key_id(key), key=key)
