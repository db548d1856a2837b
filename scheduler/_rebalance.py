"""When a server should move to other blocks (periodic rebalancing).

Every server checks now and then (``next_check_at``: a jittered period) and asks
``should_move(snapshot, me)``. All servers answer from the same deterministic plan:

1. ``plan_rebalance`` computes, from the snapshot alone, a greedy sequence of moves.
   Each step takes the weakest block (lowest index on ties), the neediest window of each
   span length that contains it (smallest sorted throughputs inside), and among the
   online servers not yet moved by this plan and not on that block, the one whose move
   leaves the changed blocks strongest (the least of: the blocks it leaves, minus its
   throughput; the blocks it joins, plus it). A move must lift every changed block above
   the current minimum, and may leave no block it drops without another server (joining
   servers count here: they will serve). Ties go to the move that changes fewer blocks,
   then to the lower peer id. The plan stops when no such move remains, or after
   ``SchedulerSettings.max_plan_moves`` moves.
2. The plan is carried out only if it raises the minimum per-block throughput by more
   than ``quality_threshold`` (1.15x by default), or covers a block nobody serves.
   A swarm whose mean per-block throughput (``SwarmSnapshot.upper_bound``) is already
   within the threshold of its minimum has no plan worth carrying out, and none is
   computed.
3. A server moves iff the plan moves it, and only while every block it drops has
   another *online* server right now: a server never uncovers a block, not even while
   others are still loading theirs (it waits for the next check).

Herds (several servers jumping into the same gap) are avoided by this deterministic
priority: every server runs the same plan on the same announcements, so a gap that one
server fills is given to exactly that server, and the others see it filled. A server
that moved announces itself as joining while it loads, which counts for placement, so
a later check, plan or join sees the gap as filled; a joining server is never picked to
move again before it is online. Servers whose views differ (announcements still in
flight) may disagree; the jitter of the checks spreads them out in time so that one's
move reaches the others' view before they check again.

A move returns the new span; the caller reloads only the blocks that change.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ._model import (
    PeerKey,
    THROUGHPUT_UNITS,
    ServerState,
    SwarmSnapshot,
    capacity_units,
    coverage,
    is_active,
    to_units,
)
from ._settings import DEFAULT_SETTINGS, SchedulerSettings


@dataclass(frozen=True, slots=True)
class MoveDecision:
    """Move ``peer_id`` from ``[from_start, from_end)`` to ``[start, end)``."""

    peer_id: PeerKey
    from_start: int
    from_end: int
    start: int
    end: int
    min_before: float
    """The swarm's minimum per-block throughput now (online and joining servers)."""
    min_after: float
    """The minimum once the whole plan this move belongs to is carried out."""

    @property
    def span(self) -> tuple[int, int]:
        """The new span."""
        return self.start, self.end

    @property
    def from_span(self) -> tuple[int, int]:
        """The span served before the move."""
        return self.from_start, self.from_end


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    """The moves the swarm should make, in order (empty when it is balanced enough)."""

    moves: tuple[MoveDecision, ...]
    min_before: float
    """The minimum per-block throughput now (online and joining servers)."""
    min_after: float
    """The minimum once every move is made (``min_before`` when there are none)."""
    upper_bound: float
    """``SwarmSnapshot.upper_bound()``: no placement has a higher minimum."""

    def decision_for(self, snapshot: SwarmSnapshot, peer_id: PeerKey) -> MoveDecision | None:
        """The move of ``peer_id`` in this plan, if it is safe in ``snapshot`` right now.

        ``snapshot`` must be the one the plan was computed from. The move is withheld
        (None) while a block it drops has no other online server.
        """
        me = snapshot.server(peer_id)
        move = next((m for m in self.moves if m.peer_id == peer_id), None)
        if move is None or me.state is not ServerState.ONLINE:
            return None
        dropped = [b for b in range(me.start, me.end) if not move.start <= b < move.end]
        for block in dropped:
            if not any(
                s.state is ServerState.ONLINE and s.covers(block) and s.peer_id != peer_id
                for s in snapshot.servers
            ):
                return None
        return move


def plan_rebalance(
    snapshot: SwarmSnapshot, settings: SchedulerSettings = DEFAULT_SETTINGS
) -> RebalancePlan:
    """The rebalancing plan of the swarm (see the module docstring for the rule)."""
    n = snapshot.num_blocks
    active = [s for s in snapshot.servers if is_active(s)]
    caps = capacity_units(n, active)
    counts = coverage(n, active)
    before = min(caps)
    bound = snapshot.upper_bound()
    idle = RebalancePlan((), before / THROUGHPUT_UNITS, before / THROUGHPUT_UNITS, bound)
    if not _worth(to_units(bound), before, settings.quality_threshold):
        return idle
    movers = sorted(
        _Mover(-t, rank, s.peer_id, s.start, s.length, t)
        for rank, s in enumerate(active)
        if s.state is ServerState.ONLINE and s.length < n and (t := to_units(s.throughput)) > 0
    )
    goal = settings.quality_threshold * before
    cap = to_units(bound)
    planned: list[tuple[_Mover, int]] = []
    while len(planned) < settings.max_plan_moves:
        low = min(caps)
        step = _best_move(
            caps,
            counts,
            movers,
            goal if low < goal else low,
            goal if low < goal else cap,
            settings.plan_candidates,
        )
        if step is None:
            break
        index, target = step
        mover = movers.pop(index)
        for block in range(mover.start, mover.start + mover.length):
            caps[block] -= mover.throughput
            counts[block] -= 1
        for block in range(target, target + mover.length):
            caps[block] += mover.throughput
            counts[block] += 1
        planned.append((mover, target))
    after = min(caps)
    if not _worth(after, before, settings.quality_threshold):
        return idle
    before_f, after_f = before / THROUGHPUT_UNITS, after / THROUGHPUT_UNITS
    moves = tuple(
        MoveDecision(
            m.peer_id, m.start, m.start + m.length, target, target + m.length, before_f, after_f
        )
        for m, target in planned
    )
    return RebalancePlan(moves, before_f, after_f, bound)


def should_move(
    snapshot: SwarmSnapshot, me: PeerKey, settings: SchedulerSettings = DEFAULT_SETTINGS
) -> MoveDecision | None:
    """Whether server ``me`` should move now, and where to; None to stay.

    ``plan_rebalance(snapshot, settings).decision_for(snapshot, me)``; raises
    ``UnknownServer`` if ``me`` is not in the snapshot.
    """
    snapshot.server(me)
    return plan_rebalance(snapshot, settings).decision_for(snapshot, me)


def next_check_at(
    now: float, rng: random.Random, settings: SchedulerSettings = DEFAULT_SETTINGS
) -> float:
    """When to run the next rebalancing check: ``now`` plus a jittered period."""
    spread = settings.rebalance_jitter * (2.0 * rng.random() - 1.0)
    return now + settings.rebalance_period_s * (1.0 + spread)


def _worth(after: int, before: int, threshold: float) -> bool:
    """Whether going from a minimum of ``before`` to ``after`` beats the threshold."""
    if before <= 0.0:
        return after > 0.0
    return after > threshold * before


def _neediest_start(sums: Sequence[int], length: int, block: int) -> int:
    """Start of the window of ``length`` blocks holding ``block`` with the least total
    throughput (``sums`` are prefix sums of the per-block throughputs)."""
    first = max(0, block - length + 1)
    last = min(block, len(sums) - 1 - length)
    return min(range(first, last + 1), key=lambda w: (sums[w + length] - sums[w], w))


_INF = math.inf


class _Mover(NamedTuple):
    """An online server the plan may move; sorts by throughput, largest first."""

    neg_throughput: int
    rank: int
    peer_id: PeerKey
    start: int
    length: int
    throughput: int


def _best_move(
    caps: list[int],
    counts: list[int],
    movers: list[_Mover],
    floor: float,
    cap: float,
    candidates: int,
) -> tuple[int, int] | None:
    """The greedy step: (index in ``movers``, new start), or None when nothing helps.

    A server of throughput ``t`` moves into a window that holds the weakest block
    (``low``); it qualifies if every block it drops keeps more than ``floor`` (``>= low``),
    and, if so, lifts the blocks it changes to ``min(lost - t, low + t)``, where ``lost``
    is the weakest block it drops. Moves rank by the swarm's minimum after them, then by
    that lift (capped at ``cap``), then by fewer blocks changed, smaller throughput and
    lower peer id. Two windows are tried per server: the smallest shift of its span that
    reaches the weakest block (it drops the fewest blocks) and the neediest window of its
    length around that block (the least total throughput). As ``lost - t`` is at most
    ``max(caps) - t``, ``movers`` (largest throughput first) is scanned from the first
    server with ``t < max(caps) - floor``, and the scan stops once ``low + t`` cannot beat
    the best move found.
    """
    n = len(caps)
    low = min(caps)
    weakest = caps.index(low)
    first = bisect.bisect_right(movers, floor - max(caps), key=lambda m: m.neg_throughput)
    if first == len(movers):
        return None
    # A block at or under ``floor + t`` of the slowest mover can be dropped by no one.
    blocked = [0, *itertools.accumulate(c <= floor + movers[-1].throughput for c in caps)]
    sums = [0, *itertools.accumulate(caps)]
    prefix = [*itertools.accumulate(caps, min, initial=_INF)]
    suffix = [*reversed([*itertools.accumulate(reversed(caps), min, initial=_INF)])]
    needy: dict[int, int] = {}
    dropped: dict[tuple[int, int], int | None] = {}
    best: tuple[int, int] | None = None
    best_key: tuple[float, float, int, int, int] = (low, low, 0, 0, 0)
    considered = 0
    for index in range(first, len(movers)):
        _, rank, _, start, length, throughput = movers[index]
        if low + throughput < best_key[0] or considered >= candidates:
            break
        end = start + length
        if start <= weakest < end:
            continue
        target = needy.get(length)
        if target is None:
            target = needy[length] = _neediest_start(sums, length, weakest)
        shift = weakest - length + 1 if weakest >= end else weakest
        shift = min(max(shift, 0), n - length)
        for candidate in (target,) if shift == target else (target, shift):
            if candidate > start:
                lose_lo, lose_hi = start, min(end, candidate)
                gain_lo, gain_hi = max(candidate, end), candidate + length
                outside = min(prefix[lose_lo], suffix[gain_hi], *caps[lose_hi:gain_lo])
            else:
                lose_lo, lose_hi = max(start, candidate + length), end
                gain_lo, gain_hi = candidate, min(candidate + length, start)
                outside = min(prefix[gain_lo], suffix[lose_hi], *caps[gain_hi:lose_lo])
            lose = (lose_lo, lose_hi)
            if lose in dropped:
                weakest_lost = dropped[lose]
            else:
                weakest_lost = dropped[lose] = (
                    min(caps[lose_lo:lose_hi])
                    if blocked[lose_hi] == blocked[lose_lo] and min(counts[lose_lo:lose_hi]) >= 2
                    else None
                )
            if weakest_lost is None or weakest_lost - throughput <= floor:
                continue
            considered += 1
            lift = min(weakest_lost - throughput, low + throughput)
            key = (min(lift, outside), min(lift, cap), lose_lo - lose_hi, -throughput, -rank)
            if key > best_key:
                best, best_key = (index, candidate), key
    return best
