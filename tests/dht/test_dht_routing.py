"""The routing table: k-buckets, LRS order, replacement cache, ping-before-evict, diversity."""

from __future__ import annotations

import dataclasses
import random

import pytest

from dht._contact import Contact
from dht._ids import bucket_index, node_id
from dht._limits import DhtLimits
from dht._routing import Admission, RoutingTable
from security import PeerId
from tests.dht.dht_helpers import contact, fake_peer

LIMITS = DhtLimits(k=4, replacement_cache_size=3)


def far_contacts(rng: random.Random, local: PeerId, count: int, ip: str | None = None):
    """``count`` contacts that all fall in the local node's farthest bucket (255)."""
    local_id = node_id(local)
    found: list[Contact] = []
    while len(found) < count:
        candidate = contact(rng, ip)
        if bucket_index(local_id, candidate.node_id) == 255:
            found.append(candidate)
    return found


@pytest.fixture
def local(rng: random.Random) -> PeerId:
    return fake_peer(rng)


def test_adds_until_the_bucket_is_full_then_asks_to_ping_the_oldest(rng, local) -> None:
    table = RoutingTable(local, LIMITS, now=0.0)
    first, *others, newcomer = far_contacts(rng, local, 5)
    for c in (first, *others):
        assert table.update(c, 0.0).admission is Admission.ADDED
    update = table.update(newcomer, 1.0)
    assert update.admission is Admission.CACHED
    assert update.ping == first
    assert newcomer.peer_id not in table
    # only one ping per bucket at a time
    another = far_contacts(rng, local, 1)[0]
    assert table.update(another, 1.0).ping is None


def test_live_oldest_survives_and_moves_to_most_recent(rng, local) -> None:
    table = RoutingTable(local, LIMITS, now=0.0)
    first, second, third, fourth, newcomer = far_contacts(rng, local, 5)
    for c in (first, second, third, fourth):
        table.update(c, 0.0)
    update = table.update(newcomer, 1.0)
    table.ping_result(first.peer_id, True, 2.0)
    assert first.peer_id in table and newcomer.peer_id not in table
    # first is now most recently seen: the next full-bucket ping targets second
    assert table.update(far_contacts(rng, local, 1)[0], 3.0).ping == second
    assert update.ping == first


def test_dead_oldest_is_replaced_by_the_newest_replacement(rng, local) -> None:
    table = RoutingTable(local, LIMITS, now=0.0)
    members = far_contacts(rng, local, 4)
    for c in members:
        table.update(c, 0.0)
    older, newer = far_contacts(rng, local, 2)
    table.update(older, 1.0)
    table.update(newer, 2.0)
    table.ping_result(members[0].peer_id, False, 3.0)
    assert members[0].peer_id not in table
    assert newer.peer_id in table
    assert older.peer_id not in table
    assert len(table) == 4


def test_replacement_cache_is_bounded(rng, local) -> None:
    table = RoutingTable(local, LIMITS, now=0.0)
    members = far_contacts(rng, local, 4)
    for c in members:
        table.update(c, 0.0)
    waiting = far_contacts(rng, local, 6)
    for c in waiting:
        table.update(c, 1.0)
    for c in members:
        table.remove(c.peer_id)
    # only the 3 most recent replacements were kept; they fill the bucket
    assert {c.peer_id for c in table} == {c.peer_id for c in waiting[-3:]}


def test_seen_again_moves_to_the_end_and_updates_addresses(rng, local) -> None:
    table = RoutingTable(local, LIMITS, now=0.0)
    members = far_contacts(rng, local, 4)
    for c in members:
        table.update(c, 0.0)
    assert table.update(members[0], 1.0).admission is Admission.REFRESHED
    update = table.update(far_contacts(rng, local, 1)[0], 2.0)
    assert update.ping == members[1]


def test_failures_remove_after_max_failures(rng, local) -> None:
    table = RoutingTable(local, dataclasses.replace(LIMITS, max_failures=2), now=0.0)
    c = far_contacts(rng, local, 1)[0]
    table.update(c, 0.0)
    assert table.failed(c.peer_id) is False
    assert c.peer_id in table
    table.update(c, 1.0)  # seen alive: the count starts again
    assert table.failed(c.peer_id) is False
    assert table.failed(c.peer_id) is True
    assert c.peer_id not in table
    assert table.failed(c.peer_id) is False


def test_never_adds_itself(rng, local) -> None:
    table = RoutingTable(local, LIMITS, now=0.0)
    assert table.update(Contact(local), 0.0).admission is Admission.REJECTED
    assert len(table) == 0


def test_closest_is_sorted_by_xor_distance(rng, local) -> None:
    table = RoutingTable(local, DhtLimits(), now=0.0)
    contacts = [contact(rng) for _ in range(300)]
    for c in contacts:
        table.update(c, 0.0)
    target = rng.getrandbits(256)
    members = list(table)
    ordered = sorted(members, key=lambda c: c.node_id ^ target)
    assert table.closest(target, 20) == ordered[:20]
    assert table.closest(target, 20, exclude=[ordered[0].peer_id]) == ordered[1:21]


def test_bucket_sizes_never_exceed_k(rng, local) -> None:
    table = RoutingTable(local, DhtLimits(k=5), now=0.0)
    for _ in range(500):
        table.update(contact(rng), 0.0)
    assert max(table.bucket_sizes().values()) == 5
    assert table.bucket_sizes()[255] == 5


def test_refresh_targets_cover_stale_buckets_only(rng, local) -> None:
    limits = DhtLimits(refresh_interval_s=100.0)
    table = RoutingTable(local, limits, now=0.0)
    for _ in range(50):
        table.update(contact(rng), 0.0)
    assert table.refresh_targets(50.0, rng) == []
    due = table.refresh_targets(100.0, rng)
    lowest = min(table.bucket_sizes())
    assert sorted(bucket_index(table.local_id, t) for t in due) == list(range(lowest, 256))
    table.touch(due[-1], 100.0)
    assert len(table.refresh_targets(100.0, rng)) == len(due) - 1
    assert len(table.refresh_targets(100.0, rng, force=True)) == len(due)


def bombard(rng, table: RoutingTable, ip_of, count: int) -> list[Contact]:
    sent = [contact(rng, ip_of(i)) for i in range(count)]
    for c in sent:
        update = table.update(c, 0.0)
        if update.ping is not None:
            table.ping_result(update.ping.peer_id, True, 0.0)
    return sent


def test_one_slash24_holds_at_most_10_of_a_bombarded_table(rng, local) -> None:
    table = RoutingTable(local, DhtLimits(exempt_private_addrs=False), now=0.0)
    honest = [contact(rng, f"198.51.{i}.1") for i in range(100)]
    for c in honest:
        table.update(c, 0.0)
    bombard(rng, table, lambda i: f"203.0.113.{i % 250 + 1}", 300)
    assert table.group_count("203.0.113.0/24") == 10
    attackers = [c for c in table if c.ip and c.ip.startswith("203.0.113.")]
    assert len(attackers) == 10
    for index in table.bucket_sizes():
        in_bucket = [c for c in attackers if bucket_index(table.local_id, c.node_id) == index]
        assert len(in_bucket) <= 2
    assert table.rejected_by_diversity > 200
    assert all(c.peer_id in table for c in honest if bucket_index(table.local_id, c.node_id) < 252)


def test_loopback_is_capped_when_the_exemption_is_off(rng, local) -> None:
    table = RoutingTable(local, DhtLimits(exempt_private_addrs=False), now=0.0)
    bombard(rng, table, lambda i: "127.0.0.1", 300)
    assert len(table) == 10
    assert table.group_count("127.0.0.0/24") == 10


def test_private_lan_is_exempt_by_default(rng, local) -> None:
    table = RoutingTable(local, DhtLimits(), now=0.0)
    bombard(rng, table, lambda i: f"192.168.1.{i % 250 + 1}", 300)
    assert len(table) > 60
    assert table.group_count("192.168.1.0/24") == 0


def test_removing_frees_the_group_slot(rng, local) -> None:
    limits = DhtLimits(exempt_private_addrs=False, max_per_ip_group_in_table=2)
    table = RoutingTable(local, limits, now=0.0)
    sent = bombard(rng, table, lambda i: "203.0.113.9", 40)
    inside = [c for c in sent if c.peer_id in table]
    assert len(inside) == 2
    table.remove(inside[0].peer_id)
    assert table.group_count("203.0.113.0/24") == 1
    late = contact(rng, "203.0.113.10")
    assert table.update(late, 1.0).admission in (Admission.ADDED, Admission.CACHED)
    assert table.group_count("203.0.113.0/24") in (1, 2)
