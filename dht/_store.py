"""The record store of one node, with every bound enforced before anything is kept.

Sans-IO: ``now`` is an argument. A store is refused (a ``RecordRejected`` subclass
carrying its ``RefusalCode``, counted in ``refusals``) when the entry is oversized,
expired, expires too far ahead, lacks its owner's proof-of-work, is badly signed, is
not newer than the version held,
would overrun the sender's quota or the key's size, or when the store is full of
entries that all expire later. Otherwise the store makes room by evicting the entries
that expire soonest. Requests are rate-limited per peer by token buckets.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from security import PeerId, proof_bits

from ._errors import (
    ExpiryTooFar,
    InsufficientProofOfWork,
    QuotaExceeded,
    RateLimited,
    RecordExpired,
    RecordRejected,
    RecordTooLarge,
    RefusalCode,
    StaleRecord,
    StoreFull,
)
from ._limits import DhtLimits
from ._records import Entry, ValidatorChain, owner_of


class RateLimiter:
    """One token bucket per peer; the least recently active peers are forgotten first."""

    def __init__(self, rate_per_s: float, burst: int, max_peers: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_peers = max_peers
        self._buckets: OrderedDict[PeerId, tuple[float, float]] = OrderedDict()

    def allow(self, peer: PeerId, now: float) -> bool:
        """Take one token from ``peer``'s bucket; False when it is empty."""
        tokens, last = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return allowed


@dataclass(slots=True)
class _Held:
    entry: Entry
    sender: PeerId | None
    size: int
    received: float
    seq: int


class RecordStore:
    """Entries by key and sub-key, bounded in size, quota, expiry and request rate."""

    def __init__(self, limits: DhtLimits, validators: ValidatorChain | None = None) -> None:
        self.limits = limits
        self.validators = validators or ValidatorChain()
        self.refusals: Counter[RefusalCode] = Counter()
        self.size_bytes = 0
        self._cells: dict[bytes, dict[bytes | None, _Held]] = {}
        self._key_bytes: dict[bytes, int] = {}
        self._usage: dict[PeerId, int] = {}
        self._expiries: list[tuple[float, int, bytes, bytes | None]] = []
        self._seq = itertools.count()
        self._store_rate = RateLimiter(
            limits.store_rate_per_s, limits.store_burst, limits.max_tracked_peers
        )

    def __len__(self) -> int:
        return sum(len(cells) for cells in self._cells.values())

    def usage(self, peer: PeerId) -> int:
        """Bytes held on behalf of ``peer`` (entries it sent us)."""
        return self._usage.get(peer, 0)

    def admit(self, sender: PeerId, now: float) -> None:
        """Charge one STORE request to ``sender``'s rate limit; ``RateLimited`` if spent."""
        if not self._store_rate.allow(sender, now):
            self.refusals[RefusalCode.RATE_LIMITED] += 1
            raise RateLimited(
                f"peer {sender} sends stores faster than DhtLimits.store_rate_per_s="
                f"{self.limits.store_rate_per_s} (burst {self.limits.store_burst})"
            )

    def check(self, entry: Entry, now: float) -> None:
        """The checks that need no stored state: size, expiry, proof-of-work, validators."""
        limits = self.limits
        if len(entry.key) > limits.max_key_bytes:
            raise RecordTooLarge(
                f"key of {len(entry.key)} bytes exceeds "
                f"DhtLimits.max_key_bytes={limits.max_key_bytes}"
            )
        if entry.subkey is not None and len(entry.subkey) > limits.max_subkey_bytes:
            raise RecordTooLarge(
                f"sub-key of {len(entry.subkey)} bytes exceeds "
                f"DhtLimits.max_subkey_bytes={limits.max_subkey_bytes}"
            )
        if entry.size > limits.max_record_bytes:
            raise RecordTooLarge(
                f"record of {entry.size} bytes exceeds "
                f"DhtLimits.max_record_bytes={limits.max_record_bytes}"
            )
        if not math.isfinite(entry.expiry):
            raise RecordExpired(f"record expiry {entry.expiry} is not a finite time")
        if entry.expiry <= now:
            raise RecordExpired(f"record expired {now - entry.expiry:.1f} s ago")
        if entry.expiry > now + limits.max_expiry_s:
            raise ExpiryTooFar(
                f"record expires in {entry.expiry - now:.0f} s, beyond "
                f"DhtLimits.max_expiry_s={limits.max_expiry_s:.0f}"
            )
        owner = owner_of(entry.subkey)
        if owner is not None and limits.pow_difficulty:
            bits = proof_bits(owner.public_key(), entry.proof)
            if bits < limits.pow_difficulty:
                raise InsufficientProofOfWork(
                    f"sub-key owner {owner}'s identity proof-of-work has {bits} leading zero "
                    f"bits, DhtLimits.pow_difficulty={limits.pow_difficulty} is required; "
                    "store through a DHT whose identity proof meets it"
                )
        self.validators.validate(entry)

    def valid(self, entries: Iterable[Entry], now: float) -> list[Entry]:
        """The entries that pass ``check`` (answers from other nodes are checked too)."""
        kept = []
        for entry in entries:
            try:
                self.check(entry, now)
            except RecordRejected:
                continue
            kept.append(entry)
        return kept

    def put(self, entry: Entry, sender: PeerId | None, now: float) -> bool:
        """Keep ``entry``; True if it changed the store, False if it was held already.

        ``sender`` is the peer whose quota pays for it (None for our own records).
        Raises (and counts) a ``RecordRejected`` subclass when it is refused.
        """
        try:
            return self._put(entry, sender, now)
        except RecordRejected as exc:
            self.refusals[exc.code] += 1
            raise

    def _put(self, entry: Entry, sender: PeerId | None, now: float) -> bool:
        self.check(entry, now)
        limits = self.limits
        cells = self._cells.get(entry.key)
        held = cells.get(entry.subkey) if cells is not None else None
        if held is not None:
            if held.entry == entry:
                held.received = now
                return False
            if self.validators.select(held.entry, entry) is not entry:
                raise StaleRecord(
                    f"record for key {entry.key[:32]!r} expiring at {entry.expiry:.0f} is not "
                    f"newer than the one held (expiring at {held.entry.expiry:.0f})"
                )
        size = entry.size
        freed = held.size if held is not None else 0
        if sender is not None:
            used = self._usage.get(sender, 0) - (freed if held and held.sender == sender else 0)
            if used + size > limits.per_peer_quota_bytes:
                raise QuotaExceeded(
                    f"peer {sender} would hold {used + size} bytes here, over "
                    f"DhtLimits.per_peer_quota_bytes={limits.per_peer_quota_bytes}"
                )
        key_total = self._key_bytes.get(entry.key, 0) - freed + size
        if key_total > limits.max_key_total_bytes:
            raise StoreFull(
                f"key {entry.key[:32]!r} would hold {key_total} bytes, over "
                f"DhtLimits.max_key_total_bytes={limits.max_key_total_bytes}"
            )
        self._make_room(self.size_bytes - freed + size - limits.store_cap_bytes, entry)
        if held is not None:
            self._drop(entry.key, entry.subkey)
        self._keep(entry, sender, now)
        return True

    def _make_room(self, excess: int, entry: Entry) -> None:
        """Evict the soonest-to-expire entries (expiring before ``entry``) to free ``excess``."""
        if excess <= 0:
            return
        victims: list[tuple[float, int, bytes, bytes | None]] = []
        freed = 0
        while freed < excess and self._expiries:
            item = heapq.heappop(self._expiries)
            expiry, seq, key, subkey = item
            held = self._cells.get(key, {}).get(subkey)
            if held is None or held.seq != seq:
                continue
            if expiry >= entry.expiry or (key, subkey) == entry.cell:
                heapq.heappush(self._expiries, item)
                break
            victims.append(item)
            freed += held.size
        if freed < excess:
            for item in victims:
                heapq.heappush(self._expiries, item)
            raise StoreFull(
                f"store holds {self.size_bytes} bytes (DhtLimits.store_cap_bytes="
                f"{self.limits.store_cap_bytes}) and every entry expires after this one"
            )
        for _, _, key, subkey in victims:
            self._drop(key, subkey)

    def _keep(self, entry: Entry, sender: PeerId | None, now: float) -> None:
        seq = next(self._seq)
        held = _Held(entry, sender, entry.size, now, seq)
        self._cells.setdefault(entry.key, {})[entry.subkey] = held
        self._key_bytes[entry.key] = self._key_bytes.get(entry.key, 0) + held.size
        self.size_bytes += held.size
        if sender is not None:
            self._usage[sender] = self._usage.get(sender, 0) + held.size
        heapq.heappush(self._expiries, (entry.expiry, seq, entry.key, entry.subkey))

    def _drop(self, key: bytes, subkey: bytes | None) -> None:
        cells = self._cells[key]
        held = cells.pop(subkey)
        if not cells:
            del self._cells[key]
            del self._key_bytes[key]
        else:
            self._key_bytes[key] -= held.size
        self.size_bytes -= held.size
        if held.sender is not None:
            left = self._usage[held.sender] - held.size
            if left:
                self._usage[held.sender] = left
            else:
                del self._usage[held.sender]

    def expire(self, now: float) -> int:
        """Drop every entry whose expiry has passed; returns how many went."""
        dropped = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, seq, key, subkey = heapq.heappop(self._expiries)
            held = self._cells.get(key, {}).get(subkey)
            if held is not None and held.seq == seq:
                self._drop(key, subkey)
                dropped += 1
        return dropped

    def get(self, key: bytes, now: float) -> list[Entry]:
        """The live entries of ``key`` (plain value and sub-keys)."""
        cells = self._cells.get(key)
        if cells is None:
            return []
        return [held.entry for held in cells.values() if held.entry.expiry > now]

    def keys(self) -> list[bytes]:
        return list(self._cells)

    def due_for_republish(self, now: float, interval: float) -> list[bytes]:
        """Keys none of whose entries arrived (or were republished) within ``interval``."""
        cutoff = now - interval
        return [
            key
            for key, cells in self._cells.items()
            if max(held.received for held in cells.values()) <= cutoff
        ]

    def mark_republished(self, key: bytes, now: float) -> None:
        for held in self._cells.get(key, {}).values():
            held.received = now
