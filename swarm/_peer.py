"""What every command needs: an identity, a Host with TCP and QUIC, a DHT, and a clean stop.

``start_peer`` can also run NAT traversal (``p2p.NatTraversal``: reachability check,
relays, hole punching) and mDNS discovery on the LAN (``p2p.MdnsDiscovery``). mDNS runs
only on the private LAN addresses (10/8, 172.16/12, 192.168/16) among the addresses the
node listens on: a node listening on loopback (the default) multicasts nowhere, one
listening on ``0.0.0.0`` announces itself on its LAN interfaces. Peers found by mDNS
become DHT bootstrap peers, so a home cluster started with no ``--bootstrap`` forms one
swarm by itself, and a node given a public bootstrap as well joins both.

Imports no torch: ``bootstrap`` runs on the core packages alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Protocol

from dht import DHT, DHTError
from p2p import Host, NatTraversal, P2PError, Reachability
from p2p.discovery import MdnsDiscovery, OnPeer, PeerFound, connect_to_found, lan_interfaces
from security import KeyPair
from transport import Multiaddr, QuicTransport, TcpTransport, link_delay_from_env

_log = logging.getLogger("swarm.peer")

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1")
"""Loopback only by default: pass ``--listen`` with a LAN or public address to be reachable."""


class _Service(Protocol):
    async def stop(self) -> None: ...


_services: dict[Host, list[_Service]] = {}
"""What ``start_peer`` started beside each Host (NAT traversal, mDNS), for ``stop_peer``."""


def say(text: str) -> None:
    """One line on stdout, flushed: what scripts (and the demo) read."""
    print(text, flush=True)


def identity_from(path: str | None) -> KeyPair:
    """The key pair in ``path`` (created, mode 0600, if missing), or a fresh one."""
    return KeyPair.load_or_create(path) if path else KeyPair.generate()


def addrs_from(texts: Sequence[str]) -> list[Multiaddr]:
    return [Multiaddr.from_string(text) for text in texts]


async def start_peer(
    identity: KeyPair,
    listen: Sequence[str],
    bootstrap: Sequence[str],
    *,
    server_mode: bool,
    nat: bool = False,
    mdns: bool = False,
) -> tuple[Host, DHT]:
    """A started Host (listening on ``listen``) and a DHT joined through ``bootstrap``.

    With no ``bootstrap`` the DHT starts a new swarm. ``nat`` runs NAT traversal: with
    ``server_mode`` and a bootstrap, the reachability check runs first and a peer found
    unreachable joins the DHT as a client (it stays reachable for blocks through its
    relay). ``mdns`` runs LAN discovery where the node listens on a LAN address.
    """
    host = Host(identity, link_delay_from_env([TcpTransport(identity), QuicTransport(identity)]))
    await host.start(addrs_from(listen))
    services: list[_Service] = []
    _services[host] = services
    try:
        if nat:
            traversal = NatTraversal(host, identity)
            await traversal.start()
            services.append(traversal)
            if server_mode and bootstrap:
                server_mode = await _reachable(host, traversal, addrs_from(bootstrap))
        dht = DHT(host, server_mode=server_mode, identity=identity)
        try:
            await dht.start(bootstrap=addrs_from(bootstrap))
        except BaseException:
            await dht.stop()
            raise
        if mdns:
            await _start_mdns(host, dht, services)
    except BaseException:
        await _stop_services(host)
        await host.stop()
        raise
    return host, dht


async def _reachable(host: Host, traversal: NatTraversal, bootstrap: list[Multiaddr]) -> bool:
    """Connect to the bootstrap peers and check reachability: False only when unreachable."""
    results = await asyncio.gather(
        *(_identified(host, a) for a in bootstrap), return_exceptions=True
    )
    for addr, result in zip(bootstrap, results, strict=True):
        if isinstance(result, P2PError):
            _log.info("bootstrap peer %s not reached yet: %s", addr, result)
        elif isinstance(result, BaseException):
            raise result
    status = await traversal.settle()
    if status is Reachability.PRIVATE:
        _log.warning(
            "this node cannot be reached from the internet: it joins the DHT as a client and "
            "is reached through a relay (see docs/networking.md to open a port instead)"
        )
    return status is not Reachability.PRIVATE


async def _identified(host: Host, addr: Multiaddr) -> None:
    """Connect to ``addr`` and learn what its peer serves (identify)."""
    await host.identify(await host.connect(addr))


async def _start_mdns(host: Host, dht: DHT, services: list[_Service]) -> None:
    interfaces = lan_interfaces(host.listen_addrs)
    if not interfaces:
        _log.info("mDNS off: this node listens on no private LAN address")
        return
    discovery = MdnsDiscovery(host, interfaces=interfaces, on_peer=_join_found(host, dht))
    await discovery.start()
    services.insert(0, discovery)
    _log.info("mDNS on %s", ", ".join(interfaces))


def _join_found(host: Host, dht: DHT) -> OnPeer:
    """Connect to a peer mDNS found and, if the DHT does not know it, bootstrap from it."""
    connect = connect_to_found(host)

    async def on_peer(found: PeerFound) -> None:
        _log.info("LAN peer %s found by mDNS", found.peer_id)
        await connect(found)
        if not host.connections(found.peer_id) or found.peer_id in dht.routing_table:
            return
        try:
            await dht.bootstrap([found.addrs[0].with_p2p(found.peer_id)])
        except DHTError as exc:
            _log.info("LAN peer %s did not answer as a DHT node: %s", found.peer_id, exc)

    return on_peer


async def _stop_services(host: Host) -> None:
    for service in _services.pop(host, []):
        await service.stop()


async def stop_peer(host: Host, dht: DHT) -> None:
    await _stop_services(host)
    await dht.stop()
    await host.stop()


def stop_signal() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM; a second one interrupts at once."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def first(signum: int) -> None:
        event.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print(f"{signal.Signals(signum).name}: stopping (again to force)", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig)
    return event
