"""Routing steered by the caller's judgement: ``weights`` and ``avoid`` (pure, simulated).

A client's reputation book supplies both (``RemoteChain.steering``); here the book is
driven directly, as the chain drives it, over up to 1,000 simulated servers.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from scheduler import (
    Hop,
    MissingBlocksError,
    Route,
    SchedulerConfigError,
    ServerInfo,
    SwarmSnapshot,
    replace_span,
    route_for_throughput,
    route_min_latency,
)
from security import Event, KeyPair, PeerId, ReputationBook


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def peer(n: int) -> PeerId:
    return KeyPair.from_seed(n.to_bytes(32, "big")).peer_id


def established(book: ReputationBook, who: PeerId) -> None:
    for _ in range(book.settings.probation_checks):
        book.record(who, Event.CHECK_PASSED)


def steer(
    book: ReputationBook, keys: dict[PeerId, str], *, draw: bool
) -> tuple[set[str], set[str], dict[str, float]]:
    """What ``RemoteChain.steering`` hands the scheduler: banned, avoided, weights
    (``keys``: each peer's scheduler key)."""
    banned = {keys[p] for p in keys if book.is_banned(p)}
    allowed = set(book.eligible(keys))
    avoid = {keys[p] for p in keys if p not in allowed} - banned
    weights = book.routing_weights(keys, cap_probation=draw)
    return banned, avoid, {keys[p]: w for p, w in weights.items()}


def big_swarm(
    rng: random.Random, n: int, num_blocks: int, fast: set[int]
) -> tuple[SwarmSnapshot, list[PeerId], dict[PeerId, str]]:
    """``n`` servers on random spans of 4-10 blocks; those in ``fast`` five times faster;
    the peers, and their scheduler keys."""
    peers = [peer(i) for i in range(n)]
    keys = {who: str(who) for who in peers}
    servers = []
    for i, who in enumerate(peers):
        length = rng.randint(4, 10)
        start = rng.randrange(0, num_blocks - length + 1)
        throughput = rng.uniform(50.0, 100.0) * (5.0 if i in fast else 1.0)
        servers.append(ServerInfo(keys[who], start, start + length, throughput))
    return SwarmSnapshot(num_blocks, tuple(servers)), peers, keys


# -- batch routing at scale --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_probation_peers_get_at_most_their_share_of_batch_routes_among_1000() -> None:
    rng = random.Random(11)
    newcomers = set(range(0, 1000, 10))  # 100 fast newcomers, 900 established peers
    snapshot, peers, keys = big_swarm(rng, 1000, 40, newcomers)
    book = ReputationBook(clock=Clock())
    for i, who in enumerate(peers):
        if i not in newcomers:
            established(book, who)
    on_probation = {keys[peers[i]] for i in newcomers}
    by_key = {key: who for who, key in keys.items()}
    cap = book.settings.probation_share

    def share(steered: bool, routes: int) -> float:
        used: Counter[bool] = Counter()
        for _ in range(routes):
            if steered:
                banned, avoid, weights = steer(book, keys, draw=True)
                route = route_for_throughput(
                    snapshot, rng, banned=banned, weights=weights, avoid=avoid
                )
            else:
                route = route_for_throughput(snapshot, rng)
            for hop in route:
                used[hop.peer_id in on_probation] += hop.length
                if steered:
                    book.note_request(by_key[hop.peer_id], hop.length)
        return used[True] / (used[True] + used[False])

    unsteered = share(False, 200)
    steered = share(True, 400)
    print(f"probation share: {unsteered:.3f} unsteered, {steered:.3f} steered (cap {cap})")
    assert unsteered > 2 * cap  # fast newcomers would take far more than their cap
    assert steered <= cap + 0.01
    assert steered > cap / 4  # capped, not shut out: they still get traffic to prove themselves
    assert book.probation_traffic_share() <= cap + 0.01


@pytest.mark.timeout(60)
def test_a_low_score_peer_is_drawn_less_among_1000() -> None:
    rng = random.Random(3)
    snapshot, peers, keys = big_swarm(rng, 1000, 40, set())
    book = ReputationBook(clock=Clock())
    low = set(peers[::4])
    for who in peers:
        established(book, who)
        for _ in range(14):  # a score of 15 - 28 against 15 + 14
            book.record(who, Event.FAILURE if who in low else Event.SUCCESS)
    _, _, weights = steer(book, keys, draw=True)
    low_keys = {keys[p] for p in low}
    units: Counter[bool] = Counter()
    for _ in range(300):
        for hop in route_for_throughput(snapshot, rng, weights=weights):
            units[hop.peer_id in low_keys] += hop.length
    per_low = units[True] / len(low)
    per_high = units[False] / (len(peers) - len(low))
    print(f"block-units per peer: low score {per_low:.2f}, high score {per_high:.2f}")
    assert per_low < per_high / 3


@pytest.mark.timeout(30)
def test_draws_follow_throughput_times_weight() -> None:
    snapshot = SwarmSnapshot(
        2, (ServerInfo("a", 0, 2, 100.0), ServerInfo("b", 0, 2, 100.0), ServerInfo("c", 0, 2, 50.0))
    )
    rng = random.Random(1)
    weights = {"a": 1.0, "b": 0.25, "c": 1.0}
    counts = Counter(
        route_for_throughput(snapshot, rng, weights=weights).hops[0].peer_id for _ in range(7000)
    )
    # chances 100 : 25 : 50
    assert abs(counts["a"] / 7000 - 100 / 175) < 0.03
    assert abs(counts["b"] / 7000 - 25 / 175) < 0.03
    assert abs(counts["c"] / 7000 - 50 / 175) < 0.03


# -- least latency -----------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("push", [True, False])
def test_least_latency_prefers_the_heavier_of_equal_servers(push: bool) -> None:
    snapshot = SwarmSnapshot(4, (ServerInfo("a", 0, 4, 100.0), ServerInfo("b", 0, 4, 100.0)))
    rtts = {"a": 0.05, "b": 0.05}
    for light, heavy in (("a", "b"), ("b", "a")):
        route = route_min_latency(snapshot, rtts, push=push, weights={light: 0.4, heavy: 0.9})
        assert route.peer_ids == (heavy,)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("push", [True, False])
def test_a_lighter_server_is_still_chosen_where_clearly_faster(push: bool) -> None:
    snapshot = SwarmSnapshot(4, (ServerInfo("a", 0, 4, 100.0), ServerInfo("b", 0, 4, 100.0)))
    weights = {"a": 1.0, "b": 0.5}
    # b is eight times closer: half its weight doubles its cost, still the cheaper.
    assert route_min_latency(
        snapshot, {"a": 0.4, "b": 0.05}, push=push, weights=weights
    ).peer_ids == ("b",)
    # b only a little closer: the heavier a wins.
    assert route_min_latency(
        snapshot, {"a": 0.06, "b": 0.05}, push=push, weights=weights
    ).peer_ids == ("a",)


@pytest.mark.timeout(30)
def test_weights_are_relative_and_default_to_one() -> None:
    snapshot = SwarmSnapshot(4, (ServerInfo("a", 0, 4, 100.0), ServerInfo("b", 0, 4, 90.0)))
    rtts = {"a": 0.05, "b": 0.05}
    plain = route_min_latency(snapshot, rtts)
    scaled = route_min_latency(snapshot, rtts, weights={"a": 0.3, "b": 0.3})
    assert plain.peer_ids == scaled.peer_ids == ("a",)
    assert scaled.expected_latency_s == pytest.approx(plain.expected_latency_s)
    # an absent weight is 1: against a=0.3, the unweighted b is preferred
    assert route_min_latency(snapshot, rtts, weights={"a": 0.3}).peer_ids == ("b",)


@pytest.mark.timeout(60)
def test_low_score_peers_carry_fewer_hops_of_least_latency_routes_among_1000() -> None:
    rng = random.Random(5)
    snapshot, peers, keys = big_swarm(rng, 1000, 40, set())
    rtts = {keys[p]: rng.uniform(0.01, 0.2) for p in peers}
    book = ReputationBook(clock=Clock())
    for who in peers[::2]:
        for _ in range(6):
            book.record(who, Event.FAILURE)
    low = {keys[p] for p in peers[::2]}
    _, _, weights = steer(book, keys, draw=False)
    plain = route_min_latency(snapshot, rtts)
    steered = route_min_latency(snapshot, rtts, weights=weights)

    def low_blocks(route: Route) -> int:
        return sum(hop.length for hop in route if hop.peer_id in low)

    print(f"blocks on low-score peers: {low_blocks(plain)} plain, {low_blocks(steered)} steered")
    assert low_blocks(steered) < low_blocks(plain)
    assert low_blocks(steered) == 0


# -- exclusion and avoidance -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_weight_zero_is_never_routed() -> None:
    snapshot = SwarmSnapshot(2, (ServerInfo("a", 0, 2, 100.0), ServerInfo("b", 0, 2, 500.0)))
    rng = random.Random(2)
    for _ in range(50):
        assert route_for_throughput(snapshot, rng, weights={"b": 0.0}).peer_ids == ("a",)
    assert route_min_latency(snapshot, weights={"b": 0.0}).peer_ids == ("a",)
    with pytest.raises(MissingBlocksError):
        route_min_latency(snapshot, weights={"a": 0.0, "b": 0.0})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_a_weight_must_be_finite_and_not_negative(weight: float) -> None:
    snapshot = SwarmSnapshot(1, (ServerInfo("a", 0, 1, 1.0),))
    with pytest.raises(SchedulerConfigError, match="weight"):
        route_min_latency(snapshot, weights={"a": weight})
    with pytest.raises(SchedulerConfigError, match="weight"):
        route_for_throughput(snapshot, random.Random(0), weights={"a": weight})


@pytest.mark.timeout(30)
def test_avoided_servers_serve_only_blocks_nobody_else_serves() -> None:
    servers = (
        ServerInfo("est", 0, 2, 100.0),
        ServerInfo("new-fast", 0, 4, 10_000.0),
        ServerInfo("new-only", 2, 4, 100.0),
    )
    snapshot = SwarmSnapshot(4, servers)
    rng = random.Random(4)
    assert route_min_latency(snapshot).peer_ids == ("new-fast",)
    # new-fast would carry everything; avoided, it is left out: est and new-only cover
    assert route_min_latency(snapshot, avoid={"new-fast"}).hops == (
        Hop("est", 0, 2),
        Hop("new-only", 2, 4),
    )
    # both avoided: nobody else serves [2, 4), so there (and only there) they may serve
    for avoid in ({"new-fast", "new-only"}, {"new-fast"}):
        assert route_min_latency(snapshot, avoid=avoid).hops[0] == Hop("est", 0, 2)
        for _ in range(50):
            route = route_for_throughput(snapshot, rng, avoid=avoid)
            assert route.hops[0] == Hop("est", 0, 2)
            assert route.hops[1].start == 2
    # banned beats avoided: nothing serves [2, 4) once new-only is banned and new-fast
    # weighs nothing
    with pytest.raises(MissingBlocksError):
        route_min_latency(
            snapshot, banned={"new-only"}, weights={"new-fast": 0.0}, avoid={"new-fast"}
        )


@pytest.mark.timeout(30)
def test_replace_span_takes_weights_and_avoid() -> None:
    servers = (
        ServerInfo("a", 0, 2, 100.0),
        ServerInfo("b", 2, 4, 100.0),
        ServerInfo("c", 2, 4, 100.0),
        ServerInfo("d", 2, 4, 100.0),
    )
    snapshot = SwarmSnapshot(4, servers)
    route = Route((Hop("a", 0, 2), Hop("b", 2, 4)))
    rtts = {"c": 0.05, "d": 0.05}
    assert replace_span(snapshot, route, 1, client_rtts=rtts, weights={"c": 0.2}).peer_ids == ("d",)
    assert replace_span(snapshot, route, 1, client_rtts=rtts, weights={"d": 0.2}).peer_ids == ("c",)
    assert replace_span(snapshot, route, 1, client_rtts=rtts, avoid={"d"}).peer_ids == ("c",)
    assert replace_span(snapshot, route, 1, ("c",), client_rtts=rtts, avoid={"d"}).peer_ids == (
        "d",
    )


@pytest.mark.timeout(30)
def test_peers_crowded_behind_one_ip_group_share_their_draws() -> None:
    crowd = [peer(2000 + i) for i in range(6)]
    loners = [peer(3000 + i) for i in range(2)]
    book = ReputationBook(clock=Clock())
    for i, who in enumerate(crowd):
        book.note_address(who, f"203.0.113.{i + 1}")  # one /24
    for i, who in enumerate(loners):
        book.note_address(who, f"198.51.{100 + i}.1")
    keys = {who: str(who) for who in crowd + loners}
    snapshot = SwarmSnapshot(1, tuple(ServerInfo(key, 0, 1, 100.0) for key in keys.values()))
    _, _, weights = steer(book, keys, draw=True)
    rng = random.Random(8)
    counts = Counter(
        route_for_throughput(snapshot, rng, weights=weights).peer_ids[0] for _ in range(4000)
    )
    crowd_share = sum(counts[keys[who]] for who in crowd) / 4000
    # six crowded peers weigh 2/6 each: together 2 loners' worth, half of the draws
    print(f"six peers of one /24: {crowd_share:.3f} of the draws (unweighted: 0.75)")
    assert abs(crowd_share - 0.5) < 0.04
