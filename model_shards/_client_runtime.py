"""The client's networking, on an event loop of its own, for synchronous callers.

Hugging Face's ``generate`` is synchronous; the Host and the DHT are asyncio. A
``SwarmClient`` runs a Host (TCP and QUIC, dialing only) and a DHT client on an event loop
in one background thread; the caller's thread keeps the torch work (embeddings, LM head,
sampling) and hands each network exchange to the loop with ``run``: one hand-over per
generated token, however many servers the chain has.

The Host can reach servers behind NAT: a ``Relay`` (client side of circuit relaying:
dialing ``/p2p-circuit`` addresses, not a relay for others) and, when it has a QUIC
transport, a ``HolePuncher`` that upgrades a relayed connection to a direct one.

Given the client's reputation book (``book=``), the DHT client ranks its routing table by
it (``score``) and records in it how every DHT request to a peer ends (``on_outcome``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from dht import DHT, DhtLimits
from p2p import HolePuncher, Host, HostLimits, Relay
from security import KeyPair, ReputationBook
from transport import Multiaddr, QuicTransport, TcpTransport, Transport

from ._server_limits import ClientLimits

T = TypeVar("T")


class SwarmClient:
    """A Host and a DHT client (and NAT traversal) on a background event loop;
    ``close()`` stops them all."""

    def __init__(
        self,
        initial_peers: Iterable[Multiaddr | str],
        *,
        identity: KeyPair | None = None,
        limits: ClientLimits | None = None,
        transports: Sequence[Transport] | None = None,
        host_limits: HostLimits | None = None,
        dht_limits: DhtLimits | None = None,
        book: ReputationBook | None = None,
    ) -> None:
        self.limits = limits or ClientLimits()
        self.book = book
        """The client's reputation book, fed by the DHT client (None: none kept)."""
        self.identity = identity or KeyPair.generate()
        peers = [Multiaddr.from_string(p) if isinstance(p, str) else p for p in initial_peers]
        if not peers:
            raise ValueError("initial_peers is empty: give the multiaddr of a server or bootstrap")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="swarm-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        self.relay: Relay | None = None
        self.puncher: HolePuncher | None = None
        try:
            self.host, self.dht = self.run(
                self._start(peers, transports, host_limits, dht_limits),
                timeout=self.limits.connect_timeout_s,
            )
        except BaseException:
            self._closed = True
            self._shutdown_loop()
            raise

    async def _start(
        self,
        peers: list[Multiaddr],
        transports: Sequence[Transport] | None,
        host_limits: HostLimits | None,
        dht_limits: DhtLimits | None,
    ) -> tuple[Host, DHT]:
        identity = self.identity
        if transports is None:
            transports = [TcpTransport(identity), QuicTransport(identity)]
        quic = next((t for t in transports if isinstance(t, QuicTransport)), None)
        host = Host(identity, transports, host_limits or HostLimits())
        await host.start([])
        book = self.book
        dht = DHT(
            host,
            dht_limits or DhtLimits(),
            server_mode=False,
            identity=identity,
            score=None if book is None else book.contact_score,
            on_outcome=None if book is None else book.record_outcome,
        )
        try:
            self.relay = Relay(host, identity)
            await self.relay.start()
            if quic is not None:
                self.puncher = HolePuncher(host, quic, self.relay)
                await self.puncher.start()
            await dht.start(bootstrap=peers)
        except BaseException:
            await self._stop_traversal()
            await dht.stop()
            await host.stop()
            raise
        return host, dht

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Run ``coro`` on the client's loop and wait for its result (from another thread)."""
        if self._closed:
            coro.close()
            raise RuntimeError("this SwarmClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Stop the DHT client and the Host, then the loop and its thread (idempotent)."""
        if self._closed:
            return
        try:
            self.run(self._stop(), timeout=self.limits.connect_timeout_s)
        finally:
            self._closed = True
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _stop(self) -> None:
        await self._stop_traversal()
        await self.dht.stop()
        await self.host.stop()

    async def _stop_traversal(self) -> None:
        if self.puncher is not None:
            await self.puncher.stop()
        if self.relay is not None:
            await self.relay.stop()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
