"""Placement benchmark: thousands of servers join, leave and rebalance (no network).

Usage::

    .venv/bin/python benchmarks/placement.py [--quick] [--seeds N]

Each scenario is played by ``scheduler.simulate_churn``: servers with Pareto-distributed
throughputs (heavy tailed) and spans of 8-24 of 80 blocks join in random order within
5 minutes, each taking ``choose_span`` of the swarm it sees; every server checks
``should_move`` every 5 minutes (jittered by half); 20% of the servers leave at random
within a minute, 30 minutes later; the survivors rebalance for 30 minutes more.

The quality figure is the minimum per-block throughput against
``SwarmSnapshot.upper_bound()``: each block needs the minimum ``z`` and a server gives
at most ``min(throughput, z)`` to each block of its span, so
``num_blocks * z <= sum(length * min(throughput, z))``. That is the mean per-block
throughput unless one server alone exceeds it, and no placement beats it.

Baseline, in the same run: the same scenario with rebalancing switched off
(``quality_threshold=1e9``): placement at join only. Rows: min/bound when the joins are
done, just after the leaves, and at the end; moves per server over the whole scenario;
CPU seconds of the run. The LAST line is one JSON object: the default scenario's figures
(``min_throughput_vs_bound``, ``moves_per_server``) and every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler import ChurnReport, ChurnScenario, SchedulerSettings, simulate_churn  # noqa: E402

NO_REBALANCING = SchedulerSettings(quality_threshold=1e9)


def scenarios(quick: bool) -> list[tuple[str, ChurnScenario]]:
    default = ChurnScenario()
    found = [
        ("1k, Pareto(2)", default),
        ("1k, Pareto(1.5)", replace(default, pareto_alpha=1.5)),
        ("300, Pareto(1.5)", replace(default, num_servers=300, pareto_alpha=1.5)),
        ("1k, 40% leave", replace(default, leave_fraction=0.4)),
    ]
    if not quick:
        found.append(("2k, Pareto(2)", replace(default, num_servers=2000)))
    return found


def play(scenario: ChurnScenario) -> tuple[ChurnReport, float]:
    started = time.process_time()
    report = simulate_churn(scenario)
    return report, time.process_time() - started


def row(name: str, rebalancing: bool, report: ChurnReport, cpu_s: float) -> dict[str, object]:
    return {
        "scenario": name,
        "servers": report.scenario.num_servers,
        "pareto_alpha": report.scenario.pareto_alpha,
        "leave_fraction": report.scenario.leave_fraction,
        "seed": report.scenario.seed,
        "rebalancing": rebalancing,
        "after_joins_vs_bound": round(report.min_after_joins / report.bound_after_joins, 4),
        "after_leaves_vs_bound": round(report.min_after_leaves / report.bound_after_leaves, 4),
        "min_throughput_vs_bound": round(report.min_throughput_vs_bound, 4),
        "moves_per_server": {"max": report.max_moves, "mean": round(report.mean_moves, 4)},
        "checks": report.checks,
        "cpu_s": round(cpu_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 2,000-server scenario")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per scenario (0, 1, ...)")
    args = parser.parse_args()

    runs: list[dict[str, object]] = []
    header = (
        f"{'scenario':<18} {'seed':>4} {'rebalance':>9} {'joins':>6} {'leaves':>6} "
        f"{'final':>6} {'moves max':>9} {'mean':>6} {'checks':>7} {'cpu s':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, base in scenarios(args.quick):
        for seed in range(args.seeds):
            for rebalancing in (True, False):
                scenario = replace(base, seed=seed)
                if not rebalancing:
                    scenario = replace(scenario, settings=NO_REBALANCING)
                report, cpu_s = play(scenario)
                result = row(name, rebalancing, report, cpu_s)
                runs.append(result)
                moves = result["moves_per_server"]
                assert isinstance(moves, dict)
                print(
                    f"{name:<18} {seed:>4} {'on' if rebalancing else 'off':>9} "
                    f"{result['after_joins_vs_bound']:>6.3f} "
                    f"{result['after_leaves_vs_bound']:>6.3f} "
                    f"{result['min_throughput_vs_bound']:>6.3f} {moves['max']:>9} "
                    f"{moves['mean']:>6.3f} {result['checks']:>7} {cpu_s:>6.1f}",
                    flush=True,
                )
    print()
    print("joins/leaves/final: minimum per-block throughput / upper bound (higher is better);")
    print("moves: per server over the whole scenario (lower is better); off = baseline.")
    headline = next(r for r in runs if r["scenario"] == "1k, Pareto(2)" and r["rebalancing"])
    baseline = next(r for r in runs if r["scenario"] == "1k, Pareto(2)" and not r["rebalancing"])
    summary = {
        "benchmark": "placement",
        "scenario": "1k, Pareto(2)",
        "min_throughput_vs_bound": headline["min_throughput_vs_bound"],
        "moves_per_server": headline["moves_per_server"],
        "baseline_without_rebalancing_min_throughput_vs_bound": baseline["min_throughput_vs_bound"],
        "runs": runs,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
