"""Every knob of the scheduler, as data (STYLE.md rule 4).

Change a value with ``dataclasses.replace``; tests pass their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._errors import SchedulerConfigError


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Thresholds and defaults of placement, rebalancing and routing."""

    quality_threshold: float = 1.05
    """A rebalance happens only if it would raise the swarm's minimum per-block
    throughput by more than this factor (1.05: by more than 5%). A swarm thus settles
    within this factor of what rebalancing could reach: keep it well under the quality
    you want (docs/benchmarks.md, "Placement")."""
    max_plan_moves: int = 256
    """Most servers one rebalancing plan moves; a longer plan waits for the next round."""
    plan_candidates: int = 32
    """Moves a plan's greedy step weighs: those of the fastest servers that may move
    (bounds a step's cost in swarms of thousands)."""
    rebalance_period_s: float = 300.0
    """Mean time between two rebalancing checks of one server."""
    rebalance_jitter: float = 0.5
    """Each period is drawn uniformly in ``period * (1 ± jitter)``, so that servers that
    started together do not check together."""
    default_rtt_s: float = 0.1
    """Round trip assumed between two parties that have not measured theirs."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.quality_threshold) and self.quality_threshold >= 1.0):
            raise SchedulerConfigError(
                f"SchedulerSettings.quality_threshold={self.quality_threshold} must be >= 1.0"
            )
        if self.max_plan_moves < 0:
            raise SchedulerConfigError(
                f"SchedulerSettings.max_plan_moves={self.max_plan_moves} must be >= 0"
            )
        if self.plan_candidates < 1:
            raise SchedulerConfigError(
                f"SchedulerSettings.plan_candidates={self.plan_candidates} must be >= 1"
            )
        if not (math.isfinite(self.rebalance_period_s) and self.rebalance_period_s > 0):
            raise SchedulerConfigError(
                f"SchedulerSettings.rebalance_period_s={self.rebalance_period_s} must be > 0"
            )
        if not 0.0 <= self.rebalance_jitter < 1.0:
            raise SchedulerConfigError(
                f"SchedulerSettings.rebalance_jitter={self.rebalance_jitter} must be in [0, 1)"
            )
        if not (math.isfinite(self.default_rtt_s) and self.default_rtt_s >= 0):
            raise SchedulerConfigError(
                f"SchedulerSettings.default_rtt_s={self.default_rtt_s} must be >= 0"
            )


DEFAULT_SETTINGS = SchedulerSettings()
