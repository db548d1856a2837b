"""Authenticated, multiplexed connections: QUIC, TCP (TLS 1.3 + yamux), in-memory.

Imports without torch or numpy. Every transport implements the contracts of
``transport._base`` and passes one conformance suite.
"""

import inspect

from ._base import ByteStream, Connection, ConnectionHandler, Listener, Stream, Transport
from ._delay import DelayTransport, link_delay_from_env
from ._errors import (
    ConnectionClosed,
    DialError,
    HandshakeError,
    LimitExceeded,
    MultiaddrError,
    PeerIdMismatch,
    RemoteProtocolError,
    StreamClosed,
    StreamError,
    StreamReset,
    TransportError,
)
from ._limits import (
    MemoryLimits,
    MultistreamLimits,
    QuicLimits,
    TcpLimits,
    TransportLimits,
    YamuxLimits,
)
from ._memory import DEFAULT_HUB, MemoryHub, MemoryTransport
from ._multiaddr import Multiaddr
from ._multistream import handle_protocols, select_protocol
from ._quic import QuicTransport
from ._tcp import TcpTransport
from ._upgrade import StreamUpgrader, UpgradedStream

__all__ = [
    # implementations
    "DEFAULT_HUB",
    # contracts
    "ByteStream",
    "Connection",
    # errors
    "ConnectionClosed",
    "ConnectionHandler",
    "DelayTransport",
    "DialError",
    "HandshakeError",
    "LimitExceeded",
    "Listener",
    "MemoryHub",
    # limits
    "MemoryLimits",
    "MemoryTransport",
    # addresses and negotiation
    "Multiaddr",
    "MultiaddrError",
    "MultistreamLimits",
    "PeerIdMismatch",
    "QuicLimits",
    "QuicTransport",
    "RemoteProtocolError",
    "Stream",
    "StreamClosed",
    "StreamError",
    "StreamReset",
    "StreamUpgrader",
    "TcpLimits",
    "TcpTransport",
    "Transport",
    "TransportError",
    "TransportLimits",
    "UpgradedStream",
    "YamuxLimits",
    "handle_protocols",
    "link_delay_from_env",
    "select_protocol",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
