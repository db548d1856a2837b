"""A swarm of thousands of servers joining, leaving and rebalancing, in one process.

``simulate_churn`` plays a ``ChurnScenario`` on a virtual clock with the scheduler's own
functions and nothing else: each server joins at a random time and takes
``choose_span`` of the swarm it sees; it announces itself as joining while it loads
(``load_s_per_block`` per new block), then online; it checks ``should_move`` at
``next_check_at`` times (jittered periods); a share of the servers then leaves at
random times, and the survivors rebalance until the end. Every server sees the current
announcements. The report gives the minimum per-block throughput at the end against
``SwarmSnapshot.upper_bound()`` and the moves each server made.

Throughputs are Pareto distributed (heavy tailed: with the default ``pareto_alpha=2``,
of infinite variance, the fastest of 1,000 servers is about 30 times the slowest); span
lengths are uniform in ``[min_span, max_span]``. Everything is drawn from
``random.Random(seed)``.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from dataclasses import dataclass, replace

from ._errors import SchedulerConfigError
from ._model import PeerKey, ServerInfo, ServerState, SwarmSnapshot
from ._placement import choose_span
from ._rebalance import RebalancePlan, next_check_at, plan_rebalance
from ._settings import DEFAULT_SETTINGS, SchedulerSettings


@dataclass(frozen=True, slots=True)
class ChurnScenario:
    """What ``simulate_churn`` plays (times in virtual seconds)."""

    num_servers: int = 1000
    num_blocks: int = 80
    min_span: int = 8
    max_span: int = 24
    pareto_alpha: float = 2.0
    """Tail index of the throughput distribution (smaller: heavier tail)."""
    min_throughput: float = 10.0
    """Scale of the Pareto distribution: the smallest throughput drawn."""
    leave_fraction: float = 0.2
    join_window_s: float = 300.0
    """Joins are spread uniformly over ``[0, join_window_s)``."""
    leave_at_s: float = 1800.0
    leave_window_s: float = 60.0
    """Leaves are spread uniformly over ``[leave_at_s, leave_at_s + leave_window_s)``."""
    settle_s: float = 1800.0
    """How long the survivors rebalance after the last leave."""
    load_s_per_block: float = 3.0
    seed: int = 0
    settings: SchedulerSettings = DEFAULT_SETTINGS

    def __post_init__(self) -> None:
        if self.num_servers < 1 or self.num_blocks < 1:
            raise SchedulerConfigError("a scenario needs at least one server and one block")
        if not 1 <= self.min_span <= self.max_span:
            raise SchedulerConfigError(
                f"span lengths [{self.min_span}, {self.max_span}] need 1 <= min <= max"
            )
        if not 0.0 <= self.leave_fraction < 1.0:
            raise SchedulerConfigError(f"leave_fraction={self.leave_fraction} must be in [0, 1)")
        if self.leave_at_s < self.join_window_s:
            raise SchedulerConfigError("leaves must start after the last join")


@dataclass(frozen=True, slots=True)
class ChurnReport:
    """What happened in a ``simulate_churn`` run."""

    scenario: ChurnScenario
    servers_left: int
    min_throughput: float
    """The minimum per-block throughput at the end (online servers)."""
    upper_bound: float
    """``SwarmSnapshot.upper_bound()`` of the servers left at the end."""
    min_after_joins: float
    """The minimum when the last join has loaded, before anyone has left."""
    bound_after_joins: float
    min_after_leaves: float
    """The minimum just after the last leave, before the survivors rebalance."""
    bound_after_leaves: float
    moves: tuple[int, ...]
    """Moves made by each server that joined, in join order (leavers included)."""
    checks: int
    """``should_move`` questions asked."""

    @property
    def min_throughput_vs_bound(self) -> float:
        return self.min_throughput / self.upper_bound

    @property
    def max_moves(self) -> int:
        return max(self.moves)

    @property
    def mean_moves(self) -> float:
        return statistics.fmean(self.moves)


_JOIN, _ONLINE, _CHECK, _LEAVE = 0, 1, 2, 3


def simulate_churn(scenario: ChurnScenario) -> ChurnReport:
    """Play ``scenario`` and report placement quality and moves."""
    return _Run(scenario).play()


class _Run:
    """One play of a scenario: a heap of (time, sequence, kind, server) events.

    A rebalancing plan is computed once per distinct snapshot: every check on the same
    announcements gets the same plan, and ``plan.decision_for(snapshot, me)`` is what
    ``should_move(snapshot, me)`` answers.
    """

    def __init__(self, scenario: ChurnScenario) -> None:
        self.sc = scenario
        self.rng = random.Random(scenario.seed)
        rng = self.rng
        self.peers: list[PeerKey] = [rng.randbytes(8).hex() for _ in range(scenario.num_servers)]
        self.throughputs = [
            scenario.min_throughput * rng.paretovariate(scenario.pareto_alpha) for _ in self.peers
        ]
        self.lengths = [rng.randint(scenario.min_span, scenario.max_span) for _ in self.peers]
        self.moves = [0] * scenario.num_servers
        self.snapshot = SwarmSnapshot(scenario.num_blocks)
        self.version = 0
        self.plan: tuple[int, RebalancePlan] | None = None
        self.events: list[tuple[float, int, int, int]] = []
        self.sequence = itertools.count()
        self.checks = 0

    def push(self, time: float, kind: int, server: int) -> None:
        heapq.heappush(self.events, (time, next(self.sequence), kind, server))

    def update(self, snapshot: SwarmSnapshot) -> None:
        self.snapshot = snapshot
        self.version += 1

    def play(self) -> ChurnReport:
        sc = self.sc
        for index in range(sc.num_servers):
            self.push(self.rng.uniform(0.0, sc.join_window_s), _JOIN, index)
        leavers = self.rng.sample(range(sc.num_servers), round(sc.leave_fraction * sc.num_servers))
        for index in leavers:
            self.push(sc.leave_at_s + self.rng.uniform(0.0, sc.leave_window_s), _LEAVE, index)
        end = sc.leave_at_s + sc.leave_window_s + sc.settle_s
        after_joins = after_leaves = self.measure()
        leaves_left = len(leavers)
        joined = False
        while self.events and self.events[0][0] < end:
            now, _, kind, index = heapq.heappop(self.events)
            if not joined and now >= sc.leave_at_s:
                after_joins, joined = self.measure(), True
            if kind == _JOIN:
                self.join(now, index)
            elif kind == _ONLINE:
                peer = self.peers[index]
                if peer in self.snapshot:
                    online = replace(self.snapshot.server(peer), state=ServerState.ONLINE)
                    self.update(self.snapshot.with_server(online))
            elif kind == _CHECK:
                self.check(now, index)
            else:
                self.update(self.snapshot.without(self.peers[index]))
                leaves_left -= 1
                if leaves_left == 0:
                    after_leaves = self.measure()
        return ChurnReport(
            scenario=sc,
            servers_left=len(self.snapshot),
            min_throughput=self.snapshot.min_throughput(),
            upper_bound=self.snapshot.upper_bound(),
            min_after_joins=after_joins[0],
            bound_after_joins=after_joins[1],
            min_after_leaves=after_leaves[0],
            bound_after_leaves=after_leaves[1],
            moves=tuple(self.moves),
            checks=self.checks,
        )

    def measure(self) -> tuple[float, float]:
        return self.snapshot.min_throughput(include_joining=True), self.snapshot.upper_bound()

    def join(self, now: float, index: int) -> None:
        start, end = choose_span(self.snapshot, self.lengths[index], self.throughputs[index])
        info = ServerInfo(
            self.peers[index], start, end, self.throughputs[index], ServerState.JOINING
        )
        self.update(self.snapshot.with_server(info))
        self.push(now + self.sc.load_s_per_block * (end - start), _ONLINE, index)
        self.push(next_check_at(now, self.rng, self.sc.settings), _CHECK, index)

    def check(self, now: float, index: int) -> None:
        peer = self.peers[index]
        if peer not in self.snapshot:
            return
        self.checks += 1
        if self.plan is None or self.plan[0] != self.version:
            self.plan = (self.version, plan_rebalance(self.snapshot, self.sc.settings))
        move = self.plan[1].decision_for(self.snapshot, peer)
        if move is not None:
            self.moves[index] += 1
            kept = max(0, min(move.from_end, move.end) - max(move.from_start, move.start))
            info = replace(
                self.snapshot.server(peer),
                start=move.start,
                end=move.end,
                state=ServerState.JOINING,
            )
            self.update(self.snapshot.with_server(info))
            loaded = move.end - move.start - kept
            self.push(now + self.sc.load_s_per_block * loaded, _ONLINE, index)
        self.push(next_check_at(now, self.rng, self.sc.settings), _CHECK, index)
