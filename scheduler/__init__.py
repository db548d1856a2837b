"""Pure scheduling decisions over a snapshot of a model's swarm: which blocks a server
takes, when it moves, which chain of servers a client uses.

Data in, decision out: no I/O, no clock (``now`` is an argument), randomness only from
a ``random.Random`` the caller passes. Imports without torch or numpy.

* Model: ``ServerInfo`` (peer id, span, throughput in block-tokens/s, state, cache room,
  quantization, dtype, measured RTTs, reputation), ``SwarmSnapshot``.
* Placement: ``choose_span`` (``join --blocks auto``), ``concurrent_view`` (two servers
  that chose at the same moment: the lower peer id keeps its choice).
* Rebalancing: ``should_move`` / ``plan_rebalance``, ``next_check_at``.
* Routing: ``route_min_latency`` (generation), ``route_for_throughput`` (batch work),
  ``replace_span`` (failover), ``Route`` / ``Hop``; each takes the caller's judgement of
  servers as data (``weights``, ``avoid``: what a client's reputation book says).
* Simulation: ``simulate_churn`` plays thousands of servers joining, leaving and
  rebalancing, with no network.
"""

import inspect

from ._errors import (
    InvalidSnapshot,
    MissingBlocksError,
    SchedulerConfigError,
    SchedulerError,
    UnknownServer,
)
from ._model import PeerKey, ServerInfo, ServerState, SwarmSnapshot, peer_order
from ._placement import choose_span, concurrent_view
from ._rebalance import MoveDecision, RebalancePlan, next_check_at, plan_rebalance, should_move
from ._routing import Hop, Route, replace_span, route_for_throughput, route_min_latency
from ._settings import DEFAULT_SETTINGS, SchedulerSettings
from ._sim import ChurnReport, ChurnScenario, simulate_churn

__all__ = [
    "DEFAULT_SETTINGS",
    "ChurnReport",
    "ChurnScenario",
    "Hop",
    "InvalidSnapshot",
    "MissingBlocksError",
    "MoveDecision",
    "PeerKey",
    "RebalancePlan",
    "Route",
    "SchedulerConfigError",
    "SchedulerError",
    "SchedulerSettings",
    "ServerInfo",
    "ServerState",
    "SwarmSnapshot",
    "UnknownServer",
    "choose_span",
    "concurrent_view",
    "next_check_at",
    "peer_order",
    "plan_rebalance",
    "replace_span",
    "route_for_throughput",
    "route_min_latency",
    "should_move",
    "simulate_churn",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
