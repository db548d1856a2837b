"""The embeddable peer-to-peer node: ``Host``, its RPC, peer store, limits and errors.

Imports without torch or numpy: an application embeds ``p2p`` with the core
dependencies alone (cryptography, msgpack, aioquic).
"""

from ._bootstrap import BootstrapResult
from ._errors import (
    BootstrapError,
    ConnectionLost,
    DialFailed,
    LimitExceeded,
    P2PError,
    P2PTimeout,
    PeerIdMismatch,
    PeerProtocolError,
    PeerUnreachable,
    ProtocolNegotiationFailed,
    ProtocolNotSupported,
    RemoteError,
    RpcCancelled,
    RpcCode,
    RpcError,
    RpcTimeout,
    StreamFailed,
)
from ._host import AGENT_VERSION, Host
from ._identify import PROTOCOL_ID as IDENTIFY_PROTOCOL_ID
from ._identify import IdentifyInfo
from ._limits import (
    BootstrapLimits,
    ConnectionLimits,
    HostLimits,
    IdentifyLimits,
    PeerStoreLimits,
    RpcLimits,
)
from ._peerstore import PeerInfo, PeerStore
from ._ping import PROTOCOL_ID as PING_PROTOCOL_ID
from ._rpc import RpcContext, RpcReply, RpcStream
from ._stream import HostStream
from .discovery import Discoverer, DiscoveryError, MdnsDiscovery, MdnsLimits, PeerFound
from .nat import (
    Autonat,
    AutonatLimits,
    HolePuncher,
    HolePunchLimits,
    NatLimits,
    NatTraversal,
    PunchResult,
    Reachability,
    ReachabilityResult,
    Relay,
    RelayLimits,
    Reservation,
)

__all__ = [
    "AGENT_VERSION",
    "IDENTIFY_PROTOCOL_ID",
    "PING_PROTOCOL_ID",
    "Autonat",
    "AutonatLimits",
    "BootstrapError",
    "BootstrapLimits",
    "BootstrapResult",
    "ConnectionLimits",
    "ConnectionLost",
    "DialFailed",
    "Discoverer",
    "DiscoveryError",
    "HolePunchLimits",
    "HolePuncher",
    "Host",
    "HostLimits",
    "HostStream",
    "IdentifyInfo",
    "IdentifyLimits",
    "LimitExceeded",
    "MdnsDiscovery",
    "MdnsLimits",
    "NatLimits",
    "NatTraversal",
    "P2PError",
    "P2PTimeout",
    "PeerFound",
    "PeerIdMismatch",
    "PeerInfo",
    "PeerProtocolError",
    "PeerStore",
    "PeerStoreLimits",
    "PeerUnreachable",
    "ProtocolNegotiationFailed",
    "ProtocolNotSupported",
    "PunchResult",
    "Reachability",
    "ReachabilityResult",
    "Relay",
    "RelayLimits",
    "RemoteError",
    "Reservation",
    "RpcCancelled",
    "RpcCode",
    "RpcContext",
    "RpcError",
    "RpcLimits",
    "RpcReply",
    "RpcStream",
    "RpcTimeout",
    "StreamFailed",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
