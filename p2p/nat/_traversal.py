"""NAT traversal run by itself: check reachability, then relay for others or use a relay.

``NatTraversal(host, identity)`` runs the reachability check (``Autonat``) against peers
reached over the internet, that is through a direct connection whose remote address is
not a LAN one (peers on the same LAN would vouch for an address only the LAN can dial):

- ``public``: this peer relays for others (it answers the hop protocol);
- ``private``: it relays for nobody, reserves a slot on one of the peers it reached over
  the internet that accepts (retrying others, and again as soon as a reservation ends:
  the relay left, refused a renewal, or expired it), and its ``host.addrs`` then list
  ``/<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>``. Relayed connections it accepts
  are turned into direct ones by hole punching where the NATs allow;
- ``unknown``: nobody reached over the internet answered yet (a LAN-only home cluster
  stays here; its peers dial each other directly).

The answer is checked again every ``NatLimits.recheck_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from security import KeyPair, PeerId
from transport._quic import QuicTransport

from .._errors import P2PError
from .._interfaces import is_lan_ip
from ._autonat import PROTOCOL_ID as AUTONAT_PROTOCOL_ID
from ._autonat import Autonat, Reachability
from ._circuit import TRANSPORT_NAME
from ._holepunch import HolePuncher, HolePunchLimits
from ._limits import AutonatLimits, NatLimits
from ._relay import Relay
from ._relay_limits import RelayLimits

if TYPE_CHECKING:
    from .._host import Host

__all__ = ["NatTraversal"]

_log = logging.getLogger("p2p.nat")


class NatTraversal:
    """Reachability, relaying and hole punching for a Host, run automatically.

    ``start()`` after the Host started; ``stop()`` before it stops. ``settle()`` runs one
    round at once (``swarm join`` does before it picks its DHT mode).
    """

    def __init__(
        self,
        host: Host,
        identity: KeyPair,
        *,
        limits: NatLimits = NatLimits(),  # noqa: B008 - frozen values
        autonat_limits: AutonatLimits = AutonatLimits(),  # noqa: B008
        relay_limits: RelayLimits = RelayLimits(),  # noqa: B008
        holepunch_limits: HolePunchLimits = HolePunchLimits(),  # noqa: B008
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._host = host
        self._limits = limits
        self._clock = clock
        self.autonat = Autonat(host, identity, limits=autonat_limits)
        self.relay = Relay(host, identity, limits=relay_limits)
        quic = next((t for t in host.transports if isinstance(t, QuicTransport)), None)
        self.puncher = (
            None if quic is None else HolePuncher(host, quic, self.relay, limits=holepunch_limits)
        )
        self._checked_at: float | None = None
        self._refused: dict[PeerId, float] = {}
        self._round = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def reachability(self) -> Reachability:
        return self.autonat.result.status

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def start(self) -> None:
        await self.autonat.start()
        await self.relay.start()
        if self.puncher is not None:
            await self.puncher.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.puncher is not None:
            await self.puncher.stop()
        await self.relay.stop()
        await self.autonat.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.settle()
            except P2PError as exc:
                _log.info("NAT traversal round failed: %s", exc)
            await asyncio.sleep(self._limits.check_interval_s)

    def internet_peers(self) -> list[PeerId]:
        """Peers connected directly from a non-LAN address: who may vouch for us."""
        out: list[PeerId] = []
        for peer in self._host.connected_peers():
            for conn in self._host.connections(peer):
                if conn.transport_name == TRANSPORT_NAME or conn.transport_name not in (
                    "quic",
                    "tcp",
                ):
                    continue
                ip = conn.remote_addr.components[0][1] or ""
                if not is_lan_ip(ip):
                    out.append(peer)
                    break
        return out

    async def settle(self) -> Reachability:
        """One round: check reachability if due, then serve as a relay or hold one."""
        async with self._round:
            peers = self.internet_peers()
            servers = [peer for peer in peers if self._answers_checks(peer)]
            if servers and self._check_due():
                result = await self.autonat.check(servers)
                if result.status is not Reachability.UNKNOWN:
                    self._checked_at = self._now()
                    _log.info("reachability: %s (%s)", result.status, result.addr)
            status = self.reachability
            self.relay.set_serving(status is Reachability.PUBLIC)
            if status is Reachability.PRIVATE and not self.relay.reservations:
                await self._reserve(peers)
            return status

    def _answers_checks(self, peer: PeerId) -> bool:
        """Whether identify said ``peer`` serves reachability checks (clients do not)."""
        info = self._host.peerstore.get(peer)
        return info is not None and AUTONAT_PROTOCOL_ID in info.protocols

    def _check_due(self) -> bool:
        if self._checked_at is None:
            return True
        return self._now() - self._checked_at >= self._limits.recheck_interval_s

    async def _reserve(self, candidates: list[PeerId]) -> None:
        now = self._now()
        for peer in candidates:
            refused_at = self._refused.get(peer)
            if refused_at is not None and now - refused_at < self._limits.relay_retry_s:
                continue
            try:
                reservation = await self.relay.reserve(peer)
            except P2PError as exc:
                _log.debug("no reservation on %s: %s", peer, exc)
                self._refused[peer] = now
                continue
            _log.info("reachable through relay %s at %s", peer, reservation.addr)
            return
