"""Routing: exact least latency (against brute force), failover, batch spreading, errors."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping

import pytest

from scheduler import (
    Hop,
    MissingBlocksError,
    Route,
    SchedulerConfigError,
    SchedulerSettings,
    ServerInfo,
    ServerState,
    SwarmSnapshot,
    replace_span,
    route_for_throughput,
    route_min_latency,
)

DEFAULT_RTT = 0.1
SETTINGS = SchedulerSettings(default_rtt_s=DEFAULT_RTT)


def _rtt(
    sender: ServerInfo | None, receiver: ServerInfo | None, client: Mapping[str | bytes, float]
) -> float:
    """The documented round-trip rule, written out independently of the scheduler."""
    if sender is None:
        assert receiver is not None
        return client.get(receiver.peer_id, DEFAULT_RTT)
    if receiver is None:
        return client.get(sender.peer_id, DEFAULT_RTT)
    if sender.peer_id == receiver.peer_id:
        return 0.0
    if receiver.peer_id in sender.rtts:
        return sender.rtts[receiver.peer_id]
    return receiver.rtts.get(sender.peer_id, DEFAULT_RTT)


def _link(
    sender: ServerInfo | None,
    receiver: ServerInfo | None,
    client: Mapping[str | bytes, float],
    push: bool,
) -> float:
    """What moving hidden states from ``sender`` to ``receiver`` costs (None: the client).

    With push, every link is crossed one way (half its round trip). Relayed by the
    client, entering a hop costs the client's round trip to it, and going back is free
    (it was part of that round trip); staying on one server costs nothing either way.
    """
    if push:
        return _rtt(sender, receiver, client) / 2
    if receiver is None or (sender is not None and sender.peer_id == receiver.peer_id):
        return 0.0
    return client.get(receiver.peer_id, DEFAULT_RTT)


def _cost(
    snapshot: SwarmSnapshot,
    hops: tuple[Hop, ...],
    client: Mapping[str | bytes, float],
    tokens: int,
    source: ServerInfo | None = None,
    sink: ServerInfo | None = None,
    push: bool = True,
) -> float:
    total, previous = 0.0, source
    for hop in hops:
        server = snapshot.server(hop.peer_id)
        total += _link(previous, server, client, push) + hop.length * tokens / server.throughput
        previous = server
    return total + _link(previous, sink, client, push)


def _brute(
    snapshot: SwarmSnapshot,
    client: Mapping[str | bytes, float],
    tokens: int,
    start: int,
    end: int,
    source: ServerInfo | None = None,
    sink: ServerInfo | None = None,
    banned: frozenset[str | bytes] = frozenset(),
    push: bool = True,
) -> float:
    """Least latency over every chain of (server, sub-span) hops."""
    if not push:
        # Relayed, the client sits between every two hops: the neighbouring hops do not
        # matter.
        source = sink = None
    usable = [
        s
        for s in snapshot
        if s.state is ServerState.ONLINE and s.throughput > 0 and s.peer_id not in banned
    ]

    def best_from(block: int, previous: ServerInfo | None) -> float:
        if block == end:
            return _link(previous, sink, client, push)
        best = math.inf
        for server in usable:
            if not server.covers(block):
                continue
            for stop in range(block + 1, min(server.end, end) + 1):
                link = _link(previous, server, client, push)
                hop = link + (stop - block) * tokens / server.throughput
                best = min(best, hop + best_from(stop, server))
        return best

    return best_from(start, source)


def _random_swarm(rng: random.Random) -> tuple[SwarmSnapshot, dict[str | bytes, float]]:
    n = rng.randint(1, 6)
    peers = [f"p{i}" for i in range(rng.randint(1, 5))]
    servers = []
    for peer in peers:
        a = rng.randrange(n)
        rtts = {
            other: rng.choice([0.0, 0.01, 0.05, 0.3])
            for other in peers
            if other != peer and rng.random() < 0.6
        }
        servers.append(
            ServerInfo(
                peer,
                a,
                rng.randint(a + 1, n),
                rng.choice([0.5, 1.0, 2.0, 5.0, 10.0]),
                state=rng.choice([ServerState.ONLINE] * 4 + [ServerState.JOINING]),
                rtts=rtts,
            )
        )
    client = {p: rng.choice([0.01, 0.2]) for p in peers if rng.random() < 0.5}
    return SwarmSnapshot(n, tuple(servers)), client


@pytest.mark.parametrize("push", [True, False])
def test_min_latency_route_matches_brute_force_on_random_small_swarms(push: bool) -> None:
    rng = random.Random(5)
    routed = 0
    for _ in range(1500):
        snapshot, client = _random_swarm(rng)
        tokens = rng.choice([1, 4])
        best = _brute(snapshot, client, tokens, 0, snapshot.num_blocks, push=push)
        kwargs = {"num_tokens": tokens, "push": push, "settings": SETTINGS}
        if best == math.inf:
            with pytest.raises(MissingBlocksError):
                route_min_latency(snapshot, client, **kwargs)
            continue
        route = route_min_latency(snapshot, client, **kwargs)
        assert (route.start, route.end) == (0, snapshot.num_blocks)
        assert route.expected_latency_s == pytest.approx(best, abs=1e-9)
        cost = _cost(snapshot, route.hops, client, tokens, push=push)
        assert cost == pytest.approx(best, abs=1e-9)
        routed += 1
    assert routed > 500


@pytest.mark.parametrize("push", [True, False])
def test_failover_sub_route_matches_brute_force_and_avoids_the_failed_server(push: bool) -> None:
    rng = random.Random(6)
    replaced = 0
    for _ in range(800):
        snapshot, client = _random_swarm(rng)
        try:
            route = route_min_latency(snapshot, client, push=push, settings=SETTINGS)
        except MissingBlocksError:
            continue
        for index, hop in enumerate(route.hops):
            source = snapshot.server(route.hops[index - 1].peer_id) if index else None
            after = route.hops[index + 1].peer_id if index + 1 < len(route) else None
            sink = snapshot.server(after) if after is not None else None
            best = _brute(
                snapshot,
                client,
                1,
                hop.start,
                hop.end,
                source,
                sink,
                frozenset({hop.peer_id}),
                push=push,
            )
            kwargs = {"client_rtts": client, "push": push, "settings": SETTINGS}
            if best == math.inf:
                with pytest.raises(MissingBlocksError):
                    replace_span(snapshot, route, index, **kwargs)
                continue
            sub = replace_span(snapshot, route, index, **kwargs)
            assert (sub.start, sub.end) == (hop.start, hop.end)
            assert hop.peer_id not in sub.peer_ids
            assert sub.expected_latency_s == pytest.approx(best, abs=1e-9)
            spliced = route.splice(index, sub)
            assert (spliced.start, spliced.end) == (route.start, route.end)
            replaced += 1
    assert replaced > 200


def test_partial_spans_are_used_and_measured_round_trips_beat_defaults() -> None:
    snapshot = SwarmSnapshot(
        12,
        (
            ServerInfo("a", 0, 12, 1.0),
            ServerInfo("b", 0, 6, 100.0, rtts={"c": 0.001}),
            ServerInfo("c", 4, 12, 50.0),
        ),
    )
    route = route_min_latency(snapshot, {"b": 0.001, "c": 0.001}, settings=SETTINGS)
    # "a" is slow (12 s of compute). b, then c from block 6 on (c serves [4, 12) but b
    # is faster), with a measured 1 ms between them.
    assert route.hops == (Hop("b", 0, 6), Hop("c", 6, 12))
    # With push each link is crossed one way: half of 1 + 1 + 1 ms.
    assert route.expected_latency_s == pytest.approx(0.0015 + 6 / 100.0 + 6 / 50.0)
    # Unmeasured, the b -> c round trip costs the default: one hop on "a" would cost
    # 0.2 + 12 s, still worse.
    plain = SwarmSnapshot(
        12, (snapshot.server("a"), snapshot.server("c"), ServerInfo("b", 0, 6, 100.0))
    )
    assert route_min_latency(
        plain, {"b": 0.001, "c": 0.001}, settings=SETTINGS
    ).expected_latency_s == (pytest.approx((0.002 + DEFAULT_RTT) / 2 + 6 / 100.0 + 6 / 50.0))


def test_push_routes_follow_server_round_trips_and_relayed_routes_client_ones() -> None:
    # Two ways through 4 blocks: "near1" -> "near2", close to each other but far from the
    # client, or "far1" -> "far2", close to the client but 200 ms apart.
    snapshot = SwarmSnapshot(
        4,
        (
            ServerInfo("near1", 0, 2, 1000.0, rtts={"near2": 0.002, "far2": 0.2}),
            ServerInfo("near2", 2, 4, 1000.0),
            ServerInfo("far1", 0, 2, 1000.0, rtts={"far2": 0.2, "near2": 0.2}),
            ServerInfo("far2", 2, 4, 1000.0),
        ),
    )
    client = {"near1": 0.05, "near2": 0.05, "far1": 0.01, "far2": 0.01}
    pushed = route_min_latency(snapshot, client, settings=SETTINGS)
    assert pushed.peer_ids == ("near1", "near2")
    # client -> near1 -> near2 -> client, one way each: (50 + 2 + 50) / 2 ms, plus compute.
    assert pushed.expected_latency_s == pytest.approx(0.051 + 4 / 1000.0)
    relayed = route_min_latency(snapshot, client, push=False, settings=SETTINGS)
    assert relayed.peer_ids == ("far1", "far2")
    # A client round trip per hop; the servers' own round trips do not matter.
    assert relayed.expected_latency_s == pytest.approx(0.02 + 4 / 1000.0)


def test_banned_offline_joining_slow_and_full_servers_are_not_routed_to() -> None:
    snapshot = SwarmSnapshot(
        4,
        (
            ServerInfo("fast", 0, 4, 100.0),
            ServerInfo("ok", 0, 4, 1.0, cache_tokens_left=4096),
            ServerInfo("full", 0, 4, 1000.0, cache_tokens_left=10),
            ServerInfo("loading", 0, 4, 1000.0, state=ServerState.JOINING),
            ServerInfo("gone", 0, 4, 1000.0, state=ServerState.OFFLINE),
            ServerInfo("untrusted", 0, 4, 1000.0, reputation=0.0),
        ),
    )
    assert route_min_latency(snapshot, settings=SETTINGS).peer_ids == ("full",)
    assert route_min_latency(snapshot, min_cache_tokens=100, settings=SETTINGS).peer_ids == (
        "fast",
    )
    assert route_min_latency(
        snapshot, banned={"fast"}, min_cache_tokens=100, settings=SETTINGS
    ).peer_ids == ("ok",)


def test_missing_blocks_error_names_the_uncovered_blocks() -> None:
    snapshot = SwarmSnapshot(
        10,
        (
            ServerInfo("a", 0, 3, 1.0),
            ServerInfo("b", 3, 5, 1.0, state=ServerState.JOINING),
            ServerInfo("c", 6, 8, 1.0),
            ServerInfo("d", 8, 10, 1.0),
        ),
    )
    with pytest.raises(MissingBlocksError, match=r"block\(s\) 3-5 of 10") as caught:
        route_min_latency(snapshot)
    assert caught.value.blocks == (3, 4, 5)
    with pytest.raises(MissingBlocksError, match=r"3-5, 8-9 of 10 \(2 server") as caught:
        route_for_throughput(snapshot, random.Random(0), banned={"d"})
    assert caught.value.blocks == (3, 4, 5, 8, 9)
    with pytest.raises(MissingBlocksError, match=r"block\(s\) 0-9"):
        route_min_latency(SwarmSnapshot(10))


def test_failover_can_use_several_servers_and_the_neighbouring_hop() -> None:
    snapshot = SwarmSnapshot(
        9,
        (
            ServerInfo("a", 0, 5, 10.0),
            ServerInfo("big", 3, 9, 1000.0),
            ServerInfo("x", 4, 7, 10.0),
            ServerInfo("y", 6, 9, 10.0),
        ),
    )
    route = Route((Hop("a", 0, 3), Hop("big", 3, 9)))
    sub = replace_span(snapshot, route, 1, settings=SETTINGS)
    # "a" goes on at no cost, then x and y: 3 links crossed one way (half of 0.1 s each)
    # plus six blocks at 0.1 s each.
    assert sub.hops[0].peer_id == "a" and sub.hops[0].start == 3
    assert set(sub.peer_ids) == {"a", "x", "y"}
    assert sub.expected_latency_s == pytest.approx(0.75)
    assert route.splice(1, sub).hops[0] == Hop("a", 0, 3)
    with pytest.raises(MissingBlocksError, match="5-8"):
        replace_span(snapshot, route, 1, banned={"x", "y"}, settings=SETTINGS)
    with pytest.raises(SchedulerConfigError, match="failed_hop"):
        replace_span(snapshot, route, 2)


def test_route_values_check_their_shape() -> None:
    with pytest.raises(SchedulerConfigError, match="at least one hop"):
        Route(())
    with pytest.raises(SchedulerConfigError, match="do not meet"):
        Route((Hop("a", 0, 2), Hop("b", 3, 4)))
    with pytest.raises(SchedulerConfigError, match="empty"):
        Hop("a", 2, 2)
    route = Route((Hop("a", 0, 2), Hop("b", 2, 4)))
    with pytest.raises(SchedulerConfigError, match="covers"):
        route.splice(0, Route((Hop("c", 0, 3),)))
    with pytest.raises(SchedulerConfigError, match="num_tokens"):
        route_min_latency(SwarmSnapshot(1, (ServerInfo("a", 0, 1, 1.0),)), num_tokens=0)


def test_batch_routes_send_ten_times_the_traffic_to_a_ten_times_faster_server() -> None:
    servers = [ServerInfo(f"slow{i}", 0, 8, 10.0) for i in range(9)]
    servers.append(ServerInfo("fast", 0, 8, 100.0))
    snapshot = SwarmSnapshot(8, tuple(servers))
    rng = random.Random(42)
    traffic: Counter[str | bytes] = Counter()
    for _ in range(20_000):
        for hop in route_for_throughput(snapshot, rng):
            traffic[hop.peer_id] += hop.length
    slow_mean = sum(traffic[f"slow{i}"] for i in range(9)) / 9
    assert traffic["fast"] / slow_mean == pytest.approx(10.0, rel=0.1)


def test_batch_traffic_follows_throughput_block_by_block() -> None:
    # Blocks 0-3 and 4-7 each have one fast (30) and two slow (10, 5) servers, and one
    # full-span server (15): every block's traffic splits in proportion to throughput.
    snapshot = SwarmSnapshot(
        8,
        (
            ServerInfo("f1", 0, 4, 30.0),
            ServerInfo("s1", 0, 4, 10.0),
            ServerInfo("t1", 0, 4, 5.0),
            ServerInfo("f2", 4, 8, 30.0),
            ServerInfo("s2", 4, 8, 10.0),
            ServerInfo("t2", 4, 8, 5.0),
            ServerInfo("all", 0, 8, 15.0, reputation=1.0),
        ),
    )
    rng = random.Random(1)
    per_block: list[Counter[str | bytes]] = [Counter() for _ in range(8)]
    rounds = 20_000
    for _ in range(rounds):
        route = route_for_throughput(snapshot, rng)
        assert (route.start, route.end) == (0, 8)
        for hop in route:
            for block in range(hop.start, hop.end):
                per_block[block][hop.peer_id] += 1
    first = per_block[0]
    assert first["f1"] / rounds == pytest.approx(30 / 60, rel=0.05)
    assert first["s1"] / rounds == pytest.approx(10 / 60, rel=0.05)
    assert first["all"] / rounds == pytest.approx(15 / 60, rel=0.05)
    assert per_block[4]["f2"] / per_block[4]["s2"] == pytest.approx(3.0, rel=0.08)


def test_batch_routes_are_reproducible_and_skip_banned_servers() -> None:
    snapshot = SwarmSnapshot(
        6, tuple(ServerInfo(f"s{i}", (i % 3) * 2, (i % 3) * 2 + 2, 1.0 + i) for i in range(9))
    )
    first = [route_for_throughput(snapshot, random.Random(9)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    banned = {"s0", "s3"}
    for seed in range(50):
        route = route_for_throughput(snapshot, random.Random(seed), banned=banned)
        assert not banned & set(route.peer_ids)
