"""When a server should move to other blocks (periodic rebalancing).

Every server checks now and then (``next_check_at``: a jittered period) and asks
``should_move(snapshot, me)``. All servers answer from the same deterministic plan:

1. ``plan_rebalance`` computes, from the snapshot alone, a greedy sequence of moves,
   each of an online server not yet moved by this plan. A step takes the weakest block
   (lowest index on ties) and tries, per server not on it, two windows of that server's
   length holding it: the smallest shift of its span (fewest blocks to reload) and the
   neediest window (least total throughput). A move qualifies if every block it drops
   keeps more than a floor: the goal ``quality_threshold * minimum now`` while some
   block is under it, then the current minimum; so a dropped block always keeps
   another server with throughput (joining servers count: they will serve). Among
   qualifying moves (those of the ``SchedulerSettings.plan_candidates`` fastest servers
   that have one), the step takes the one that leaves the highest swarm minimum, then
   lifts its blocks the most, then changes fewer blocks, then moves the slower server,
   then the lower peer id. The plan stops when no move qualifies, or after
   ``max_plan_moves`` moves.
2. The plan is carried out only if it raises the minimum per-block throughput (online
   and joining servers) by more than ``quality_threshold`` (1.05x by default), or covers
   a block nobody serves. A swarm whose ``SwarmSnapshot.upper_bound`` is within the
   threshold of its minimum has no plan worth carrying out, and none is computed.
   As plans are re-computed after every move, a rebalance stops once what is left of it
   gains less than the threshold: the swarm settles within that factor of what the
   plan reaches.
3. A server moves iff the plan moves it, and only while every block it drops has
   another *online* server right now: a server never uncovers a block, not even while
   others are still loading theirs (it waits for the next check).

Herds (several servers jumping into the same gap) are avoided by deterministic
priority: every server runs the same plan on the same announcements (sums are exact
integers of throughput steps, the same in any order), so a gap that one server fills is
given to exactly that server, and the plan's later moves already count on it. A server
that moved announces itself as joining while it loads, which counts for placement, so
later checks, plans and joins see the gap as filled; a joining server is never picked
to move before it is online. Servers whose views differ (announcements still in flight)
may disagree; the jitter of the checks spreads them out in time so that one's move
reaches the others' view before they check again.

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
    THROUGHPUT_UNITS,
    PeerKey,
    ServerState,
    SwarmSnapshot,
    capacity_units,
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
        for block in range(target, target + mover.length):
            caps[block] += mover.throughput
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
    movers: list[_Mover],
    floor: float,
    cap: float,
    candidates: int,
) -> tuple[int, int] | None:
    """The greedy step: (index in ``movers``, new start), or None when nothing helps.

    A server of throughput ``t`` moving into a window that holds the weakest block
    (``low``) lifts the blocks it changes to ``min(lost - t, low + t)``, where ``lost`` is
    the weakest block it drops; it qualifies if ``lost - t > floor``. Keys: the swarm's
    minimum after the move, that lift (capped at ``cap``), fewer blocks changed, smaller
    throughput, lower peer id. As ``lost - t`` is at most ``max(caps) - t``, ``movers``
    (largest throughput first) is scanned from the first server with
    ``t < max(caps) - floor``; the scan stops once ``low + t`` cannot beat the best move
    found, or once ``candidates`` qualifying moves have been weighed.
    """
    low = min(caps)
    first = bisect.bisect_right(movers, floor - max(caps), key=lambda m: m.neg_throughput)
    if first == len(movers):
        return None
    step = _Step(caps, floor + movers[-1].throughput)
    options: dict[tuple[int, int], tuple[tuple[int, int, int, int], ...]] = {}
    best: tuple[int, int] | None = None
    best_key: tuple[float, float, int, int, int] = (low, low, 0, 0, 0)
    considered = 0
    for index in range(first, len(movers)):
        _, rank, _, start, length, throughput = movers[index]
        if low + throughput < best_key[0] or considered >= candidates:
            break
        group = options.get((start, length))
        if group is None:
            group = options[start, length] = step.options(start, length)
        for target, changed, lost, outside in group:
            if lost - throughput <= floor:
                continue
            considered += 1
            lift = min(lost - throughput, low + throughput)
            key = (min(lift, outside), min(lift, cap), -changed, -throughput, -rank)
            if key > best_key:
                best, best_key = (index, target), key
    return best


class _Step:
    """The per-block figures one greedy step reads, and the moves open to a span."""

    def __init__(self, caps: list[int], blocked_at: float) -> None:
        self.caps = caps
        self.low = min(caps)
        self.weakest = caps.index(self.low)
        # A block at or under ``floor + t`` of the slowest mover can be dropped by no one.
        self.blocked = [0, *itertools.accumulate(c <= blocked_at for c in caps)]
        self.sums = [0, *itertools.accumulate(caps)]
        self.prefix = [*itertools.accumulate(caps, min, initial=_INF)]
        self.suffix = [*reversed([*itertools.accumulate(reversed(caps), min, initial=_INF)])]
        self.needy: dict[int, int] = {}

    def options(self, start: int, length: int) -> tuple[tuple[int, int, int, int], ...]:
        """``(new start, blocks dropped, weakest block dropped, weakest block unchanged)``
        for each window a server on ``[start, start + length)`` may move to."""
        caps, weakest, n = self.caps, self.weakest, len(self.caps)
        end = start + length
        if start <= weakest < end:
            return ()
        needy = self.needy.get(length)
        if needy is None:
            needy = self.needy[length] = _neediest_start(self.sums, length, weakest)
        shift = min(max(weakest - length + 1 if weakest >= end else weakest, 0), n - length)
        found = []
        for target in (needy,) if shift == needy else (needy, shift):
            if target > start:
                lose_lo, lose_hi = start, min(end, target)
            else:
                lose_lo, lose_hi = max(start, target + length), end
            if self.blocked[lose_hi] != self.blocked[lose_lo]:
                continue
            if target > start:
                gain_lo, gain_hi = max(target, end), target + length
                outside = min(self.prefix[lose_lo], self.suffix[gain_hi], *caps[lose_hi:gain_lo])
            else:
                gain_lo, gain_hi = target, min(target + length, start)
                outside = min(self.prefix[gain_lo], self.suffix[lose_hi], *caps[gain_hi:lose_lo])
            found.append((target, lose_hi - lose_lo, min(caps[lose_lo:lose_hi]), outside))
        return tuple(found)
