"""Helpers for the DHT tests: seeded identities, a fake clock, clusters of real nodes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from functools import lru_cache

from dht import DHT, DhtLimits, Entry, sign_entry
from dht._contact import Contact
from p2p import Host
from security import IdentityProof, KeyPair, PeerId, solve_pow
from transport import MemoryHub, MemoryTransport, Multiaddr, QuicTransport, Transport


class FakeClock:
    """Wall time that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_peer(rng: random.Random) -> PeerId:
    """A PeerID from seeded randomness (any 32 bytes are a well-formed Ed25519 key ID)."""
    return PeerId.from_public_key(rng.randbytes(32))


def contact(rng: random.Random, ip: str | None = None) -> Contact:
    return Contact(fake_peer(rng), (), ip)


@lru_cache(maxsize=1024)
def proof_of(public_key: bytes, difficulty: int = DhtLimits().pow_difficulty) -> IdentityProof:
    """An identity proof-of-work for ``public_key`` (solved once per key and difficulty)."""
    return solve_pow(public_key, difficulty)


def signed(
    identity: KeyPair, key: bytes, value: bytes, expiry: float, *, subkey: bytes | None = None
) -> Entry:
    """``sign_entry`` with the identity's proof-of-work at the default difficulty."""
    proof = proof_of(identity.public_key)
    return sign_entry(identity, key, value, expiry, subkey=subkey, proof=proof)


class Cluster:
    """DHT nodes on real Hosts, on one private memory hub or on QUIC over 127.0.0.1.

    ``await cluster.add()`` starts a Host and a DHT joined through the first node;
    ``kill`` stops a node's Host without any goodbye; ``close`` stops everything.
    """

    def __init__(
        self,
        kind: str = "memory",
        limits: DhtLimits = DhtLimits(),  # noqa: B008 - frozen value
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind
        self.limits = limits
        self.clock = clock
        self.hub = MemoryHub()
        self.nodes: list[DHT] = []
        self.dead: set[PeerId] = set()

    def _transport(self, identity: KeyPair) -> Transport:
        if self.kind == "memory":
            return MemoryTransport(identity, hub=self.hub)
        return QuicTransport(identity)

    def _listen(self) -> Multiaddr:
        if self.kind == "memory":
            return Multiaddr.for_memory("0")
        return Multiaddr.for_quic("127.0.0.1", 0)

    async def add(
        self,
        *,
        identity: KeyPair | None = None,
        join: bool = True,
        server_mode: bool = True,
        limits: DhtLimits | None = None,
    ) -> DHT:
        identity = identity or KeyPair.generate()
        host = Host(identity, [self._transport(identity)])
        await host.start([self._listen()])
        node = DHT(
            host,
            limits or self.limits,
            server_mode=server_mode,
            clock=self.clock,
            identity=identity,
        )
        self.nodes.append(node)
        bootstrap = [self.nodes[0].host.addrs[0]] if join and len(self.nodes) > 1 else []
        await node.start(bootstrap)
        return node

    async def grow(self, count: int) -> None:
        for _ in range(count):
            await self.add()

    @property
    def alive(self) -> list[DHT]:
        return [n for n in self.nodes if n.peer_id not in self.dead]

    async def kill(self, node: DHT) -> None:
        """The node vanishes: its Host stops, its DHT says nothing to anyone."""
        self.dead.add(node.peer_id)
        await node.host.stop()

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
            await node.host.stop()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds, polling; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
