"""This machine's interface addresses: what a wildcard listen address (``0.0.0.0``, ``::``)
stands for when the Host tells others where to reach it, and which addresses are LAN ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

import ifaddr

from transport._multiaddr import Multiaddr

__all__ = ["expand_wildcards", "interface_ips", "is_lan_ip"]

_LAN_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "127.0.0.0/8",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)


def is_lan_ip(ip: str) -> bool:
    """Whether ``ip`` is a private (RFC 1918, ULA), link-local or loopback address: one
    a peer can only reach from the same home network or machine."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in _LAN_NETWORKS if net.version == address.version)


def interface_ips() -> list[str]:
    """Every IPv4 and IPv6 address of this machine's interfaces (IPv6 link-local ones,
    which need a zone to be dialed, left out)."""
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            ip = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            if ipaddress.ip_address(ip).is_link_local and ":" in ip:
                continue
            if ip not in out:
                out.append(ip)
    return out


def expand_wildcards(
    addrs: Sequence[Multiaddr], ips: Callable[[], list[str]] = interface_ips
) -> list[Multiaddr]:
    """``addrs`` with each wildcard IP replaced by the interface addresses of its family.

    Loopback addresses stand in for a wildcard only on a machine with no other address
    of that family: a node that listens on every interface is meant to be reached from
    others. Addresses that are not wildcards are kept as they are.
    """
    out: list[Multiaddr] = []
    known: list[str] | None = None
    for addr in addrs:
        (family, host), *rest = addr.components
        if family not in ("ip4", "ip6") or host is None or not _unspecified(host):
            if addr not in out:
                out.append(addr)
            continue
        if known is None:
            known = ips()
        version = 4 if family == "ip4" else 6
        same = [ip for ip in known if ipaddress.ip_address(ip).version == version]
        outward = [ip for ip in same if not ipaddress.ip_address(ip).is_loopback]
        tail = "".join(f"/{name}" + ("" if value is None else f"/{value}") for name, value in rest)
        for ip in outward or same:
            expanded = Multiaddr.from_string(f"/{family}/{ip}{tail}")
            if expanded not in out:
                out.append(expanded)
    return out


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
