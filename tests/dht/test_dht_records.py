"""Records, owned sub-keys, signatures, validator chains and the bounded store."""

from __future__ import annotations

import dataclasses
import random

import pytest

from dht._errors import (
    BadSignature,
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
from dht._limits import DhtLimits
from dht._records import Entry, SignatureValidator, ValidatorChain, owner_of
from dht._store import RateLimiter, RecordStore
from security import KeyPair
from tests.dht.dht_helpers import fake_peer, signed

NOW = 1_000_000.0
HOUR = 3600.0


@pytest.fixture(scope="module")
def alice() -> KeyPair:
    return KeyPair.from_seed(b"a" * 32)


@pytest.fixture(scope="module")
def mallory() -> KeyPair:
    return KeyPair.from_seed(b"m" * 32)


def plain(key: bytes = b"k", value: bytes = b"v", expiry: float = NOW + HOUR) -> Entry:
    return Entry(key, None, value, expiry)


# --- signatures and ownership -------------------------------------------------------


def test_owned_subkey_needs_the_owners_signature(alice, mallory) -> None:
    validator = SignatureValidator()
    entry = signed(alice, b"block/7", b"online", NOW + HOUR)
    assert entry.subkey == alice.peer_id.to_bytes()
    assert owner_of(entry.subkey) == alice.peer_id
    validator.validate(entry)
    forged = signed(mallory, b"block/7", b"offline", NOW + HOUR, subkey=entry.subkey)
    with pytest.raises(BadSignature):
        validator.validate(forged)
    with pytest.raises(BadSignature):
        validator.validate(dataclasses.replace(entry, signature=b""))


@pytest.mark.parametrize(
    "change",
    [
        {"value": b"offline"},
        {"expiry": NOW + 2 * HOUR},
        {"key": b"block/8"},
    ],
)
def test_signature_covers_key_value_and_expiry(alice, change) -> None:
    entry = signed(alice, b"block/7", b"online", NOW + HOUR)
    with pytest.raises(BadSignature):
        SignatureValidator().validate(dataclasses.replace(entry, **change))


def test_signature_is_domain_separated(alice) -> None:
    """A signature alice made over the same bytes for another purpose does not verify."""
    from dht._records import signing_input

    raw = signing_input(b"block/7", alice.peer_id.to_bytes(), b"online", NOW + HOUR)
    assert raw.startswith(len(b"swarm-dht-entry/1").to_bytes(4, "big") + b"swarm-dht-entry/1")
    undomained = raw[4 + len(b"swarm-dht-entry/1") :]
    entry = Entry(
        b"block/7", alice.peer_id.to_bytes(), b"online", NOW + HOUR, alice.sign(undomained)
    )
    with pytest.raises(BadSignature):
        SignatureValidator().validate(entry)


def test_unowned_subkeys_and_plain_values_need_no_signature() -> None:
    validator = SignatureValidator()
    validator.validate(Entry(b"k", b"not-a-peer-id", b"v", NOW + HOUR))
    validator.validate(plain())
    assert owner_of(b"not-a-peer-id") is None
    assert owner_of(None) is None


class _NoEmptyValues:
    def validate(self, entry: Entry) -> None:
        if not entry.value:
            raise RecordRejected("empty values are not allowed here")

    def select(self, current: Entry, incoming: Entry) -> Entry | None:
        return max(current, incoming, key=lambda e: e.value)


def test_validator_chain_validates_all_and_first_opinion_selects() -> None:
    chain = ValidatorChain([_NoEmptyValues()])
    with pytest.raises(RecordRejected):
        chain.validate(plain(value=b""))
    old, new = plain(value=b"b", expiry=NOW + 10), plain(value=b"a", expiry=NOW + 20)
    assert chain.select(old, new) == old
    default = ValidatorChain()
    assert default.select(old, new) == new
    assert default.select(new, old) == new
    assert default.select(new, dataclasses.replace(new, value=b"z")) == new


def test_merge_keeps_the_best_version_of_each_cell(alice) -> None:
    chain = ValidatorChain()
    a1 = signed(alice, b"k", b"v1", NOW + 10)
    a2 = signed(alice, b"k", b"v2", NOW + 20)
    p1, p2 = plain(expiry=NOW + 5), plain(value=b"w", expiry=NOW + 50)
    merged = chain.merge([a2, p1, a1, p2])
    assert sorted(merged, key=lambda e: e.expiry) == [a2, p2]


# --- the store ----------------------------------------------------------------------


def test_store_keeps_plain_values_and_subkeys_side_by_side(alice, rng) -> None:
    store = RecordStore(DhtLimits())
    sender = fake_peer(rng)
    owned = signed(alice, b"k", b"mine", NOW + HOUR)
    assert store.put(plain(), sender, NOW) is True
    assert store.put(owned, sender, NOW) is True
    assert store.put(owned, sender, NOW) is False
    assert sorted(store.get(b"k", NOW), key=lambda e: e.subkey or b"") == [plain(), owned]
    assert store.get(b"other", NOW) == []


@pytest.mark.parametrize(
    ("entry", "error", "code"),
    [
        (Entry(b"k" * 513, None, b"v", NOW + HOUR), RecordTooLarge, RefusalCode.TOO_LARGE),
        (Entry(b"k", b"s" * 513, b"v", NOW + HOUR), RecordTooLarge, RefusalCode.TOO_LARGE),
        (Entry(b"k", None, b"v" * 65536, NOW + HOUR), RecordTooLarge, RefusalCode.TOO_LARGE),
        (Entry(b"k", None, b"v", NOW), RecordExpired, RefusalCode.EXPIRED),
        (Entry(b"k", None, b"v", NOW - 1), RecordExpired, RefusalCode.EXPIRED),
        (Entry(b"k", None, b"v", NOW + 48 * HOUR + 1), ExpiryTooFar, RefusalCode.EXPIRY_TOO_FAR),
    ],
)
def test_store_refuses_out_of_bounds_records(rng, entry, error, code) -> None:
    store = RecordStore(DhtLimits())
    with pytest.raises(error) as raised:
        store.put(entry, fake_peer(rng), NOW)
    assert raised.value.code is code
    assert store.refusals[code] == 1
    assert len(store) == 0 and store.size_bytes == 0


def test_record_of_exactly_the_limit_is_accepted(rng) -> None:
    store = RecordStore(DhtLimits())
    overhead = plain(value=b"").size
    entry = plain(value=b"v" * (64 * 1024 - overhead))
    assert entry.size == 64 * 1024
    assert store.put(entry, fake_peer(rng), NOW)
    assert store.put(plain(b"j", expiry=NOW + 48 * HOUR), fake_peer(rng), NOW)


def test_forged_subkey_is_refused_and_the_owners_entry_stays(alice, mallory, rng) -> None:
    store = RecordStore(DhtLimits())
    genuine = signed(alice, b"block/7", b"online", NOW + HOUR)
    store.put(genuine, fake_peer(rng), NOW)
    # mallory copies alice's proof-of-work (it is public): the signature still fails
    forged = signed(mallory, b"block/7", b"evil", NOW + 2 * HOUR, subkey=genuine.subkey)
    forged = dataclasses.replace(forged, proof=genuine.proof)
    unsigned = Entry(b"block/7", genuine.subkey, b"evil", NOW + 2 * HOUR, proof=genuine.proof)
    for attempt in (forged, unsigned):
        with pytest.raises(BadSignature):
            store.put(attempt, fake_peer(rng), NOW)
    assert store.get(b"block/7", NOW) == [genuine]
    assert store.refusals[RefusalCode.BAD_SIGNATURE] == 2


def test_owned_subkey_needs_its_owners_proof_of_work(alice, mallory, rng) -> None:
    store = RecordStore(DhtLimits())
    genuine = signed(alice, b"block/7", b"online", NOW + HOUR)
    without = dataclasses.replace(genuine, proof=b"")
    borrowed = dataclasses.replace(genuine, proof=signed(mallory, b"x", b"y", NOW + 1).proof)
    for attempt in (without, borrowed):
        with pytest.raises(InsufficientProofOfWork, match="pow_difficulty=12"):
            store.put(attempt, fake_peer(rng), NOW)
    assert store.refusals[RefusalCode.INSUFFICIENT_POW] == 2
    assert store.put(genuine, fake_peer(rng), NOW)
    # plain values and sub-keys that are no PeerID need no proof; difficulty 0 needs none
    assert store.put(Entry(b"k", b"label", b"v", NOW + HOUR), fake_peer(rng), NOW)
    free = RecordStore(DhtLimits(pow_difficulty=0))
    assert free.put(without, fake_peer(rng), NOW)


def test_replayed_older_version_is_refused(alice, rng) -> None:
    store = RecordStore(DhtLimits())
    sender = fake_peer(rng)
    old = signed(alice, b"block/7", b"online", NOW + HOUR)
    new = signed(alice, b"block/7", b"offline", NOW + 2 * HOUR)
    store.put(old, sender, NOW)
    store.put(new, sender, NOW)
    with pytest.raises(StaleRecord):
        store.put(old, fake_peer(rng), NOW + 1)
    assert store.get(b"block/7", NOW) == [new]
    # after the newer version expired, the old one is expired too: still refused
    with pytest.raises(RecordExpired):
        store.put(old, sender, NOW + 3 * HOUR)
    assert store.refusals == {RefusalCode.STALE: 1, RefusalCode.EXPIRED: 1}


def test_unsigned_values_newest_expiry_wins(rng) -> None:
    store = RecordStore(DhtLimits())
    sender = fake_peer(rng)
    store.put(plain(value=b"a", expiry=NOW + 100), sender, NOW)
    store.put(plain(value=b"b", expiry=NOW + 200), sender, NOW)
    with pytest.raises(StaleRecord):
        store.put(plain(value=b"c", expiry=NOW + 150), sender, NOW)
    with pytest.raises(StaleRecord):
        store.put(plain(value=b"d", expiry=NOW + 200), sender, NOW)
    assert [e.value for e in store.get(b"k", NOW)] == [b"b"]


def test_per_peer_quota(rng) -> None:
    limits = DhtLimits(per_peer_quota_bytes=1000)
    store = RecordStore(limits)
    greedy, other = fake_peer(rng), fake_peer(rng)
    size = plain(key=b"k0", value=b"x" * 200).size
    stored = 0
    for i in range(10):
        try:
            store.put(plain(key=b"k%d" % i, value=b"x" * 200), greedy, NOW)
            stored += 1
        except QuotaExceeded as exc:
            assert exc.code is RefusalCode.QUOTA
    assert stored == 1000 // size
    assert store.usage(greedy) == stored * size <= 1000
    assert store.put(plain(key=b"other", value=b"x" * 200), other, NOW)
    # replacing one's own entry is charged only the difference
    assert store.put(plain(key=b"k0", value=b"y" * 200, expiry=NOW + 2 * HOUR), greedy, NOW)
    assert store.refusals[RefusalCode.QUOTA] == 10 - stored


def test_full_store_evicts_the_soonest_to_expire(rng) -> None:
    size = plain(key=b"k0", value=b"x" * 84).size
    store = RecordStore(DhtLimits(store_cap_bytes=3 * size))
    for i, ttl in enumerate((300, 100, 200)):
        store.put(plain(key=b"k%d" % i, value=b"x" * 84, expiry=NOW + ttl), fake_peer(rng), NOW)
    store.put(plain(key=b"k3", value=b"x" * 84, expiry=NOW + 400), fake_peer(rng), NOW)
    assert sorted(store.keys()) == [b"k0", b"k2", b"k3"]
    assert store.size_bytes == 3 * size
    with pytest.raises(StoreFull):
        store.put(plain(key=b"k4", value=b"x" * 84, expiry=NOW + 50), fake_peer(rng), NOW)
    assert sorted(store.keys()) == [b"k0", b"k2", b"k3"]
    assert store.refusals[RefusalCode.STORE_FULL] == 1


def test_key_total_is_bounded(alice, rng) -> None:
    store = RecordStore(DhtLimits(max_key_total_bytes=300))
    store.put(Entry(b"k", b"a", b"x" * 200, NOW + HOUR), fake_peer(rng), NOW)
    with pytest.raises(StoreFull):
        store.put(Entry(b"k", b"b", b"x" * 200, NOW + HOUR), fake_peer(rng), NOW)


def test_expire_and_usage_accounting(rng) -> None:
    store = RecordStore(DhtLimits())
    sender = fake_peer(rng)
    store.put(plain(key=b"a", expiry=NOW + 10), sender, NOW)
    store.put(plain(key=b"b", expiry=NOW + 20), sender, NOW)
    store.put(plain(key=b"a", expiry=NOW + 30), sender, NOW)
    assert store.get(b"b", NOW + 25) == []
    assert store.expire(NOW + 25) == 1
    assert store.keys() == [b"a"]
    assert store.usage(sender) == plain(key=b"a").size == store.size_bytes
    assert store.expire(NOW + 30) == 1
    assert store.size_bytes == 0 and store.usage(sender) == 0 and len(store) == 0


def test_store_rate_limit_refills_with_time(rng) -> None:
    store = RecordStore(DhtLimits(store_rate_per_s=2.0, store_burst=3))
    peer = fake_peer(rng)
    for _ in range(3):
        store.admit(peer, NOW)
    with pytest.raises(RateLimited):
        store.admit(peer, NOW)
    store.admit(fake_peer(rng), NOW)
    store.admit(peer, NOW + 0.5)
    with pytest.raises(RateLimited):
        store.admit(peer, NOW + 0.5)
    assert store.refusals[RefusalCode.RATE_LIMITED] == 2


def test_rate_limiter_forgets_the_least_recent_peers() -> None:
    limiter = RateLimiter(1.0, 1, max_peers=2)
    gen = random.Random(5)
    a, b, c = (fake_peer(gen) for _ in range(3))
    assert limiter.allow(a, 0.0) and not limiter.allow(a, 0.0)
    limiter.allow(b, 0.0)
    limiter.allow(c, 0.0)
    assert limiter.allow(a, 0.0)  # a was forgotten: a fresh bucket


def test_republish_due(rng) -> None:
    store = RecordStore(DhtLimits())
    store.put(plain(key=b"a"), fake_peer(rng), NOW)
    store.put(plain(key=b"b"), fake_peer(rng), NOW + 50)
    assert store.due_for_republish(NOW + 100, 100) == [b"a"]
    store.mark_republished(b"a", NOW + 100)
    assert store.due_for_republish(NOW + 150, 100) == [b"b"]
