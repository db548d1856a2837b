"""Contacts (a peer, its DHT ID and addresses) and the IP groups used for diversity.

An IP group is an IPv4 /24 or an IPv6 /48: one operator with one cheap block of
addresses can fill only a few slots of any routing table or lookup. Loopback, private
LAN and link-local addresses can be exempted (``DhtLimits.exempt_private_addrs``): on
for home clusters where every peer shares 192.168.1.0/24, off for the public swarm.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache

from security import PeerId
from transport import Multiaddr

from ._ids import node_id

_IP_PROTOCOLS = ("ip4", "ip6")
_LAN_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


@dataclass(frozen=True, slots=True)
class Contact:
    """A DHT peer: its PeerID, where to reach it, and the IP its diversity group comes from.

    ``ip`` is the address the peer was observed at when known, otherwise the first IP in
    ``addrs``; None for addresses without an IP (the in-process memory transport).
    """

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    ip: str | None = None
    node_id: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", node_id(self.peer_id))
        if self.ip is None:
            object.__setattr__(self, "ip", first_ip(self.addrs))

    def with_addrs(self, addrs: tuple[Multiaddr, ...], ip: str | None = None) -> Contact:
        return Contact(self.peer_id, addrs, ip)


def first_ip(addrs: tuple[Multiaddr, ...]) -> str | None:
    """The IP of the first address that starts with ``/ip4`` or ``/ip6``."""
    for addr in addrs:
        proto, value = addr.components[0]
        if proto in _IP_PROTOCOLS:
            return value
    return None


@lru_cache(maxsize=8192)
def ip_group(ip: str | None, *, exempt_private: bool) -> str | None:
    """The diversity group of ``ip`` (``"203.0.113.0/24"``), or None if it is exempt.

    IPv4-mapped IPv6 addresses count as their IPv4 address. With ``exempt_private``,
    loopback, link-local and private LAN addresses (RFC 1918, IPv6 unique-local) belong
    to no group.
    """
    if ip is None:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if exempt_private and (
        address.is_loopback
        or address.is_link_local
        or any(address in net for net in _LAN_NETWORKS if net.version == address.version)
    ):
        return None
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
