"""mDNS discovery on a LAN, as the libp2p spec has it (specs discovery/mdns.md).

Each peer registers a service instance ``<random peer-name>._p2p._udp.local`` whose TXT
record holds one ``dnsaddr=<multiaddr>/p2p/<PeerID>`` string per address, browses for
the others and reports what it finds. zeroconf keeps only one value per TXT key in its
property dict, so the raw record is parsed here (``parse_txt``), and built here
(``encode_txt``): both are pure functions.

``MdnsDiscovery(host, interfaces=["192.168.1.20"])`` binds zeroconf to the given
interface addresses only (all IPv4 interfaces when None) and, by default, connects the
Host to every peer found.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import string
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from security import PeerId
from transport._errors import MultiaddrError
from transport._multiaddr import Multiaddr

from .._interfaces import expand_wildcards, interface_ips, is_lan_ip
from ._base import OnPeer, PeerFound, connect_to_found
from ._errors import DiscoveryError
from ._limits import MdnsLimits

if TYPE_CHECKING:
    from .._host import Host

__all__ = ["SERVICE_TYPE", "MdnsDiscovery", "encode_txt", "lan_interfaces", "parse_txt"]

_log = logging.getLogger("p2p.discovery.mdns")

SERVICE_TYPE = "_p2p._udp.local."
_DNSADDR = b"dnsaddr="
_ALPHABET = string.ascii_letters + string.digits


def peer_name(random_bytes: Callable[[int], bytes]) -> str:
    """A random DNS label of 32 to 63 letters and digits (the spec's peer-name)."""
    raw = random_bytes(64)
    length = 32 + raw[0] % 32
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in raw[1 : 1 + length])


def encode_txt(peer_id: PeerId, addrs: Sequence[Multiaddr], limits: MdnsLimits) -> bytes:
    """The raw TXT record: one length-prefixed ``dnsaddr=`` string per address."""
    out = bytearray()
    for addr in list(addrs)[: limits.max_addrs_per_peer]:
        entry = _DNSADDR + str(addr.without_p2p().with_p2p(peer_id)).encode()
        if len(entry) <= 255:
            out += bytes([len(entry)]) + entry
    return bytes(out)


def parse_txt(raw: bytes, limits: MdnsLimits) -> tuple[PeerId, tuple[Multiaddr, ...]] | None:
    """The peer and addresses a raw TXT record announces, or None if it announces none.

    Strings that are not ``dnsaddr=`` multiaddrs ending in ``/p2p/`` are skipped; a
    record whose addresses name different peers, or that is truncated, is rejected.
    """
    if len(raw) > limits.max_txt_bytes:
        return None
    peer: PeerId | None = None
    addrs: list[Multiaddr] = []
    i = 0
    while i < len(raw):
        end = i + 1 + raw[i]
        if end > len(raw):
            return None
        entry, i = raw[i + 1 : end], end
        if not entry.startswith(_DNSADDR) or len(addrs) >= limits.max_addrs_per_peer:
            continue
        try:
            addr = Multiaddr.from_string(entry[len(_DNSADDR) :].decode("ascii"))
        except (MultiaddrError, UnicodeDecodeError, ValueError):
            continue
        if addr.peer_id is None:
            continue
        if peer is not None and addr.peer_id != peer:
            return None
        peer = addr.peer_id
        bare = addr.without_p2p()
        if bare not in addrs:
            addrs.append(bare)
    return None if peer is None else (peer, tuple(addrs))


def _local_ips(interfaces: Sequence[str] | None) -> list[str]:
    if interfaces is not None:
        return list(interfaces)
    return [
        ip
        for ip in interface_ips()
        if ipaddress.ip_address(ip).version == 4 and not ipaddress.ip_address(ip).is_loopback
    ]


def lan_interfaces(listen_addrs: Sequence[Multiaddr]) -> list[str]:
    """The private LAN IPv4 addresses among ``listen_addrs`` (wildcards expanded first):
    where ``swarm join`` runs mDNS. Loopback, public and IPv6 addresses are left out, so
    a node listening on loopback only (the default) announces nothing."""
    out: list[str] = []
    for addr in expand_wildcards(listen_addrs):
        family, ip = addr.components[0]
        if family != "ip4" or ip is None or ipaddress.ip_address(ip).is_loopback:
            continue
        if is_lan_ip(ip) and ip not in out:
            out.append(ip)
    return out


class MdnsDiscovery:
    """Announces the Host on the LAN and reports (by default, connects to) peers found."""

    def __init__(
        self,
        host: Host,
        *,
        interfaces: Sequence[str] | None = None,
        on_peer: OnPeer | None = None,
        limits: MdnsLimits = MdnsLimits(),  # noqa: B008 - frozen value
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._host = host
        self._interfaces = None if interfaces is None else tuple(interfaces)
        self._on_peer = on_peer if on_peer is not None else connect_to_found(host)
        self._limits = limits
        self._name = f"{peer_name(random_bytes)}.{SERVICE_TYPE}"
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def service_name(self) -> str:
        return self._name

    def announced_addrs(self) -> list[Multiaddr]:
        """The Host's IPv4 listen addresses, a wildcard replaced by each interface address."""
        ips = _local_ips(self._interfaces)
        out: list[Multiaddr] = []
        for addr in self._host.listen_addrs:
            (proto, host), *rest = addr.components
            if proto != "ip4" or host is None:
                continue
            hosts = ips if ipaddress.ip_address(host).is_unspecified else [host]
            for ip in hosts:
                text = f"/ip4/{ip}" + "".join(
                    f"/{name}" + (f"/{value}" if value is not None else "") for name, value in rest
                )
                out.append(Multiaddr.from_string(text))
        return out

    def _service_info(self) -> AsyncServiceInfo:
        addrs = self.announced_addrs()
        port = addrs[0].host_port()[1] if addrs else 0
        ips = sorted({addr.host_port()[0] for addr in addrs})
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=port,
            properties=encode_txt(self._host.peer_id, addrs, self._limits),
            server=f"{self._name.split('.')[0]}.local.",
            parsed_addresses=ips,
        )

    async def start(self) -> None:
        """Register our service and browse for others; ``DiscoveryError`` if zeroconf fails."""
        interfaces: Any = (
            InterfaceChoice.All if self._interfaces is None else list(self._interfaces)
        )
        try:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            await self._zc.async_register_service(self._service_info())
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
            )
        except (OSError, NonUniqueNameException) as exc:
            await self.stop()
            raise DiscoveryError(f"mDNS could not start on {interfaces}: {exc}") from exc

    async def stop(self) -> None:
        """Stop browsing, withdraw our service, and wait for lookups in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            zc, self._zc = self._zc, None
            await zc.async_unregister_all_services()
            await zc.async_close()

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed or name == self._name:
            return
        if len(self._tasks) >= self._limits.max_pending_lookups:
            _log.debug("mDNS: %d lookups pending, %s waits for its next announcement",
                       len(self._tasks), name)  # fmt: skip
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        timeout_ms = self._limits.query_timeout_s * 1000
        if not await info.async_request(zeroconf, timeout_ms) or info.text is None:
            _log.debug("mDNS: %s announced no TXT record in time", name)
            return
        parsed = parse_txt(info.text, self._limits)
        if parsed is None:
            _log.debug("mDNS: %s has no usable dnsaddr record", name)
            return
        peer, addrs = parsed
        if peer == self._host.peer_id or not addrs:
            return
        try:
            await self._on_peer(PeerFound(peer, addrs, "mdns"))
        except Exception:
            _log.exception("mDNS: the callback for %s failed", peer)
