"""The lookup state machine, fed by hand and inside simulated networks."""

from __future__ import annotations

import random

import pytest

from dht import Contact, DhtLimits, Lookup, SimNetwork, key_id
from dht._messages import FindNode, FindValue, Reply, Request
from dht._records import Entry
from security import PeerId
from tests.dht.dht_helpers import contact

LIMITS = DhtLimits(k=4, alpha=2, lookup_stall_s=1.0)


def nearest(contacts: list[Contact], target: int, count: int) -> list[Contact]:
    return sorted(contacts, key=lambda c: c.node_id ^ target)[:count]


class StaticNetwork:
    """Every peer knows every other and answers FIND_NODE with its true nearest."""

    def __init__(self, rng: random.Random, size: int, k: int) -> None:
        self.contacts = [contact(rng) for _ in range(size)]
        self.k = k

    def answer(self, peer: PeerId, target: int) -> list[Contact]:
        others = [c for c in self.contacts if c.peer_id != peer]
        return nearest(others, target, self.k)


def drive(lookup: Lookup, network: StaticNetwork) -> None:
    while not lookup.done:
        queries = lookup.next_queries(0.0)
        assert queries, "a lookup that is not done must have someone to ask"
        for c in queries:
            lookup.on_reply(c.peer_id, network.answer(c.peer_id, lookup.target))


def test_converges_on_the_true_k_nearest(rng: random.Random) -> None:
    network = StaticNetwork(rng, 300, LIMITS.k)
    for _ in range(20):
        target = rng.getrandbits(256)
        seeds = rng.sample(network.contacts, 3)
        lookup = Lookup(target, seeds, LIMITS)
        drive(lookup, network)
        assert lookup.closest() == nearest(network.contacts, target, LIMITS.k)
        assert lookup.hops >= 1


def test_never_more_than_alpha_in_flight(rng: random.Random) -> None:
    seeds = [contact(rng) for _ in range(10)]
    lookup = Lookup(1, seeds, LIMITS)
    first = lookup.next_queries(0.0)
    assert len(first) == 2
    assert lookup.next_queries(0.0) == []
    lookup.on_failure(first[0].peer_id)
    assert len(lookup.next_queries(0.1)) == 1
    assert lookup.queries_sent == 3


def test_stalled_requests_free_their_slot_and_late_replies_count(rng: random.Random) -> None:
    seeds = [contact(rng) for _ in range(6)]
    lookup = Lookup(7, seeds, LIMITS)
    first = lookup.next_queries(0.0)
    assert lookup.next_deadline() == 1.0
    lookup.handle_timer(0.5)
    assert lookup.next_queries(0.5) == []
    lookup.handle_timer(1.0)
    second = lookup.next_queries(1.0)
    assert len(second) == 2 and not set(second) & set(first)
    assert set(lookup.pending()) == {c.peer_id for c in first + second}
    lookup.on_reply(first[0].peer_id, [])
    assert first[0] in lookup.closest()


def test_failed_peers_are_left_out_and_replaced(rng: random.Random) -> None:
    network = StaticNetwork(rng, 60, 3 * LIMITS.k)
    dead = {c.peer_id for c in rng.sample(network.contacts, 20)}
    target = rng.getrandbits(256)
    lookup = Lookup(target, network.contacts[:5], LIMITS)
    while not lookup.done:
        for c in lookup.next_queries(0.0):
            if c.peer_id in dead:
                lookup.on_failure(c.peer_id)
            else:
                lookup.on_reply(c.peer_id, network.answer(c.peer_id, target))
    alive = [c for c in network.contacts if c.peer_id not in dead]
    assert lookup.closest() == nearest(alive, target, LIMITS.k)


def test_empty_seeds_end_at_once() -> None:
    lookup = Lookup(5, [], LIMITS)
    assert lookup.done and lookup.closest() == [] and lookup.hops == 0


def test_value_lookup_starts_narrow_widens_then_stops_once_found(rng: random.Random) -> None:
    seeds = [contact(rng) for _ in range(8)]
    lookup = Lookup(3, seeds, LIMITS, find_value=True)
    (first,) = lookup.next_queries(0.0)
    assert first == nearest(seeds, 3, 1)[0]
    assert lookup.next_queries(0.0) == []
    lookup.on_reply(first.peer_id, [])
    a, b = lookup.next_queries(0.1)
    lookup.on_reply(a.peer_id, [], found=True)
    assert lookup.found and not lookup.done
    assert lookup.next_queries(0.2) == []
    lookup.on_reply(b.peer_id, [])
    assert lookup.done
    assert lookup.holders() == [a]
    assert lookup.cache_target() == first
    assert lookup.queries_sent == 3


def test_value_lookup_found_by_the_first_probe_costs_one_request(rng: random.Random) -> None:
    lookup = Lookup(3, [contact(rng) for _ in range(8)], LIMITS, find_value=True)
    (first,) = lookup.next_queries(0.0)
    lookup.on_reply(first.peer_id, [], found=True)
    assert lookup.done and lookup.queries_sent == 1 and lookup.hops == 1
    assert lookup.cache_target() is None


def test_value_lookup_wanting_several_holders_asks_them_at_once(rng: random.Random) -> None:
    lookup = Lookup(3, [contact(rng) for _ in range(8)], LIMITS, find_value=True, want=2)
    a, b = lookup.next_queries(0.0)
    lookup.on_reply(a.peer_id, [], found=True)
    assert not lookup.found
    (c,) = lookup.next_queries(0.1)
    lookup.on_failure(b.peer_id)
    lookup.on_reply(c.peer_id, [], found=True)
    assert lookup.found and lookup.done
    assert set(lookup.holders()) == {a, c}


def test_a_stalled_probe_widens_the_lookup(rng: random.Random) -> None:
    lookup = Lookup(3, [contact(rng) for _ in range(8)], LIMITS, find_value=True)
    assert len(lookup.next_queries(0.0)) == 1
    lookup.handle_timer(1.0)
    assert len(lookup.next_queries(1.0)) == 2


def test_lookup_results_respect_the_ip_group_cap(rng: random.Random) -> None:
    limits = DhtLimits(k=8, alpha=3, exempt_private_addrs=False)
    sybils = [contact(rng, f"203.0.113.{i}") for i in range(1, 40)]
    honest = [contact(rng, f"198.51.{i}.7") for i in range(40)]
    target = rng.getrandbits(256)
    lookup = Lookup(target, [*sybils[:5], *honest[:5]], limits)
    while not lookup.done:
        for c in lookup.next_queries(0.0):
            lookup.on_reply(c.peer_id, nearest(sybils + honest, target, 8))
    result = lookup.closest()
    assert sum(1 for c in result if c.ip and c.ip.startswith("203.0.113.")) <= 2
    assert len(result) == 8


def test_disjoint_paths_never_share_a_peer(rng: random.Random) -> None:
    limits = DhtLimits(k=6, alpha=2, disjoint_paths=3)
    network = StaticNetwork(rng, 200, 6)
    target = rng.getrandbits(256)
    lookup = Lookup(target, rng.sample(network.contacts, 12), limits)
    queried_by_path: dict[int, set[PeerId]] = {}
    while not lookup.done:
        for c in lookup.next_queries(0.0):
            path = lookup._candidates[c.peer_id].path
            queried_by_path.setdefault(path, set()).add(c.peer_id)
            lookup.on_reply(c.peer_id, network.answer(c.peer_id, target))
    paths = list(queried_by_path.values())
    assert len(paths) == 3
    for i, one in enumerate(paths):
        for other in paths[i + 1 :]:
            assert not one & other
    assert lookup.closest()[0] == nearest(network.contacts, target, 1)[0]


# --- simulated networks ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_simulated_1000_nodes_find_everything_before_and_after_30_percent_churn() -> None:
    net = SimNetwork(seed=7, now=1_000_000.0)
    boot = net.add_node()
    peers = [boot] + [net.add_node(boot) for _ in range(999)]
    keys = [b"key-%d" % i for i in range(40)]
    for key in keys:
        src = net.rng.choice(peers)
        assert net.store(src, Entry(key, None, b"value", net.now + 3600)) >= 20
    hops = []
    for key in keys:
        for src in net.rng.sample(peers, 10):
            result = net.get(src, key)
            assert [e.value for e in result.entries] == [b"value"]
            hops.append(result.hops)
    assert sorted(hops)[len(hops) // 2] <= 3
    for peer in net.rng.sample(peers, 300):
        net.kill(peer)
    alive = [p for p in peers if p in net.alive]
    found = total = 0
    for key in keys:
        for src in net.rng.sample(alive, 10):
            total += 1
            found += bool(net.get(src, key).entries)
    assert found / total >= 0.99


def _eclipse(net: SimNetwork, me: PeerId, request: Request) -> Reply:
    """An attacker (its proof-of-work paid): never has values, answers with fellow
    attackers nearest the target."""
    proof = net.cores[me].proof
    target = request.target if isinstance(request, FindNode) else None
    if isinstance(request, FindValue):
        target = key_id(request.key)
    if target is None:
        return Reply(proof=proof)
    gang = [net.contacts[p] for p in net.behaviours if p != me and p in net.alive]
    return Reply(peers=tuple(nearest(gang, target, net.limits.k)), proof=proof)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_disjoint_paths_find_records_that_an_eclipsing_minority_hides() -> None:
    """A third of the nodes answer every lookup with each other only and never with a
    value: a single path gets captured now and then, four disjoint paths do not."""
    success: dict[int, float] = {}
    for paths in (1, 4):
        net = SimNetwork(DhtLimits(disjoint_paths=paths), seed=11, now=1_000_000.0)
        boot = net.add_node()
        honest = [boot]
        placement = random.Random(3)
        for _ in range(299):
            if placement.random() < 0.33:
                net.add_node(boot, behaviour=_eclipse)
            else:
                honest.append(net.add_node(boot))
        keys = [b"key-%d" % i for i in range(25)]
        for key in keys:
            net.store(net.rng.choice(honest), Entry(key, None, b"v", net.now + 3600))
        found = total = 0
        for key in keys:
            for src in net.rng.sample(honest, 10):
                total += 1
                found += bool(net.lookup(src, key_id(key), key=key).entries)
        success[paths] = found / total
    assert success[1] < 0.99
    assert success[4] >= 0.99
