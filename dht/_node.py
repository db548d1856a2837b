"""The DHT node: the asyncio shell around the sans-IO cores, on an existing ``p2p.Host``.

``DHT(host)`` serves ``/swarm/dht/1.0.0`` over the Host's RPC (in server mode), runs
iterative lookups with ``alpha`` requests in flight, stores records on the ``k``
nodes nearest their key, caches found values on the nearest node that lacked them,
and keeps its table and records fresh with periodic bucket refreshes and republishes.
Connections are the Host's: one per peer, reused by every request, so a handshake is
paid once per peer and never per request.

Membership costs an identity proof-of-work (``DhtLimits.pow_difficulty``): a server
solves its own at ``start`` (cooperatively, in slices, so the loop keeps running; pass
``proof=`` to reuse a stored one) and sends the nonce with every request and reply.
Peers whose nonce falls short neither enter our routing table nor steer our lookups,
and entries under their sub-keys are refused.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from p2p import Host, P2PError, RpcContext
from security import IdentityProof, KeyPair, PeerId, proof_bits, search_pow
from transport import Multiaddr

from ._contact import Contact, first_ip
from ._core import DhtCore
from ._errors import (
    BadSignature,
    DhtConfigError,
    DhtProtocolError,
    NotBootstrapped,
    RecordRejected,
    RefusalCode,
    StoreFailed,
)
from ._ids import key_id, node_id
from ._limits import DhtLimits
from ._lookup import Lookup
from ._messages import (
    PROTOCOL_ID,
    Codec,
    FindNode,
    FindValue,
    Ping,
    Reply,
    Request,
    Store,
    encode_reply,
    encode_request,
)
from ._records import Entry, Record, RecordValidator, ValidatorChain, owner_of, sign_entry
from ._routing import RoutingTable

_log = logging.getLogger("dht")

Key = bytes | str
SubKey = bytes | str | PeerId


@dataclass(frozen=True, slots=True)
class DhtStats:
    """Counters of one node since it started."""

    requests_sent: int
    requests_failed: int
    requests_served: dict[str, int]
    refusals: dict[str, int]
    routing_table_size: int
    rejected_by_diversity: int
    rejected_by_pow: int
    rejected_by_score: int
    records: int
    record_bytes: int


@dataclass(frozen=True, slots=True)
class LookupReport:
    """What the last lookup of a ``get`` or ``find_peers`` cost: hops and requests."""

    hops: int
    messages: int


def _key_bytes(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _subkey_bytes(subkey: SubKey | None) -> bytes | None:
    if subkey is None:
        return None
    if isinstance(subkey, PeerId):
        return subkey.to_bytes()
    return _key_bytes(subkey)


class DHT:
    """Kademlia over a ``p2p.Host``: ``await dht.start(bootstrap=[...])``, then store and get.

    ``server_mode=False`` makes a client: it asks but never answers and never enters
    anyone's routing table (for peers others cannot reach). ``identity`` is the
    Host's key pair, needed to sign sub-keys owned by this peer. ``clock`` gives the
    Unix time that record expiries are compared with. ``proof`` is this peer's
    identity proof-of-work (solved at ``start`` when absent); ``score`` is the
    routing table's reputation hook (``RoutingTable``). ``on_outcome(peer, ok,
    timed_out)`` hears how every request this node sends ends: ``ok`` when the peer
    answered (a refusal is an answer), else ``timed_out`` when it did not answer in
    ``DhtLimits.rpc_timeout_s``; an unreachable peer, a malformed answer or a too weak
    identity proof are failures (e.g. ``ReputationBook.record_outcome``, which then
    feeds ``score``).
    """

    def __init__(
        self,
        host: Host,
        limits: DhtLimits = DhtLimits(),  # noqa: B008 - frozen value
        *,
        server_mode: bool = True,
        clock: Callable[[], float] = time.time,
        identity: KeyPair | None = None,
        validators: Iterable[RecordValidator] = (),
        rng: random.Random | None = None,
        proof: IdentityProof | None = None,
        score: Callable[[PeerId], float] | None = None,
        on_outcome: Callable[[PeerId, bool, bool], object] | None = None,
    ) -> None:
        if identity is not None and identity.peer_id != host.peer_id:
            raise DhtConfigError(
                f"identity {identity.peer_id} is not the Host's identity {host.peer_id}"
            )
        if proof is not None:
            bits = proof.difficulty(host.peer_id.public_key())
            if bits < limits.pow_difficulty:
                raise DhtConfigError(
                    f"the identity proof given has {bits} bits, DhtLimits.pow_difficulty="
                    f"{limits.pow_difficulty}; leave proof=None to have one solved at start"
                )
        self.host = host
        self.limits = limits
        self.server_mode = server_mode
        self.validators = ValidatorChain(validators)
        self.last_lookup = LookupReport(0, 0)
        self._clock = clock
        self._identity = identity
        self._rng = rng or random.Random()
        self._core = DhtCore(
            host.peer_id, limits, now=clock(), validators=self.validators, score=score
        )
        self._proof = proof
        self._on_outcome = on_outcome
        if proof is not None:
            self._core.proof = proof.nonce
        self._codec = Codec(limits)
        self._from: tuple[Multiaddr, ...] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._published: dict[tuple[bytes, bytes | None], Entry] = {}
        self._published_at: dict[tuple[bytes, bytes | None], float] = {}
        self._sent = 0
        self._failed = 0
        self._running = False

    def __repr__(self) -> str:
        mode = "server" if self.server_mode else "client"
        return f"<DHT {self.host.peer_id} {mode}, {len(self._core.table)} peers>"

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        return self.host.peer_id

    @property
    def routing_table(self) -> RoutingTable:
        """The routing table (read it; the node updates it)."""
        return self._core.table

    @property
    def identity_proof(self) -> IdentityProof | None:
        """Our identity proof-of-work (None until ``start`` or a signed store solved it)."""
        return self._proof

    async def _solve_proof(self) -> IdentityProof:
        """Our identity proof, solved in slices of nonces with the loop running in between."""
        if self._proof is None:
            public_key, difficulty = self.peer_id.public_key(), self.limits.pow_difficulty
            start, step = 0, 1 << 12
            while (proof := search_pow(public_key, difficulty, start, step)) is None:
                start += step
                await asyncio.sleep(0)
            self._proof = proof
            self._core.proof = proof.nonce
        return self._proof

    async def start(self, bootstrap: Iterable[Multiaddr | str] = ()) -> None:
        """Solve our proof-of-work and serve requests (server mode), join through
        ``bootstrap``, start maintenance.

        Raises ``NotBootstrapped`` when bootstrap addresses were given and none answered.
        """
        if self._running:
            raise DhtConfigError("this DHT is already started")
        self._running = True
        if self.server_mode:
            await self._solve_proof()
            self.host.add_rpc_handler(PROTOCOL_ID, self._serve)
        self._spawn(self._maintain())
        addrs = [Multiaddr.from_string(a) if isinstance(a, str) else a for a in bootstrap]
        if addrs:
            await self.bootstrap(addrs)

    async def stop(self) -> None:
        """Stop serving and cancel every task of this node (the Host keeps running)."""
        if not self._running:
            return
        self._running = False
        if self.server_mode:
            self.host.remove_handler(PROTOCOL_ID)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> DHT:
        if not self._running:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("a task of %r failed unexpectedly", self, exc_info=exc)

    async def bootstrap(self, addrs: Iterable[Multiaddr]) -> None:
        """Contact ``addrs``, look up our own ID, then refresh every bucket beyond it."""
        failures: list[str] = []
        for addr in addrs:
            try:
                peer = await self.host.connect(addr)
            except P2PError as exc:
                failures.append(f"{addr}: {exc}")
                continue
            contact = Contact(peer, (addr.without_p2p(),))
            reply = await self._request(contact, Ping())
            if reply is None:
                failures.append(f"{addr}: no answer to a DHT ping")
            elif reply.refused is not RefusalCode.OK:
                failures.append(f"{addr}: refused ({reply.refused.name}): {reply.message}")
        if not len(self._core.table):
            raise NotBootstrapped(
                "no bootstrap peer answered: " + ("; ".join(failures) or "no addresses given")
            )
        await self._lookup(node_id(self.peer_id))
        await self.refresh(force=True)

    # -- requests ------------------------------------------------------------------------

    def _own_addrs(self) -> tuple[Multiaddr, ...] | None:
        """Our addresses for the requests' ``from`` field (None for a client).

        Computed once and again at each maintenance round, as the Host learns more.
        """
        if not self.server_mode:
            return None
        if self._from is None:
            addrs = tuple(a.without_p2p() for a in self.host.addrs)
            self._from = addrs[: self.limits.max_addrs_per_peer]
        return self._from

    def _seen(self, contact: Contact) -> None:
        update = self._core.table.update(contact, self._clock())
        if update.ping is not None:
            self._spawn(self._check(update.ping))

    async def _check(self, contact: Contact) -> None:
        """Ping-before-evict: ``contact`` keeps its slot only if it answers."""
        reply = await self._request(contact, Ping())
        alive = reply is not None and reply.refused is RefusalCode.OK
        self._core.table.ping_result(contact.peer_id, alive, self._clock())

    async def _request(self, contact: Contact, request: Request) -> Reply | None:
        """Send one request; None when the peer could not be reached or answered badly."""
        peer = contact.peer_id
        if contact.addrs and not self.host.connections(peer):
            self.host.peerstore.add_addrs(peer, contact.addrs)
        key = request.key if isinstance(request, FindValue | Store) else b""
        self._sent += 1
        try:
            answer = await self.host.rpc_call(
                peer,
                PROTOCOL_ID,
                encode_request(request, self._own_addrs(), self._core.proof),
                timeout=self.limits.rpc_timeout_s,
            )
            reply = self._codec.decode_reply(answer.value, key=key)
        except (P2PError, DhtProtocolError) as exc:
            _log.debug("%s request to %s failed: %s", type(request).__name__, peer, exc)
            self._failed += 1
            self._core.table.failed(peer)
            self._outcome(peer, False, isinstance(exc, TimeoutError))
            return None
        if reply.refused is not RefusalCode.OK:
            self._outcome(peer, True, False)
            return reply
        proven = self._core.proven(peer, reply.proof)
        self._outcome(peer, proven, False)
        if not proven:
            self._core.rejected_by_pow += 1
            self._core.table.remove(peer)
            bits = proof_bits(peer.public_key(), reply.proof)
            return Reply(
                refused=RefusalCode.INSUFFICIENT_POW,
                message=f"{peer} answered with an identity proof-of-work of {bits} bits, "
                f"DhtLimits.pow_difficulty={self.limits.pow_difficulty} is required",
            )
        self._seen(contact)
        return reply

    def _outcome(self, peer: PeerId, ok: bool, timed_out: bool) -> None:
        if self._on_outcome is not None:
            self._on_outcome(peer, ok, timed_out)

    async def _serve(self, ctx: RpcContext, message: Any, payload: memoryview | None) -> Any:
        try:
            inbound = self._codec.decode_request(message)
            sender = None
            if inbound.addrs is not None:
                observed = [first_ip((c.remote_addr,)) for c in self.host.connections(ctx.peer)]
                ip = next((ip for ip in observed if ip), None)
                sender = self._codec.contact(ctx.peer.to_bytes(), inbound.addrs, ip)
        except DhtProtocolError as exc:
            self._core.refusals[RefusalCode.MALFORMED] += 1
            return encode_reply(Reply(refused=RefusalCode.MALFORMED, message=str(exc)))
        reply, update = self._core.handle(
            sender, ctx.peer, inbound.request, self._clock(), inbound.proof
        )
        if update is not None and update.ping is not None:
            self._spawn(self._check(update.ping))
        return encode_reply(reply)

    # -- lookups -------------------------------------------------------------------------

    async def _lookup(
        self,
        target: int,
        *,
        key: bytes | None = None,
        want: int = 1,
        until: Callable[[], bool] | None = None,
    ) -> tuple[Lookup, list[Entry]]:
        """Run one lookup to its end (or until ``until()`` holds); entries found are checked."""
        loop = asyncio.get_running_loop()
        table = self._core.table
        lookup = Lookup(
            target,
            table.closest(target, self.limits.k),
            self.limits,
            local=self.peer_id,
            find_value=key is not None,
            want=want,
        )
        request: Request = FindValue(key) if key is not None else FindNode(target)
        pending: dict[asyncio.Task[Reply | None], Contact] = {}
        found: list[Entry] = []
        finished = False
        try:
            while until is None or not until():
                for contact in lookup.next_queries(loop.time()):
                    pending[loop.create_task(self._request(contact, request))] = contact
                if lookup.done or not pending:
                    break
                deadline = lookup.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    peer = pending.pop(task).peer_id
                    reply = task.result()
                    if reply is None or reply.refused is not RefusalCode.OK:
                        lookup.on_failure(peer)
                        continue
                    valid = self._core.store.valid(reply.entries, self._clock())
                    found.extend(valid)
                    lookup.on_reply(peer, reply.peers, found=bool(valid))
                lookup.handle_timer(loop.time())
            finished = True
        finally:
            # Requests still out (stalled ones) run to their end in the background, so
            # that a dead peer's failure reaches the routing table; if the lookup
            # itself was cancelled, they are cancelled with it.
            for task in pending:
                if finished:
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
                else:
                    task.cancel()
            if not finished:
                await asyncio.gather(*pending, return_exceptions=True)
        table.touch(target, self._clock())
        self.last_lookup = LookupReport(lookup.hops, lookup.queries_sent)
        return lookup, found

    async def find_peers(self, target: PeerId | Key, count: int | None = None) -> list[Contact]:
        """The ``count`` (default ``k``) live peers nearest a PeerID's or a key's ID."""
        ident = node_id(target) if isinstance(target, PeerId) else key_id(_key_bytes(target))
        lookup, _ = await self._lookup(ident)
        return lookup.closest(count)

    async def refresh(self, *, force: bool = False) -> None:
        """Look up a random ID in every bucket not looked up within the refresh interval,
        each until its bucket holds ``refresh_min_contacts`` (all of them with ``force``)."""
        table = self._core.table
        targets = table.refresh_targets(self._clock(), self._rng, force=force)
        await asyncio.gather(*(self._lookup(t, until=partial(table.filled, t)) for t in targets))

    # -- records -------------------------------------------------------------------------

    async def _entry(
        self, key: bytes, value: bytes, expiration: float, subkey: bytes | None
    ) -> Entry:
        owner = owner_of(subkey)
        if owner is None:
            return Entry(key, subkey, bytes(value), float(expiration))
        if owner != self.peer_id:
            raise BadSignature(
                f"sub-key {owner} belongs to another peer: only it can sign entries for it"
            )
        if self._identity is None:
            raise DhtConfigError(
                "storing under our own PeerID needs DHT(..., identity=<the Host's KeyPair>)"
            )
        proof = await self._solve_proof()
        return sign_entry(
            self._identity, key, bytes(value), float(expiration), subkey=subkey, proof=proof
        )

    async def store(
        self, key: Key, value: bytes, expiration: float, subkey: SubKey | None = None
    ) -> int:
        """Store ``value`` under ``key`` (and ``subkey``) until ``expiration`` (Unix time).

        A sub-key equal to our own PeerID is signed with ``identity`` and carries our
        identity proof-of-work; nobody else can overwrite it. Returns how many nodes
        accepted the record; raises the matching ``RecordRejected`` subclass when the
        record breaks a bound, ``StoreFailed`` when no node accepted it. The record is
        republished until it expires.
        """
        entry = await self._entry(_key_bytes(key), value, expiration, _subkey_bytes(subkey))
        self._core.store.check(entry, self._clock())
        accepted = await self._replicate(entry.key, [entry], include_self=True)
        self._published[entry.cell] = entry
        self._published_at[entry.cell] = self._clock()
        return accepted

    async def _replicate(self, key: bytes, entries: list[Entry], *, include_self: bool) -> int:
        target = key_id(key)
        lookup, _ = await self._lookup(target)
        closest = lookup.closest()
        replies = await asyncio.gather(
            *(self._request(c, Store(key, tuple(entries))) for c in closest)
        )
        accepted = 0
        refusals: Counter[RefusalCode] = Counter()
        for reply in replies:
            if reply is None:
                continue
            codes = reply.codes if reply.refused is RefusalCode.OK else (reply.refused,)
            refusals.update(c for c in codes if c is not RefusalCode.OK)
            accepted += bool(codes) and all(c is RefusalCode.OK for c in codes)
        nearest_enough = len(closest) < self.limits.k or (
            node_id(self.peer_id) ^ target < closest[-1].node_id ^ target
        )
        if include_self and self.server_mode and nearest_enough:
            try:
                for entry in entries:
                    self._core.store.put(entry, None, self._clock())
                accepted += 1
            except RecordRejected as exc:
                refusals[exc.code] += 1
        if not accepted and entries:
            named = {code.name: count for code, count in refusals.items()}
            raise StoreFailed(
                f"no node stored key {key[:32]!r} ({len(closest)} asked, refusals {named})",
                refusals=dict(refusals),
            )
        return accepted

    async def get(self, key: Key, *, latest: bool = False) -> Record | dict[bytes, Record] | None:
        """Find ``key``: a ``Record``, a dict of sub-key -> ``Record``, or None if absent.

        A key with sub-keys answers with the dict (sub-keys owned by a peer are its
        PeerID bytes). Our own copy answers at once, else the first peer that has the
        key does; ``latest`` asks the network even so and merges the answers of
        ``alpha`` holders (the newest version of every sub-key among them).
        """
        raw = _key_bytes(key)
        now = self._clock()
        local = self._core.store.get(raw, now)
        if local and not latest:
            self.last_lookup = LookupReport(0, 0)
            return self._shape(local)
        want = self.limits.alpha if latest else 1
        lookup, found = await self._lookup(key_id(raw), key=raw, want=want)
        entries = self.validators.merge([*found, *local])
        cache = lookup.cache_target()
        if cache is not None and entries:
            self.last_lookup = LookupReport(lookup.hops, lookup.queries_sent + 1)
            self._spawn(self._request(cache, Store(raw, tuple(entries))))
        return self._shape(entries)

    def get_local(self, key: Key) -> Record | dict[bytes, Record] | None:
        """What this node itself holds for ``key``, shaped as ``get`` answers (no network)."""
        return self._shape(self._core.store.get(_key_bytes(key), self._clock()))

    @staticmethod
    def _shape(entries: list[Entry]) -> Record | dict[bytes, Record] | None:
        subkeys = {e.subkey: e.record() for e in entries if e.subkey is not None}
        if subkeys:
            return subkeys
        plain = [e for e in entries if e.subkey is None]
        return plain[0].record() if plain else None

    # -- maintenance ---------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.limits.maintenance_interval_s)
            await self.maintain()

    async def maintain(self) -> None:
        """One maintenance round: expire, refresh stale buckets, republish what is due."""
        now = self._clock()
        self._from = None
        self._core.store.expire(now)
        for cell in [c for c, e in self._published.items() if e.expiry <= now]:
            del self._published[cell], self._published_at[cell]
        await self.refresh()
        interval = self.limits.republish_interval_s
        due: dict[bytes, list[Entry]] = {}
        for cell, entry in self._published.items():
            if self._published_at[cell] <= now - interval:
                due.setdefault(entry.key, []).append(entry)
                self._published_at[cell] = now
        for key in self._core.store.due_for_republish(now, interval):
            held = self._core.store.get(key, now)
            due.setdefault(key, []).extend(held)
            self._core.store.mark_republished(key, now)
        for key, entries in due.items():
            try:
                await self._replicate(key, self.validators.merge(entries), include_self=False)
            except StoreFailed as exc:
                _log.info("republishing %r failed: %s", key[:32], exc)

    def stats(self) -> DhtStats:
        core = self._core
        return DhtStats(
            requests_sent=self._sent,
            requests_failed=self._failed,
            requests_served=dict(core.requests),
            refusals={code.name: count for code, count in core.refusals.items()},
            routing_table_size=len(core.table),
            rejected_by_diversity=core.table.rejected_by_diversity,
            rejected_by_pow=core.rejected_by_pow,
            rejected_by_score=core.table.rejected_by_score,
            records=len(core.store),
            record_bytes=core.store.size_bytes,
        )
