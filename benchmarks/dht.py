"""DHT benchmark: Swarm's Kademlia against bmuller's ``kademlia`` package, in one run.

Each network grows from a single bootstrap node; random nodes store keys; sampled
nodes read every key twice: the first read gives hops and messages (the reader's table
has not met the key's holders yet) and opens connections, the second is timed with
the connections warm. Then 30 % of the nodes vanish without a goodbye and the
survivors read again. Networks:

- Swarm, real ``p2p.Host``s on the in-process memory transport: N = 100 (and, without
  ``--quick``, 1,000 and 2,000);
- Swarm, the same sans-IO cores driven by ``dht.SimNetwork`` (direct function calls, no
  transport): N = 1,000 and 2,000 under ``--quick``. Its latency is the CPU time of a
  lookup, not a network's;
- Swarm, real Hosts on QUIC over 127.0.0.1: N = 200 (``--quick``: 50);
- ``kademlia`` (UDP datagrams, no security) on 127.0.0.1: at the QUIC network's N, its
  gets interleaved with the QUIC network's, and at 200 and 1,000 (no churn: its 5 s
  request timeout per dead peer would dominate the run).

Identities come from the seed, and their proofs-of-work are solved once and kept in
``--cache-dir`` (``ProofCache``).

Prints a table, then one JSON line with ``success_<N>``, ``churn_success_<N>``,
``hops_median_<N>``, ``hops_p95_<N>``, ``get_ms_median_<N>``, ``get_ms_p95_<N>``,
``messages_per_get_<N>`` and ``mode_<N>`` per Swarm network (``mode_<N>`` = ``quic``
marks the QUIC one), the same with a ``kademlia_`` prefix for kademlia, the comparisons
``get_latency_ratio`` (Swarm QUIC / kademlia median get latency, same N, connections
warm) and ``messages_ratio`` (messages per get, same networks), ``quick`` and ``wall_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its own name, dht.py,
# would hide the dht package: drop that folder before importing the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from dht import DHT, DhtLimits, Record, SimNetwork  # noqa: E402
from dht._records import Entry  # noqa: E402
from p2p import Host  # noqa: E402
from security import IdentityProof, KeyPair, PeerId, solve_pow  # noqa: E402
from transport import MemoryHub, MemoryTransport, Multiaddr, QuicTransport  # noqa: E402

HOUR = 3600.0
QUIC_NODES = 200
QUICK_QUIC_NODES = 50
"""``--quick`` builds a smaller QUIC network: each join opens a QUIC connection to 40 to
50 peers, and at 200 nodes the handshakes and their traffic, all in this one process,
take 4 to 5 minutes alone, more than the quick run's 3."""
CHURN = 0.3
CHURN_BATCH = 50
"""Reads after churn run this many at a time: a request to a vanished QUIC peer waits
for its timeout, and the success rate, not the latency, is measured there."""


class ProofCache:
    """Identity proofs-of-work of the benchmark's identities, solved once and kept on disk.

    Every identity here comes from the seed (``KeyPair.from_seed``, ``SimNetwork``'s
    seeded PeerIDs), so each run meets the same public keys: a node pays its proof once
    in its life, not at every join, and neither does the benchmark after its first run.
    """

    def __init__(self, path: Path, difficulty: int) -> None:
        self.path = path
        self.difficulty = difficulty
        self.solved = 0
        try:
            self.nonces: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.nonces = {}

    def nonce(self, public_key: bytes) -> bytes:
        found = self.nonces.get(public_key.hex())
        if found is None:
            found = solve_pow(public_key, self.difficulty).nonce.hex()
            self.nonces[public_key.hex()] = found
            self.solved += 1
        return bytes.fromhex(found)

    def save(self) -> None:
        if self.solved:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(self.nonces))
            partial.replace(self.path)
            self.solved = 0


@dataclass
class Run:
    """What one network measured."""

    system: str
    mode: str
    nodes: int
    join_s: float = 0.0
    gets: int = 0
    success: float = 0.0
    """Found / reads over both passes (a running count until the timed pass ends)."""
    churn_success: float | None = None
    hops: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float | str | None]:
        return {
            "mode": self.mode,
            "success": round(self.success, 4),
            "churn_success": None if self.churn_success is None else round(self.churn_success, 4),
            "hops_median": statistics.median(self.hops),
            "hops_p95": percentile(self.hops, 95),
            "get_ms_median": round(statistics.median(self.latency_ms), 3),
            "get_ms_p95": round(percentile(self.latency_ms, 95), 3),
            "messages_per_get": round(statistics.mean(self.messages), 3),
        }


def percentile(values: list[float] | list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def workload(rng: random.Random, keys: int) -> list[bytes]:
    return [b"bench-key-%d-%d" % (i, rng.getrandbits(32)) for i in range(keys)]


@dataclass(frozen=True, slots=True)
class Read:
    """One get: whether it found the value, its hops and the requests it cost."""

    ok: bool
    hops: int
    messages: int


class Network:
    """What every benchmarked network offers; readers are indices of live nodes."""

    run: Run

    async def build(self) -> None: ...

    async def store(self, name: bytes) -> None: ...

    async def read(self, name: bytes, reader: int) -> Read: ...

    def readers(self) -> list[int]: ...

    async def churn(self, rng: random.Random) -> None: ...

    async def close(self) -> None: ...


class SwarmNetwork(Network):
    """Swarm DHT nodes on real Hosts (memory transport or QUIC over 127.0.0.1)."""

    def __init__(self, kind: str, n: int, seed: int, proofs: ProofCache) -> None:
        self.run = Run("swarm", kind, n)
        self.kind = kind
        self.proofs = proofs
        self.n = n
        self.rng = random.Random(seed)
        self.hub = MemoryHub()
        self.nodes: list[DHT] = []
        self.dead: set[int] = set()
        self.expiry = time.time() + HOUR

    async def _make(self) -> DHT:
        identity = KeyPair.from_seed(self.rng.randbytes(32))
        proof = IdentityProof(self.proofs.nonce(identity.peer_id.public_key()))
        if self.kind == "memory":
            host = Host(identity, [MemoryTransport(identity, hub=self.hub)])
            await host.start([Multiaddr.for_memory("0")])
        else:
            host = Host(identity, [QuicTransport(identity)])
            await host.start([Multiaddr.for_quic("127.0.0.1", 0)])
        rng = random.Random(self.rng.getrandbits(64))
        return DHT(host, identity=identity, rng=rng, proof=proof)

    async def build(self) -> None:
        for i in range(self.n):
            node = await self._make()
            self.nodes.append(node)
            await node.start([self.nodes[0].host.addrs[0]] if i else [])
        self.proofs.save()

    async def store(self, name: bytes) -> None:
        await self.rng.choice(self.nodes).store(name, b"value:" + name, self.expiry)

    async def read(self, name: bytes, reader: int) -> Read:
        node = self.nodes[reader]
        answer = await node.get(name)
        ok = answer == Record(b"value:" + name, self.expiry)
        return Read(ok, node.last_lookup.hops, node.last_lookup.messages)

    def readers(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.dead]

    async def churn(self, rng: random.Random) -> None:
        self.dead = set(rng.sample(range(self.n), int(CHURN * self.n)))
        for index in self.dead:
            await self.nodes[index].host.stop()

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
            await node.host.stop()


class SimulatedNetwork(Network):
    """The same cores in ``dht.SimNetwork``: direct calls, no transport, no event loop."""

    def __init__(self, n: int, seed: int, proofs: ProofCache) -> None:
        self.run = Run("swarm", "sim", n)
        self.n = n
        self.net = SimNetwork(seed=seed, now=time.time())
        self.proofs = proofs
        self.peers: list[PeerId] = []

    def _add(self, bootstrap: PeerId | None) -> PeerId:
        peer = self.net.new_peer_id()
        proof = self.proofs.nonce(peer.public_key())
        return self.net.add_node(bootstrap, peer_id=peer, proof=proof)

    async def build(self) -> None:
        boot = self._add(None)
        self.peers = [boot] + [self._add(boot) for _ in range(self.n - 1)]
        self.proofs.save()

    async def store(self, name: bytes) -> None:
        entry = Entry(name, None, b"value:" + name, self.net.now + HOUR)
        self.net.store(self.net.rng.choice(self.peers), entry)

    async def read(self, name: bytes, reader: int) -> Read:
        result = self.net.get(self.peers[reader], name)
        ok = [e.value for e in result.entries] == [b"value:" + name]
        return Read(ok, result.hops, result.messages)

    def readers(self) -> list[int]:
        return [i for i, p in enumerate(self.peers) if p in self.net.alive]

    async def churn(self, rng: random.Random) -> None:
        for peer in rng.sample(self.peers, int(CHURN * self.n)):
            self.net.kill(peer)

    async def close(self) -> None:
        return None


class KademliaNetwork(Network):
    """bmuller's ``kademlia``: UDP datagrams on 127.0.0.1, requests counted as received."""

    def __init__(self, n: int, seed: int) -> None:
        from kademlia.network import Server
        from kademlia.protocol import KademliaProtocol

        class CountingProtocol(KademliaProtocol):
            requests = 0

            async def _accept_request(self, msg_id, data, address):  # type: ignore[no-untyped-def]
                CountingProtocol.requests += 1
                return await super()._accept_request(msg_id, data, address)

        class CountingServer(Server):
            protocol_class = CountingProtocol

        self.counter = CountingProtocol
        self.server_class = CountingServer
        self.run = Run("kademlia", "udp", n)
        self.n = n
        self.rng = random.Random(seed)
        self.servers: list[Server] = []

    async def build(self) -> None:
        for i in range(self.n):
            server = self.server_class(node_id=self.rng.randbytes(20))
            await server.listen(0, interface="127.0.0.1")
            self.servers.append(server)
            if i:
                port = self.servers[0].transport.get_extra_info("sockname")[1]
                await server.bootstrap([("127.0.0.1", port)])

    async def store(self, name: bytes) -> None:
        await self.rng.choice(self.servers).set(name, b"value:" + name)

    async def read(self, name: bytes, reader: int) -> Read:
        before = self.counter.requests
        answer = await self.servers[reader].get(name)
        return Read(answer == b"value:" + name, 0, self.counter.requests - before)

    def readers(self) -> list[int]:
        return list(range(self.n))

    async def close(self) -> None:
        for server in self.servers:
            server.stop()
            for _, timer in server.protocol._outstanding.values():
                timer.cancel()
        self.servers.clear()
        # kademlia leaves refresh and welcome tasks behind: end them (and only them)
        leftovers = [t for t in asyncio.all_tasks() if _is_kademlia(t)]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


def _is_kademlia(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    if code is None:
        return False
    return any(part in code.co_filename for part in ("/kademlia/", "/rpcudp/")) or (
        code.co_filename == __file__ and code.co_name == "_accept_request"
    )


async def prepare(net: Network, keys: int, readers: int, seed: int) -> list[tuple[bytes, int]]:
    """Build ``net``, store the keys, pick (key, reader) pairs and read each once.

    That first read is the one whose hops and messages count: the reader's routing
    table has not met the key's holders yet. It also opens the connections that the
    second, timed read finds warm.
    """
    rng = random.Random(seed)
    started = time.perf_counter()
    await net.build()
    net.run.join_s = time.perf_counter() - started
    names = workload(rng, keys)
    for name in names:
        await net.store(name)
    pairs = [(name, r) for name in names for r in rng.sample(net.readers(), readers)]
    for name, reader in pairs:
        read = await net.read(name, reader)
        net.run.hops.append(read.hops)
        net.run.messages.append(read.messages)
        net.run.success += read.ok
    return pairs


async def measure(net: Network, name: bytes, reader: int) -> None:
    begin = time.perf_counter()
    read = await net.read(name, reader)
    net.run.latency_ms.append((time.perf_counter() - begin) * 1000)
    net.run.gets += 1
    net.run.success += read.ok


async def churn(net: Network, pairs: list[tuple[bytes, int]], seed: int) -> None:
    """Kill 30 % of the nodes without a goodbye, then read the keys from survivors."""
    rng = random.Random(seed + 1)
    await net.churn(rng)
    names = sorted({name for name, _ in pairs})
    per_key = len(pairs) // len(names)
    again = [(name, r) for name in names for r in rng.sample(net.readers(), per_key)]
    found = 0
    for first in range(0, len(again), CHURN_BATCH):
        batch = again[first : first + CHURN_BATCH]
        reads = await asyncio.gather(*(net.read(name, r) for name, r in batch))
        found += sum(read.ok for read in reads)
    net.run.churn_success = found / len(again)


async def bench(net: Network, keys: int, readers: int, seed: int, *, churned: bool) -> Run:
    try:
        pairs = await prepare(net, keys, readers, seed)
        for name, reader in pairs:
            await measure(net, name, reader)
        net.run.success /= 2 * net.run.gets
        if churned:
            await churn(net, pairs, seed)
    finally:
        await net.close()
    return net.run


async def bench_pair(
    ours: Network, theirs: Network, keys: int, readers: int, seed: int
) -> tuple[Run, Run]:
    """Both networks up at once and their gets interleaved one by one, so that both
    latencies see the same machine load; then ours goes through churn."""
    try:
        ours_pairs = await prepare(ours, keys, readers, seed)
        theirs_pairs = await prepare(theirs, keys, readers, seed)
        for (a_name, a_reader), (b_name, b_reader) in zip(ours_pairs, theirs_pairs, strict=True):
            await measure(ours, a_name, a_reader)
            await measure(theirs, b_name, b_reader)
        ours.run.success /= 2 * ours.run.gets
        theirs.run.success /= 2 * theirs.run.gets
        await theirs.close()
        await churn(ours, ours_pairs, seed)
    finally:
        await theirs.close()
        await ours.close()
    return ours.run, theirs.run


# -- report --------------------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    head = (
        f"{'system':<9}{'mode':<8}{'nodes':>6}{'join s':>8}{'gets':>6}{'success':>9}"
        f"{'churn':>8}{'hops p50':>9}{'hops p95':>9}{'get ms p50':>11}{'get ms p95':>11}"
        f"{'msgs/get':>9}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        s = run.summary()
        churn = "-" if s["churn_success"] is None else f"{s['churn_success']:.3f}"
        hops = ("-", "-") if run.system == "kademlia" else (s["hops_median"], s["hops_p95"])
        lines.append(
            f"{run.system:<9}{run.mode:<8}{run.nodes:>6}{run.join_s:>8.1f}{run.gets:>6}"
            f"{s['success']:>9.3f}{churn:>8}{hops[0]:>9}{hops[1]:>9}"
            f"{s['get_ms_median']:>11.3f}{s['get_ms_p95']:>11.3f}{s['messages_per_get']:>9.2f}"
        )
    return "\n".join(lines)


def report(runs: list[Run]) -> dict[str, object]:
    out: dict[str, object] = {}
    for run in runs:
        prefix = "kademlia_" if run.system == "kademlia" else ""
        for name, value in run.summary().items():
            if run.system == "kademlia" and name in ("hops_median", "hops_p95", "churn_success"):
                continue
            out[f"{prefix}{name}_{run.nodes}"] = value
    quic = next(r for r in runs if r.mode == "quic")
    kad = next(r for r in runs if r.system == "kademlia" and r.nodes == quic.nodes)
    out["get_latency_ratio"] = round(
        statistics.median(quic.latency_ms) / statistics.median(kad.latency_ms), 3
    )
    out["messages_ratio"] = round(
        statistics.mean(quic.messages) / max(statistics.mean(kad.messages), 1e-9), 3
    )
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under three minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm")) / "bench",
        help="where the identities' proofs-of-work are kept between runs",
    )
    args = parser.parse_args()
    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    keys, readers = (20, 10) if args.quick else (50, 20)
    quic_nodes = QUICK_QUIC_NODES if args.quick else QUIC_NODES
    limits = DhtLimits()
    proofs = ProofCache(
        args.cache_dir / f"dht-proofs-{limits.pow_difficulty}.json", limits.pow_difficulty
    )
    runs: list[Run] = []
    started = time.perf_counter()
    phase = started

    def note(run: Run) -> None:
        nonlocal phase
        runs.append(run)
        line = table([run]).splitlines()[-1]
        print(f"{line}   ({time.perf_counter() - phase:.0f} s)", file=sys.stderr, flush=True)
        phase = time.perf_counter()

    seed = args.seed
    quic, kademlia = await bench_pair(
        SwarmNetwork("quic", quic_nodes, seed, proofs),
        KademliaNetwork(quic_nodes, seed),
        keys,
        readers,
        seed,
    )
    note(quic)
    note(kademlia)
    for n in sorted({QUIC_NODES, 1000} - {quic_nodes}):
        note(await bench(KademliaNetwork(n, seed), keys, readers, seed, churned=False))
    note(await bench(SwarmNetwork("memory", 100, seed, proofs), keys, readers, seed, churned=True))
    for n in (1000, 2000):
        net: Network = (
            SimulatedNetwork(n, seed, proofs)
            if args.quick
            else SwarmNetwork("memory", n, seed, proofs)
        )
        note(await bench(net, keys, readers, seed, churned=True))
    print(table(runs))
    out = report(runs)
    out["quick"] = args.quick
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
