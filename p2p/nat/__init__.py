"""NAT traversal: reachability checks (AutoNAT-like), relaying (circuit-relay-like) and
hole punching (DCUtR-like)."""

import inspect

from ._autonat import (
    DIALBACK_PROTOCOL_ID,
    PROTOCOL_ID,
    Autonat,
    Reachability,
    ReachabilityResult,
    dialback_candidates,
)
from ._circuit import CircuitTransport
from ._holepunch import PROTOCOL_ID as HOLEPUNCH_PROTOCOL_ID
from ._holepunch import HolePuncher, HolePunchLimits, PunchResult, punch_delay
from ._limits import AutonatLimits, NatLimits
from ._relay import HOP_PROTOCOL_ID, STOP_PROTOCOL_ID, Relay, Reservation
from ._relay_limits import RelayLimits
from ._traversal import NatTraversal

AUTONAT_PROTOCOL_ID = PROTOCOL_ID
AUTONAT_DIALBACK_PROTOCOL_ID = DIALBACK_PROTOCOL_ID
RELAY_HOP_PROTOCOL_ID = HOP_PROTOCOL_ID
RELAY_STOP_PROTOCOL_ID = STOP_PROTOCOL_ID

__all__ = [
    "AUTONAT_DIALBACK_PROTOCOL_ID",
    "AUTONAT_PROTOCOL_ID",
    "HOLEPUNCH_PROTOCOL_ID",
    "RELAY_HOP_PROTOCOL_ID",
    "RELAY_STOP_PROTOCOL_ID",
    "Autonat",
    "AutonatLimits",
    "CircuitTransport",
    "HolePunchLimits",
    "HolePuncher",
    "NatLimits",
    "NatTraversal",
    "PunchResult",
    "Reachability",
    "ReachabilityResult",
    "Relay",
    "RelayLimits",
    "Reservation",
    "dialback_candidates",
    "punch_delay",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
del _name, _obj
