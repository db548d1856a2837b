"""choose_span: the span that lifts the weakest blocks the most, ties broken the same way."""

from __future__ import annotations

import random

import pytest

from scheduler import (
    SchedulerConfigError,
    ServerInfo,
    ServerState,
    SwarmSnapshot,
    choose_span,
    concurrent_view,
)


def _snapshot(n: int, *spans: tuple[int, int, float]) -> SwarmSnapshot:
    return SwarmSnapshot(
        n, tuple(ServerInfo(f"s{i}", a, b, t) for i, (a, b, t) in enumerate(spans))
    )


def test_an_empty_swarm_is_filled_from_block_zero() -> None:
    assert choose_span(SwarmSnapshot(10), 4, 100.0) == (0, 4)


def test_a_server_able_to_hold_everything_takes_everything() -> None:
    assert choose_span(_snapshot(6, (0, 3, 1.0)), 6, 5.0) == (0, 6)
    assert choose_span(_snapshot(6, (0, 3, 1.0)), 60, 5.0) == (0, 6)


def test_the_uncovered_blocks_are_taken_first() -> None:
    snapshot = _snapshot(12, (0, 4, 10.0), (4, 8, 10.0))
    assert choose_span(snapshot, 4, 1.0) == (8, 12)
    # Too short to cover the whole gap: any window inside it is as good, the lowest wins.
    assert choose_span(snapshot, 2, 1.0) == (8, 10)


def test_the_weakest_region_is_lifted_not_the_lowest_start() -> None:
    snapshot = _snapshot(9, (0, 3, 30.0), (3, 6, 5.0), (6, 9, 20.0))
    assert choose_span(snapshot, 3, 10.0) == (3, 6)


def test_between_two_equally_weak_blocks_the_next_weakest_decides() -> None:
    # Blocks 0 and 7 are the weakest (1.0); the window over 0 also lifts block 1 (2.0),
    # the window over 7 only blocks at 9.0: leximin prefers lifting 0 and 1.
    snapshot = _snapshot(8, (0, 1, 1.0), (1, 2, 2.0), (2, 7, 9.0), (7, 8, 1.0))
    assert choose_span(snapshot, 2, 4.0) == (0, 2)


def test_joining_servers_count_so_two_joiners_do_not_pick_the_same_gap() -> None:
    snapshot = _snapshot(8, (0, 4, 10.0))
    first = choose_span(snapshot, 4, 10.0)
    assert first == (4, 8)
    joined = snapshot.with_server(ServerInfo("new", *first, 10.0, state=ServerState.JOINING))
    assert choose_span(joined, 4, 10.0) == (0, 4)
    offline = snapshot.with_server(ServerInfo("gone", 4, 8, 10.0, state=ServerState.OFFLINE))
    assert choose_span(offline, 4, 10.0) == (4, 8)


def test_ties_go_to_the_lowest_start() -> None:
    snapshot = _snapshot(6, (0, 6, 10.0))
    assert choose_span(snapshot, 2, 3.0) == (0, 2)


def test_unknown_throughput_still_takes_the_neediest_window() -> None:
    snapshot = _snapshot(6, (0, 2, 10.0), (2, 4, 3.0), (4, 6, 10.0))
    assert choose_span(snapshot, 2, 0.0) == (2, 4)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(SchedulerConfigError, match="num_blocks_to_serve"):
        choose_span(SwarmSnapshot(4), 0, 1.0)
    with pytest.raises(SchedulerConfigError, match="throughput"):
        choose_span(SwarmSnapshot(4), 2, -1.0)


def _leximin_brute(snapshot: SwarmSnapshot, length: int, throughput: float) -> list[int]:
    """Every start whose resulting sorted per-block throughputs are the largest."""
    base = snapshot.block_throughputs(include_joining=True)
    n = snapshot.num_blocks
    keys = {}
    for start in range(n - length + 1):
        after = [
            c + (throughput if start <= b < start + length else 0.0) for b, c in enumerate(base)
        ]
        keys[start] = sorted(after)
    best = max(keys.values())
    return [s for s, key in keys.items() if key == pytest.approx(best, abs=1e-6)]


def test_choice_is_leximin_optimal_on_random_small_swarms() -> None:
    rng = random.Random(2024)
    for _ in range(400):
        n = rng.randint(1, 10)
        spans = []
        for _ in range(rng.randint(0, 6)):
            a = rng.randrange(n)
            spans.append((a, rng.randint(a + 1, n), float(rng.choice([1, 2, 3, 5, 8]))))
        snapshot = _snapshot(n, *spans)
        length = rng.randint(1, n)
        throughput = float(rng.choice([1, 2, 4, 10]))
        start, end = choose_span(snapshot, length, throughput)
        assert end - start == length
        assert start in _leximin_brute(snapshot, length, throughput)
        new_min = snapshot.with_server(ServerInfo("me", start, end, throughput)).min_throughput()
        for other in range(n - length + 1):
            placed = snapshot.with_server(ServerInfo("me", other, other + length, throughput))
            assert placed.min_throughput() <= new_min + 1e-9


def test_of_servers_choosing_at_once_the_lowest_peer_id_keeps_the_gap() -> None:
    """Several joiners read the same swarm, all take its gap, then judge their choice in
    ``concurrent_view``: exactly one keeps it, the others choose again, seeing it."""
    base = (ServerInfo("old", 0, 8, 10.0), ServerInfo("mid", 4, 8, 10.0))
    earlier = SwarmSnapshot(8, base)
    gap = choose_span(earlier, 4, 20.0)
    assert gap == (0, 4)
    joiners = ["j1", "j3", "j2"]
    now = SwarmSnapshot(
        8, (*base, *(ServerInfo(j, *gap, 20.0, ServerState.JOINING) for j in joiners))
    )
    chosen = {
        me: choose_span(concurrent_view(now, earlier, me).without(me), 4, 20.0) for me in joiners
    }
    assert chosen == {"j1": (0, 4), "j2": (4, 8), "j3": (4, 8)}
    # Servers that did not change since the choice always count, whatever their peer id.
    view = concurrent_view(now, earlier, "a")
    assert {s.peer_id for s in view} == {"old", "mid"}
    # One that moved is shown where it was if it ranks after me, where it is otherwise.
    moved = now.with_server(ServerInfo("mid", 0, 4, 10.0, ServerState.JOINING))
    assert concurrent_view(moved, earlier, "a").server("mid").start == 4
    assert concurrent_view(moved, earlier, "z").server("mid").start == 0
    # Me as I am now; servers gone since are gone.
    mine = concurrent_view(now.without("old"), earlier, "j3")
    assert "old" not in mine and mine.server("j3").state is ServerState.JOINING
