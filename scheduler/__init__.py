"""Pure scheduling decisions over a snapshot of a model's swarm."""

import inspect

from ._errors import (
    InvalidSnapshot,
    MissingBlocksError,
    SchedulerConfigError,
    SchedulerError,
    UnknownServer,
)
from ._model import PeerKey, ServerInfo, ServerState, SwarmSnapshot, peer_order
from ._placement import choose_span
from ._rebalance import MoveDecision, RebalancePlan, next_check_at, plan_rebalance, should_move
from ._settings import DEFAULT_SETTINGS, SchedulerSettings
from ._sim import ChurnReport, ChurnScenario, simulate_churn

__all__ = [
    "DEFAULT_SETTINGS",
    "ChurnReport",
    "ChurnScenario",
    "InvalidSnapshot",
    "MissingBlocksError",
    "MoveDecision",
    "PeerKey",
    "RebalancePlan",
    "SchedulerConfigError",
    "SchedulerError",
    "SchedulerSettings",
    "ServerInfo",
    "ServerState",
    "SwarmSnapshot",
    "UnknownServer",
    "choose_span",
    "next_check_at",
    "peer_order",
    "plan_rebalance",
    "should_move",
    "simulate_churn",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
