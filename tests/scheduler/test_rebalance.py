"""should_move / plan_rebalance: when to move, where to, never uncovering, no herds."""

from __future__ import annotations

import random

import pytest

from scheduler import (
    MoveDecision,
    SchedulerSettings,
    ServerInfo,
    ServerState,
    SwarmSnapshot,
    UnknownServer,
    next_check_at,
    plan_rebalance,
    should_move,
)


def _apply(snapshot: SwarmSnapshot, move: MoveDecision, state: ServerState) -> SwarmSnapshot:
    server = snapshot.server(move.peer_id)
    assert (server.start, server.end) == move.from_span
    return snapshot.with_server(
        ServerInfo(server.peer_id, move.start, move.end, server.throughput, state=state)
    )


def test_a_balanced_swarm_stays_put() -> None:
    snapshot = SwarmSnapshot(
        8, tuple(ServerInfo(f"s{i}", 4 * (i % 2), 4 * (i % 2) + 4, 10.0) for i in range(6))
    )
    plan = plan_rebalance(snapshot)
    assert plan.moves == () and plan.min_before == plan.min_after == 30.0
    assert all(should_move(snapshot, s.peer_id) is None for s in snapshot)


def test_one_server_of_a_crowded_span_moves_into_the_gap() -> None:
    # Blocks 0-3 have 3 servers, blocks 4-7 one: moving one server doubles the minimum;
    # moving two would just move the gap. Only the first peer id moves.
    snapshot = SwarmSnapshot(
        8,
        (
            ServerInfo("a", 0, 4, 10.0),
            ServerInfo("b", 0, 4, 10.0),
            ServerInfo("c", 0, 4, 10.0),
            ServerInfo("d", 4, 8, 10.0),
        ),
    )
    decisions = {s.peer_id: should_move(snapshot, s.peer_id) for s in snapshot}
    movers = [d for d in decisions.values() if d is not None]
    assert len(movers) == 1
    (move,) = movers
    assert (move.peer_id, move.from_span, move.span) == ("a", (0, 4), (4, 8))
    assert move.min_before == 10.0 and move.min_after == 20.0


def test_herd_avoidance_the_others_see_the_gap_filled() -> None:
    snapshot = SwarmSnapshot(
        8,
        (
            ServerInfo("a", 0, 4, 10.0),
            ServerInfo("b", 0, 4, 10.0),
            ServerInfo("c", 0, 4, 10.0),
            ServerInfo("d", 4, 8, 10.0),
        ),
    )
    # Every server decides on the same announcements: one mover, whoever asks first.
    order = ["c", "b", "a", "d"]
    random.Random(3).shuffle(order)
    answers = [should_move(snapshot, peer) for peer in order]
    assert [a.peer_id for a in answers if a is not None] == ["a"]
    # Once the mover announces itself as joining on its new span, nobody else moves,
    # and neither does it once online.
    (move,) = [a for a in answers if a is not None]
    loading = _apply(snapshot, move, ServerState.JOINING)
    assert all(should_move(loading, s.peer_id) is None for s in loading)
    online = _apply(snapshot, move, ServerState.ONLINE)
    assert all(should_move(online, s.peer_id) is None for s in online)


def test_the_threshold_is_respected() -> None:
    # Moving "a" raises the minimum from 10 to 12 (1.2x).
    snapshot = SwarmSnapshot(
        4,
        (
            ServerInfo("a", 0, 2, 2.0),
            ServerInfo("b", 0, 2, 12.0),
            ServerInfo("c", 2, 4, 10.0),
        ),
    )
    assert should_move(snapshot, "a", SchedulerSettings(quality_threshold=1.25)) is None
    move = should_move(snapshot, "a", SchedulerSettings(quality_threshold=1.15))
    assert move is not None and move.span == (2, 4) and move.min_after == 12.0
    assert should_move(snapshot, "b", SchedulerSettings(quality_threshold=1.15)) is None


def test_a_server_never_leaves_a_block_nobody_else_serves() -> None:
    # "solo" alone serves block 0; block 3 has nobody. Only the duplicated span may move.
    snapshot = SwarmSnapshot(
        4,
        (
            ServerInfo("solo", 0, 1, 100.0),
            ServerInfo("x", 1, 3, 10.0),
            ServerInfo("y", 1, 3, 10.0),
        ),
    )
    assert should_move(snapshot, "solo") is None
    plan = plan_rebalance(snapshot)
    assert [m.peer_id for m in plan.moves] == ["x"]
    move = should_move(snapshot, "x")
    assert move is not None and move.span == (2, 4)


def test_a_move_waits_while_the_other_server_of_its_blocks_is_still_loading() -> None:
    snapshot = SwarmSnapshot(
        4,
        (
            ServerInfo("solo", 0, 1, 100.0),
            ServerInfo("x", 1, 3, 10.0),
            ServerInfo("y", 1, 3, 10.0, state=ServerState.JOINING),
        ),
    )
    assert [m.peer_id for m in plan_rebalance(snapshot).moves] == ["x"]
    assert should_move(snapshot, "x") is None
    online = snapshot.with_server(ServerInfo("y", 1, 3, 10.0))
    assert should_move(online, "x") is not None


def test_joining_servers_are_never_moved() -> None:
    snapshot = SwarmSnapshot(
        4,
        (
            ServerInfo("a", 0, 2, 10.0, state=ServerState.JOINING),
            ServerInfo("b", 0, 2, 10.0, state=ServerState.JOINING),
            ServerInfo("c", 2, 4, 1.0),
        ),
    )
    assert plan_rebalance(snapshot).moves == ()
    assert should_move(snapshot, "a") is None


def test_unknown_server_is_an_error() -> None:
    with pytest.raises(UnknownServer):
        should_move(SwarmSnapshot(2), "nobody")


def _random_swarm(rng: random.Random, n: int, count: int) -> SwarmSnapshot:
    servers = []
    for i in range(count):
        length = rng.randint(1, max(1, n // 2))
        start = rng.randint(0, n - length)
        servers.append(
            ServerInfo(
                f"s{i:03d}",
                start,
                start + length,
                rng.paretovariate(1.5),
                state=ServerState.JOINING if rng.random() < 0.1 else ServerState.ONLINE,
            )
        )
    return SwarmSnapshot(n, tuple(servers))


def test_plans_deliver_what_they_promise_and_never_uncover_a_block() -> None:
    rng = random.Random(17)
    settings = SchedulerSettings(quality_threshold=1.05)
    planned = 0
    for _ in range(150):
        snapshot = _random_swarm(rng, rng.randint(2, 16), rng.randint(2, 30))
        plan = plan_rebalance(snapshot, settings)
        assert plan.min_before == pytest.approx(snapshot.min_throughput(include_joining=True))
        # Sums are exact in 1/65536 steps of throughput: allow one step per server.
        assert plan.min_after <= plan.upper_bound + len(snapshot) / 65536
        if not plan.moves:
            assert plan.min_after == plan.min_before
            continue
        planned += 1
        assert plan.min_after > settings.quality_threshold * plan.min_before
        assert len({m.peer_id for m in plan.moves}) == len(plan.moves)
        covered = set(
            b
            for b in range(snapshot.num_blocks)
            if b not in snapshot.uncovered_blocks(include_joining=True)
        )
        state = snapshot
        for move in plan.moves:
            assert snapshot.server(move.peer_id).state is ServerState.ONLINE
            assert move.end - move.start == move.from_end - move.from_start
            state = _apply(state, move, ServerState.JOINING)
            still = set(range(state.num_blocks)) - set(state.uncovered_blocks(include_joining=True))
            assert covered <= still
        assert state.min_throughput(include_joining=True) == pytest.approx(plan.min_after)
    assert planned > 20


def test_every_server_reads_the_same_plan_whatever_order_it_got_announcements_in() -> None:
    rng = random.Random(8)
    for _ in range(30):
        snapshot = _random_swarm(rng, 12, 25)
        shuffled = list(snapshot.servers)
        rng.shuffle(shuffled)
        again = SwarmSnapshot(snapshot.num_blocks, tuple(shuffled))
        assert plan_rebalance(snapshot) == plan_rebalance(again)


def test_next_check_is_jittered_around_the_period() -> None:
    settings = SchedulerSettings(rebalance_period_s=100.0, rebalance_jitter=0.5)
    rng = random.Random(0)
    delays = [next_check_at(1000.0, rng, settings) - 1000.0 for _ in range(2000)]
    assert 50.0 <= min(delays) < 55.0 and 145.0 < max(delays) <= 150.0
    assert sum(delays) / len(delays) == pytest.approx(100.0, rel=0.03)
    fixed = SchedulerSettings(rebalance_period_s=100.0, rebalance_jitter=0.0)
    assert next_check_at(5.0, rng, fixed) == 105.0
