"""IP diversity groups: the unit in which one operator's cheap addresses are counted.

An IP group is an IPv4 /24 or an IPv6 /48: one operator with one cheap block of
addresses can fill only a few slots of any routing table or lookup (``dht``) and earns
a shared penalty in the reputation book (``security.ReputationBook``). Loopback,
private LAN and link-local addresses can be exempted: on for home clusters where every
peer shares 192.168.1.0/24, off for the public swarm.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

_LAN_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


@lru_cache(maxsize=8192)
def ip_group(ip: str | None, *, exempt_private: bool) -> str | None:
    """The diversity group of ``ip`` (``"203.0.113.0/24"``), or None if it is exempt.

    IPv4-mapped IPv6 addresses count as their IPv4 address. With ``exempt_private``,
    loopback, link-local and private LAN addresses (RFC 1918, IPv6 unique-local) belong
    to no group. Text that is not an IP address belongs to no group.
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
