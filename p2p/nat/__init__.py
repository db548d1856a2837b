"""NAT traversal: reachability checks (AutoNAT-like)."""

import inspect

from ._autonat import (
    DIALBACK_PROTOCOL_ID,
    PROTOCOL_ID,
    Autonat,
    Reachability,
    ReachabilityResult,
    dialback_candidates,
)
from ._limits import AutonatLimits

AUTONAT_PROTOCOL_ID = PROTOCOL_ID
AUTONAT_DIALBACK_PROTOCOL_ID = DIALBACK_PROTOCOL_ID

__all__ = [
    "AUTONAT_DIALBACK_PROTOCOL_ID",
    "AUTONAT_PROTOCOL_ID",
    "Autonat",
    "AutonatLimits",
    "Reachability",
    "ReachabilityResult",
    "dialback_candidates",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
del _name, _obj
