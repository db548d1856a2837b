"""Peer discovery: the ``Discoverer`` contract and mDNS on the LAN."""

import inspect

from ._base import Discoverer, OnPeer, PeerFound, connect_to_found
from ._errors import DiscoveryError
from ._limits import MdnsLimits
from ._mdns import SERVICE_TYPE, MdnsDiscovery, encode_txt, lan_interfaces, parse_txt

__all__ = [
    "SERVICE_TYPE",
    "Discoverer",
    "DiscoveryError",
    "MdnsDiscovery",
    "MdnsLimits",
    "OnPeer",
    "PeerFound",
    "connect_to_found",
    "encode_txt",
    "lan_interfaces",
    "parse_txt",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
del _name, _obj
