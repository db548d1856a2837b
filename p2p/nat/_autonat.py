"""Reachability checks (AutoNAT-like): am I reachable from the internet, and where?

A peer asks others to dial it back at the addresses it believes are its own (its QUIC
listen addresses and what identify reported). A server dials from a socket of its own
that never talked to the asker (so a NAT that only lets replies in refuses it) and
only the asker's observed IP (it never dials a third party), and sends the request's
random nonce over the new connection. The asker believes a dial-back only when that
nonce arrives on an inbound connection authenticated as the server: a lying server can
make it think itself unreachable, never reachable.

``/swarm/autonat/1.0.0`` (asker -> server): ``{"nonce": 16 bytes, "addrs": [multiaddr bytes]}``,
answered ``{"dialed": multiaddr bytes | None, "tried": n}`` or ``{"error": text}``.
``/swarm/autonat/dialback/1.0.0`` (server -> asker, on the dial-back connection):
``{"nonce", "addr"}``, answered ``{"ok": True}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from security import KeyPair, PeerId
from transport._base import Stream, Transport
from transport._errors import MultiaddrError, TransportError
from transport._multiaddr import Multiaddr
from transport._multistream import select_protocol
from transport._quic import QuicTransport

from .._errors import P2PError, PeerProtocolError
from ._limits import AutonatLimits
from ._wire import encode_frame, field, read_frame

if TYPE_CHECKING:
    from .._host import Host

__all__ = [
    "DIALBACK_PROTOCOL_ID",
    "PROTOCOL_ID",
    "Autonat",
    "Reachability",
    "ReachabilityResult",
    "dialback_candidates",
]

_log = logging.getLogger("p2p.nat.autonat")

PROTOCOL_ID = "/swarm/autonat/1.0.0"
DIALBACK_PROTOCOL_ID = "/swarm/autonat/dialback/1.0.0"
_NONCE_BYTES = 16


class Reachability(StrEnum):
    PUBLIC = "public"
    """A dial-back reached us: others can connect directly."""
    PRIVATE = "private"
    """Servers answered but none could dial back: we are behind a NAT or firewall."""
    UNKNOWN = "unknown"
    """No server answered (or none was asked yet)."""


@dataclass(frozen=True, slots=True)
class ReachabilityResult:
    status: Reachability
    addr: Multiaddr | None = None
    """The address a dial-back reached (PUBLIC only)."""
    asked: int = 0
    answered: int = 0


def dialback_candidates(
    requested: Sequence[Multiaddr], observed_ip: Multiaddr, limit: int
) -> list[Multiaddr]:
    """The QUIC addresses a server dials: each requested port at the asker's observed IP.

    ``observed_ip`` is the asker's connection address; only its IP part is used, so a
    server never dials an address the asker could point at a third party.
    """
    (family, ip), *_ = observed_ip.components
    out: list[Multiaddr] = []
    for addr in requested:
        if addr.transport_kind != "quic" or addr.components[0][0] != family:
            continue
        try:
            port = addr.without_p2p().host_port()[1]
        except MultiaddrError:
            continue
        candidate = Multiaddr.from_string(f"/{family}/{ip}/udp/{port}/quic-v1")
        if candidate not in out:
            out.append(candidate)
        if len(out) >= limit:
            break
    return out


class Autonat:
    """Asks peers to dial back (``check``) and, with ``serve=True``, dials back for them.

    ``Autonat(host, identity)``, ``start()`` registers the protocols on the Host;
    ``stop()`` removes them and closes the dial-back socket.
    """

    def __init__(
        self,
        host: Host,
        identity: KeyPair,
        *,
        serve: bool = True,
        dialer: Transport | None = None,
        limits: AutonatLimits = AutonatLimits(),  # noqa: B008 - frozen value
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if identity.peer_id != host.peer_id:
            raise ValueError("Autonat needs the Host's own identity")
        self._host = host
        self._identity = identity
        self._serve_requests = serve
        self._dialer = dialer
        self._own_dialer = dialer is None
        self._limits = limits
        self._random_bytes = random_bytes
        self._pending: dict[bytes, tuple[PeerId, asyncio.Future[Multiaddr]]] = {}
        self._serving = 0
        self.result = ReachabilityResult(Reachability.UNKNOWN)

    async def start(self) -> None:
        self._host.set_stream_handler(DIALBACK_PROTOCOL_ID, self._on_dialback)
        if self._serve_requests:
            self._host.set_stream_handler(PROTOCOL_ID, self._on_request)

    async def stop(self) -> None:
        self._host.remove_handler(DIALBACK_PROTOCOL_ID)
        self._host.remove_handler(PROTOCOL_ID)
        if self._own_dialer and self._dialer is not None:
            await self._dialer.close()
            self._dialer = None

    # -- asking ------------------------------------------------------------------------

    def own_addrs(self) -> list[Multiaddr]:
        """Where we believe we are: QUIC listen addresses, then observed ones."""
        addrs = [a for a in self._host.listen_addrs if a.transport_kind == "quic"]
        observed = sorted(self._host.observed_addrs.items(), key=lambda item: -item[1])
        addrs += [a for a, _ in observed if a.transport_kind == "quic" and a not in addrs]
        return addrs

    async def check(self, servers: Sequence[PeerId] | None = None) -> ReachabilityResult:
        """Ask up to ``AutonatLimits.servers_per_check`` peers (default: connected ones)."""
        if servers is None:
            servers = self._host.connected_peers()
        servers = list(servers)[: self._limits.servers_per_check]
        answers = await asyncio.gather(*(self._ask(s) for s in servers), return_exceptions=True)
        answered = [a for a in answers if not isinstance(a, BaseException)]
        reached = next((a for a in answered if a is not None), None)
        if reached is not None:
            status = Reachability.PUBLIC
        elif answered:
            status = Reachability.PRIVATE
        else:
            status = Reachability.UNKNOWN
        for server, answer in zip(servers, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, P2PError | OSError):
                    raise answer
                _log.info("reachability check by %s failed: %s", server, answer)
        self.result = ReachabilityResult(status, reached, len(servers), len(answered))
        return self.result

    async def _ask(self, server: PeerId) -> Multiaddr | None:
        """The address the server reached (nonce received), None if it could not."""
        nonce = self._random_bytes(_NONCE_BYTES)
        reached: asyncio.Future[Multiaddr] = asyncio.get_running_loop().create_future()
        self._pending[nonce] = (server, reached)
        request = {"nonce": nonce, "addrs": [a.to_bytes() for a in self.own_addrs()]}
        try:
            async with asyncio.timeout(self._limits.request_timeout_s):
                stream, _ = await self._host.new_stream(server, [PROTOCOL_ID])
                try:
                    await stream.write(encode_frame(request))
                    answer = await read_frame(stream, self._limits.max_message_bytes)
                finally:
                    await stream.close()
        except (TimeoutError, TransportError) as exc:
            raise P2PError(f"reachability check by {server} failed: {exc!r}") from exc
        finally:
            del self._pending[nonce]
        if "error" in answer:
            raise P2PError(f"{server} refused the reachability check: {answer['error']}")
        return reached.result() if reached.done() else None

    async def _on_dialback(self, stream: Stream, peer: PeerId) -> None:
        message = await read_frame(stream, self._limits.max_message_bytes)
        nonce = field(message, "nonce", bytes)
        pending = self._pending.get(nonce)
        if pending is None or pending[0] != peer or pending[1].done():
            raise PeerProtocolError(f"{peer} dialed back with a nonce we did not send it")
        try:
            addr = Multiaddr.from_bytes(field(message, "addr", bytes))
        except MultiaddrError as exc:
            raise PeerProtocolError(f"{peer} dialed back naming a bad address: {exc}") from None
        pending[1].set_result(addr)
        await stream.write(encode_frame({"ok": True}))

    # -- serving -----------------------------------------------------------------------

    async def _on_request(self, stream: Stream, peer: PeerId) -> None:
        message = await read_frame(stream, self._limits.max_message_bytes)
        if self._serving >= self._limits.max_concurrent_requests:
            await stream.write(encode_frame({"error": "busy"}))
            return
        conn = stream.connection
        if conn.transport_name not in ("quic", "tcp"):
            await stream.write(encode_frame({"error": "ask over a direct connection"}))
            return
        nonce = field(message, "nonce", bytes)
        requested = []
        for raw in field(message, "addrs", list)[: self._limits.max_addrs * 2]:
            try:
                requested.append(Multiaddr.from_bytes(raw))
            except (MultiaddrError, TypeError):
                continue
        candidates = dialback_candidates(requested, conn.remote_addr, self._limits.max_addrs)
        self._serving += 1
        try:
            dialed = None
            for addr in candidates:
                if await self._dial_back(addr, peer, nonce):
                    dialed = addr
                    break
        finally:
            self._serving -= 1
        answer = {"dialed": dialed.to_bytes() if dialed else None, "tried": len(candidates)}
        await stream.write(encode_frame(answer))

    async def _dial_back(self, addr: Multiaddr, peer: PeerId, nonce: bytes) -> bool:
        if self._dialer is None:
            self._dialer = QuicTransport(self._identity)
        try:
            conn = await self._dialer.dial(addr, peer, timeout=self._limits.dial_timeout_s)
        except (TransportError, OSError) as exc:
            _log.debug("dial-back to %s at %s failed: %s", peer, addr, exc)
            return False
        try:
            async with asyncio.timeout(self._limits.dial_timeout_s):
                stream = await conn.open_stream()
                await select_protocol(
                    stream, [DIALBACK_PROTOCOL_ID], limits=self._host.limits.transport.multistream
                )
                await stream.write(encode_frame({"nonce": nonce, "addr": addr.to_bytes()}))
                answer: dict[str, Any] = await read_frame(stream, self._limits.max_message_bytes)
                return answer.get("ok") is True
        except (TimeoutError, TransportError, PeerProtocolError) as exc:
            _log.debug("dial-back to %s at %s broke off: %r", peer, addr, exc)
            return False
        finally:
            await conn.close()
