"""Contacts (a peer, its DHT ID and addresses) and the IP groups used for diversity.

An IP group is an IPv4 /24 or an IPv6 /48 (``security.ip_group``, re-exported here as
``dht.ip_group``): one operator with one cheap block of addresses can fill only a few
slots of any routing table or lookup. Loopback, private LAN and link-local addresses
can be exempted (``DhtLimits.exempt_private_addrs``): on for home clusters where every
peer shares 192.168.1.0/24, off for the public swarm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from security import PeerId, ip_group
from transport import Multiaddr

from ._ids import node_id

__all__ = ["Contact", "first_ip", "ip_group"]

_IP_PROTOCOLS = ("ip4", "ip6")


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
