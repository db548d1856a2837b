"""The contract of a peer discoverer (mDNS here; bootstrap lists and the DHT beside it).

A discoverer is started and stopped by its owner and reports each peer it finds, with
the addresses it was told, to the ``on_peer`` callback it was built with. It never
connects by itself: ``connect_to_found(host)`` is the usual callback, handing what was
found to the Host.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from security import PeerId
from transport._multiaddr import Multiaddr

from .._errors import P2PError

if TYPE_CHECKING:
    from .._host import Host

_log = logging.getLogger("p2p.discovery")


@dataclass(frozen=True, slots=True)
class PeerFound:
    """A peer a discoverer heard of, with the addresses it announced (``/p2p/`` removed)."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]
    source: str


OnPeer = Callable[[PeerFound], Awaitable[None]]
"""``async def on_peer(found)``: called once per announcement heard."""


@runtime_checkable
class Discoverer(Protocol):
    """Finds peers and reports them to its ``on_peer`` callback between start and stop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def connect_to_found(host: Host) -> OnPeer:
    """A callback that records the peer's addresses and connects the Host to it."""

    async def on_peer(found: PeerFound) -> None:
        if found.peer_id == host.peer_id:
            return
        host.peerstore.add_addrs(found.peer_id, found.addrs)
        if host.connections(found.peer_id):
            return
        try:
            await host.connect(found.peer_id)
        except P2PError as exc:
            _log.info("%s found %s but could not connect: %s", found.source, found.peer_id, exc)

    return on_peer
