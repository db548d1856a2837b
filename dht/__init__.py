"""Swarm's Kademlia DHT over a ``p2p.Host``. Imports without torch or numpy.

``DHT(host, DhtLimits(), identity=key_pair)``, ``await dht.start(bootstrap=[addr])``
(a server solves its identity proof-of-work there, ``DhtLimits.pow_difficulty``),
then ``await dht.store(key, value, expiration, subkey=None)``, ``await dht.get(key)``
and ``await dht.find_peers(target)``. The sans-IO cores (routing table, lookup,
record store) are importable for simulations; ``SimNetwork`` runs thousands of nodes
in one process without a transport.
"""

from ._contact import Contact, ip_group
from ._core import DhtCore
from ._errors import (
    BadSignature,
    DhtConfigError,
    DHTError,
    DhtProtocolError,
    ExpiryTooFar,
    InsufficientProofOfWork,
    MalformedRecord,
    NotBootstrapped,
    QuotaExceeded,
    RateLimited,
    RecordExpired,
    RecordRejected,
    RecordTooLarge,
    RefusalCode,
    StaleRecord,
    StoreFailed,
    StoreFull,
    rejection,
)
from ._ids import ID_BITS, bucket_index, distance, key_id, node_id
from ._limits import DhtLimits
from ._lookup import Lookup
from ._messages import PROTOCOL_ID
from ._node import DHT, DhtStats, LookupReport
from ._records import (
    Entry,
    Record,
    RecordValidator,
    SignatureValidator,
    ValidatorChain,
    sign_entry,
)
from ._routing import Admission, RoutingTable, Update
from ._sim import SimNetwork, SimResult
from ._store import RecordStore

__all__ = [
    "DHT",
    "ID_BITS",
    "PROTOCOL_ID",
    "Admission",
    "BadSignature",
    "Contact",
    "DHTError",
    "DhtConfigError",
    "DhtCore",
    "DhtLimits",
    "DhtProtocolError",
    "DhtStats",
    "Entry",
    "ExpiryTooFar",
    "InsufficientProofOfWork",
    "Lookup",
    "LookupReport",
    "MalformedRecord",
    "NotBootstrapped",
    "QuotaExceeded",
    "RateLimited",
    "Record",
    "RecordExpired",
    "RecordRejected",
    "RecordStore",
    "RecordTooLarge",
    "RecordValidator",
    "RefusalCode",
    "RoutingTable",
    "SignatureValidator",
    "SimNetwork",
    "SimResult",
    "StaleRecord",
    "StoreFailed",
    "StoreFull",
    "Update",
    "ValidatorChain",
    "bucket_index",
    "distance",
    "ip_group",
    "key_id",
    "node_id",
    "rejection",
    "sign_entry",
]

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, int | str):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass
