"""Thousands of servers joining, leaving and rebalancing, with no network.

The bound is ``SwarmSnapshot.upper_bound()``: every block needs the minimum ``z``, and
a server gives at most ``min(throughput, z)`` to each block of its span, so
``num_blocks * z <= sum(length * min(throughput, z))``; with no server alone above the
mean, that is the mean per-block throughput, which no placement can beat.
"""

from __future__ import annotations

import pytest

from scheduler import ChurnScenario, SchedulerSettings, simulate_churn


@pytest.mark.timeout(300)
def test_a_thousand_heavy_tailed_servers_end_within_ten_percent_of_the_bound() -> None:
    # 1,000 servers, 80 blocks, spans of 8-24 blocks, Pareto(2) throughputs, random join
    # order; 20% leave at random; the survivors rebalance (default settings).
    report = simulate_churn(ChurnScenario())
    assert report.servers_left == 800
    assert report.min_throughput_vs_bound >= 0.9
    assert report.max_moves <= 3
    assert report.min_throughput >= report.min_after_leaves
    assert report.checks > 5 * report.scenario.num_servers


@pytest.mark.timeout(120)
def test_rebalancing_repairs_what_random_departures_break() -> None:
    scenario = ChurnScenario(num_servers=300, pareto_alpha=1.5, seed=1)
    report = simulate_churn(scenario)
    assert report.min_after_leaves / report.bound_after_leaves < 0.85
    assert report.min_throughput_vs_bound >= 0.9
    assert report.max_moves <= 3
    still = simulate_churn(
        ChurnScenario(
            num_servers=300,
            pareto_alpha=1.5,
            seed=1,
            settings=SchedulerSettings(quality_threshold=1e9),
        )
    )
    assert sum(still.moves) == 0
    assert still.min_throughput_vs_bound < 0.85


@pytest.mark.timeout(60)
def test_a_scenario_replays_identically() -> None:
    scenario = ChurnScenario(num_servers=120, num_blocks=24, min_span=3, max_span=9, seed=4)
    assert simulate_churn(scenario) == simulate_churn(scenario)
