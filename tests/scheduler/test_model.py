"""ServerInfo and SwarmSnapshot: validation, canonical order, per-block sums, the bound."""

from __future__ import annotations

import itertools
import pickle
import random

import pytest

from scheduler import (
    InvalidSnapshot,
    SchedulerConfigError,
    SchedulerSettings,
    ServerInfo,
    ServerState,
    SwarmSnapshot,
    UnknownServer,
)


def test_server_info_rejects_impossible_announcements() -> None:
    with pytest.raises(InvalidSnapshot, match="need 0 <= start < end"):
        ServerInfo("a", 4, 4, 1.0)
    with pytest.raises(InvalidSnapshot, match="need 0 <= start < end"):
        ServerInfo("a", -1, 3, 1.0)
    with pytest.raises(InvalidSnapshot, match="throughput"):
        ServerInfo("a", 0, 3, float("nan"))
    with pytest.raises(InvalidSnapshot, match="throughput"):
        ServerInfo("a", 0, 3, -1.0)
    with pytest.raises(InvalidSnapshot, match="reputation"):
        ServerInfo("a", 0, 3, 1.0, reputation=1.5)
    with pytest.raises(InvalidSnapshot, match="RTT"):
        ServerInfo("a", 0, 3, 1.0, rtts={"b": -0.1})
    with pytest.raises(InvalidSnapshot, match="cache_tokens_left"):
        ServerInfo("a", 0, 3, 1.0, cache_tokens_left=-5)
    with pytest.raises(InvalidSnapshot, match="peer_id"):
        ServerInfo("", 0, 3, 1.0)


def test_server_info_is_a_frozen_value_with_read_only_rtts() -> None:
    rtts = {"b": 0.02}
    info = ServerInfo("a", 0, 3, 1.0, state="joining", rtts=rtts)
    rtts["c"] = 0.5
    assert dict(info.rtts) == {"b": 0.02}
    assert info.state is ServerState.JOINING
    with pytest.raises(TypeError):
        info.rtts["c"] = 0.5  # type: ignore[index]
    assert info == ServerInfo("a", 0, 3, 1.0, state=ServerState.JOINING, rtts={"b": 0.02})
    assert hash(info) == hash(ServerInfo("a", 0, 3, 1.0, state="joining", rtts={"x": 1.0}))
    assert info.with_span(1, 2).length == 1
    assert pickle.loads(pickle.dumps(info)) == info


def test_snapshot_validates_spans_and_duplicates() -> None:
    with pytest.raises(InvalidSnapshot, match="num_blocks"):
        SwarmSnapshot(0)
    with pytest.raises(InvalidSnapshot, match="model has 4 blocks"):
        SwarmSnapshot(4, (ServerInfo("a", 2, 5, 1.0),))
    with pytest.raises(InvalidSnapshot, match="twice"):
        SwarmSnapshot(4, (ServerInfo("a", 0, 1, 1.0), ServerInfo("a", 1, 2, 1.0)))
    snapshot = SwarmSnapshot(4)
    with pytest.raises(InvalidSnapshot, match="model has 4 blocks"):
        snapshot.with_server(ServerInfo("a", 2, 5, 1.0))
    with pytest.raises(UnknownServer, match="'z'"):
        snapshot.server("z")


def test_snapshot_order_is_canonical_so_sums_are_identical() -> None:
    rng = random.Random(7)
    servers = [
        ServerInfo(f"peer-{i}", a, a + rng.randint(1, 8 - a), rng.uniform(0.1, 1e4))
        for i, a in enumerate(rng.randrange(8) for _ in range(40))
    ]
    first = SwarmSnapshot(8, tuple(servers))
    rng.shuffle(servers)
    second = SwarmSnapshot(8, tuple(servers))
    assert first == second
    assert first.block_throughputs() == second.block_throughputs()
    ids = [s.peer_id for s in first]
    assert ids == sorted(ids)


def test_edits_keep_the_order_and_match_a_fresh_snapshot() -> None:
    snapshot = SwarmSnapshot(6, (ServerInfo("m", 0, 3, 1.0), ServerInfo(b"\x01", 3, 6, 2.0)))
    edited = snapshot.with_server(ServerInfo("c", 1, 4, 3.0)).with_server(
        ServerInfo("m", 2, 5, 4.0)
    )
    assert edited == SwarmSnapshot(
        6,
        (ServerInfo("c", 1, 4, 3.0), ServerInfo("m", 2, 5, 4.0), ServerInfo(b"\x01", 3, 6, 2.0)),
    )
    assert edited.server("m").start == 2
    assert "c" in edited and b"\x01" in edited and len(edited) == 3
    assert edited.without("c").without("absent") == SwarmSnapshot(
        6, (ServerInfo("m", 2, 5, 4.0), ServerInfo(b"\x01", 3, 6, 2.0))
    )
    assert [s.peer_id for s in edited.where(lambda s: s.throughput > 2.5)] == ["c", "m"]
    assert pickle.loads(pickle.dumps(edited)) == edited


def test_block_throughputs_count_online_and_optionally_joining_servers() -> None:
    snapshot = SwarmSnapshot(
        5,
        (
            ServerInfo("a", 0, 3, 10.0),
            ServerInfo("b", 2, 5, 5.0, state=ServerState.JOINING),
            ServerInfo("c", 0, 5, 100.0, state=ServerState.OFFLINE),
            ServerInfo("d", 1, 2, 0.25),
        ),
    )
    assert snapshot.block_throughputs() == (10.0, 10.25, 10.0, 0.0, 0.0)
    assert snapshot.block_throughputs(include_joining=True) == (10.0, 10.25, 15.0, 5.0, 5.0)
    assert snapshot.min_throughput() == 0.0
    assert snapshot.min_throughput(include_joining=True) == 5.0
    assert snapshot.uncovered_blocks() == (3, 4)
    assert snapshot.uncovered_blocks(include_joining=True) == ()


def _brute_bound(num_blocks: int, servers: list[tuple[float, int]]) -> float:
    """The largest z (bisection) with num_blocks * z <= sum(length * min(t, z))."""
    low, high = 0.0, 1e7
    for _ in range(200):
        z = (low + high) / 2
        if sum(length * min(t, z) for t, length in servers) >= num_blocks * z:
            low = z
        else:
            high = z
    return low


def test_upper_bound_is_the_mean_unless_a_server_alone_exceeds_it() -> None:
    even = SwarmSnapshot(4, (ServerInfo("a", 0, 2, 10.0), ServerInfo("b", 2, 4, 10.0)))
    assert even.upper_bound() == pytest.approx(10.0)
    # One server with 100 on 2 of 4 blocks: the mean (60) is out of reach; 2 blocks of
    # length-2 servers at 10 leave the other two blocks at most 20.
    lopsided = SwarmSnapshot(
        4,
        (ServerInfo("big", 0, 2, 100.0), ServerInfo("b", 2, 4, 10.0), ServerInfo("c", 0, 2, 10.0)),
    )
    assert lopsided.upper_bound() == pytest.approx(20.0)
    short = SwarmSnapshot(4, (ServerInfo("a", 0, 2, 10.0), ServerInfo("b", 0, 1, 10.0)))
    assert short.upper_bound() == 0.0
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 12)
        pairs = [
            (rng.choice([0.0, rng.uniform(0, 50), 1.0]), rng.randint(1, n))
            for _ in range(rng.randint(0, 6))
        ]
        servers = tuple(ServerInfo(f"s{i}", 0, length, t) for i, (t, length) in enumerate(pairs))
        bound = SwarmSnapshot(n, servers).upper_bound()
        assert bound == pytest.approx(_brute_bound(n, pairs), rel=1e-6, abs=1e-6)


def test_upper_bound_holds_for_every_placement_of_small_swarms() -> None:
    rng = random.Random(3)
    for _ in range(40):
        n = rng.randint(2, 5)
        pairs = [(float(rng.randint(1, 9)), rng.randint(1, n)) for _ in range(rng.randint(1, 4))]
        bound = SwarmSnapshot(
            n, tuple(ServerInfo(f"s{i}", 0, ln, t) for i, (t, ln) in enumerate(pairs))
        ).upper_bound()
        best = 0.0
        for starts in itertools.product(*(range(n - ln + 1) for _, ln in pairs)):
            placed = tuple(
                ServerInfo(f"s{i}", s, s + ln, t)
                for i, ((t, ln), s) in enumerate(zip(pairs, starts, strict=True))
            )
            best = max(best, SwarmSnapshot(n, placed).min_throughput())
        assert best <= bound + 1e-9


def test_settings_reject_impossible_values() -> None:
    with pytest.raises(SchedulerConfigError, match="quality_threshold"):
        SchedulerSettings(quality_threshold=0.9)
    with pytest.raises(SchedulerConfigError, match="default_rtt_s"):
        SchedulerSettings(default_rtt_s=-1.0)
    with pytest.raises(SchedulerConfigError, match="rebalance_jitter"):
        SchedulerSettings(rebalance_jitter=1.0)
    with pytest.raises(SchedulerConfigError, match="rebalance_period_s"):
        SchedulerSettings(rebalance_period_s=0.0)
    with pytest.raises(SchedulerConfigError, match="max_plan_moves"):
        SchedulerSettings(max_plan_moves=-1)
