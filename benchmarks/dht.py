"""DHT benchmark: Swarm's Kademlia against bmuller's ``kademlia`` package, in one run.

Each network grows from a single bootstrap node; random nodes store keys; sampled
nodes read every key (a first, unmeasured pass warms the connections, the second is
measured); then 30 % of the nodes vanish without a goodbye and the survivors read
again. Networks:

- Swarm, real ``p2p.Host``s on the in-process memory transport: N = 100 (and, without
  ``--quick``, 1,000 and 2,000);
- Swarm, the same sans-IO cores driven by ``dht.SimNetwork`` (direct function calls, no
  transport): N = 1,000 and 2,000 under ``--quick``. Its latency is the CPU time of a
  lookup, not a network's;
- Swarm, real Hosts on QUIC over 127.0.0.1: N = 200;
- ``kademlia`` (UDP datagrams, no security) on 127.0.0.1: N = 200 and 1,000 (no churn:
  its 5 s request timeout per dead peer would dominate the run).

Prints a table, then one JSON line with ``success_<N>``, ``churn_success_<N>``,
``hops_median_<N>``, ``hops_p95_<N>``, ``get_ms_median_<N>``, ``get_ms_p95_<N>``,
``messages_per_get_<N>`` and ``mode_<N>`` per Swarm network (N = 200 is the QUIC one),
the same with a ``kademlia_`` prefix for kademlia, and the comparisons
``get_latency_ratio`` (Swarm QUIC / kademlia median get latency, both at 200 nodes,
connections warm) and ``messages_ratio`` (messages per get, same networks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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

from dht import DHT, Record, SimNetwork  # noqa: E402
from dht._records import Entry  # noqa: E402
from p2p import Host  # noqa: E402
from security import KeyPair  # noqa: E402
from transport import MemoryHub, MemoryTransport, Multiaddr, QuicTransport  # noqa: E402

HOUR = 3600.0
CHURN = 0.3
CHURN_BATCH = 20
"""Reads after churn run this many at a time: a request to a vanished QUIC peer waits
for its timeout, and the success rate, not the latency, is measured there."""


@dataclass
class Run:
    """What one network measured."""

    system: str
    mode: str
    nodes: int
    join_s: float = 0.0
    gets: int = 0
    success: float = 0.0
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


# -- Swarm on real Hosts -------------------------------------------------------------------


async def swarm_network(kind: str, n: int, keys: int, readers: int, seed: int) -> Run:
    rng = random.Random(seed)
    hub = MemoryHub()
    nodes: list[DHT] = []
    run = Run("swarm", kind, n)

    async def make() -> DHT:
        identity = KeyPair.generate()
        if kind == "memory":
            host = Host(identity, [MemoryTransport(identity, hub=hub)])
            await host.start([Multiaddr.for_memory("0")])
        else:
            host = Host(identity, [QuicTransport(identity)])
            await host.start([Multiaddr.for_quic("127.0.0.1", 0)])
        return DHT(host, identity=identity, rng=random.Random(rng.getrandbits(64)))

    try:
        started = time.perf_counter()
        for i in range(n):
            node = await make()
            nodes.append(node)
            await node.start([nodes[0].host.addrs[0]] if i else [])
        run.join_s = time.perf_counter() - started
        expiry = time.time() + HOUR
        names = workload(rng, keys)
        for name in names:
            await rng.choice(nodes).store(name, b"value:" + name, expiry)
        pairs = [(name, reader) for name in names for reader in rng.sample(nodes, readers)]
        for name, reader in pairs:
            await reader.get(name)
        found = 0
        for name, reader in pairs:
            begin = time.perf_counter()
            answer = await reader.get(name)
            run.latency_ms.append((time.perf_counter() - begin) * 1000)
            found += answer == Record(b"value:" + name, expiry)
            run.hops.append(reader.last_lookup.hops)
            run.messages.append(reader.last_lookup.messages)
        run.gets = len(pairs)
        run.success = found / len(pairs)
        dead = set(rng.sample(range(n), int(CHURN * n)))
        for index in dead:
            await nodes[index].host.stop()
        alive = [node for i, node in enumerate(nodes) if i not in dead]
        churn_pairs = [(name, reader) for name in names for reader in rng.sample(alive, readers)]

        async def read(name: bytes, reader: DHT) -> bool:
            return await reader.get(name) == Record(b"value:" + name, expiry)

        found = 0
        for first in range(0, len(churn_pairs), CHURN_BATCH):
            batch = churn_pairs[first : first + CHURN_BATCH]
            found += sum(await asyncio.gather(*(read(name, reader) for name, reader in batch)))
        run.churn_success = found / len(churn_pairs)
    finally:
        for node in nodes:
            await node.stop()
            await node.host.stop()
    return run


# -- Swarm simulated -----------------------------------------------------------------------


def swarm_simulated(n: int, keys: int, readers: int, seed: int) -> Run:
    net = SimNetwork(seed=seed, now=time.time())
    rng = random.Random(seed)
    run = Run("swarm", "sim", n)
    started = time.perf_counter()
    boot = net.add_node()
    peers = [boot] + [net.add_node(boot) for _ in range(n - 1)]
    run.join_s = time.perf_counter() - started
    names = workload(rng, keys)
    for name in names:
        net.store(rng.choice(peers), Entry(name, None, b"value:" + name, net.now + HOUR))
    pairs = [(name, reader) for name in names for reader in rng.sample(peers, readers)]
    found = 0
    for name, reader in pairs:
        begin = time.perf_counter()
        result = net.get(reader, name)
        run.latency_ms.append((time.perf_counter() - begin) * 1000)
        found += [e.value for e in result.entries] == [b"value:" + name]
        run.hops.append(result.hops)
        run.messages.append(result.messages)
    run.gets = len(pairs)
    run.success = found / len(pairs)
    for peer in rng.sample(peers, int(CHURN * n)):
        net.kill(peer)
    alive = [p for p in peers if p in net.alive]
    churn_pairs = [(name, reader) for name in names for reader in rng.sample(alive, readers)]
    found = sum(
        [e.value for e in net.get(reader, name).entries] == [b"value:" + name]
        for name, reader in churn_pairs
    )
    run.churn_success = found / len(churn_pairs)
    return run


# -- bmuller's kademlia --------------------------------------------------------------------


async def kademlia_network(n: int, keys: int, readers: int, seed: int) -> Run:
    from kademlia.network import Server
    from kademlia.protocol import KademliaProtocol

    class CountingProtocol(KademliaProtocol):
        requests = 0

        async def _accept_request(self, msg_id, data, address):  # type: ignore[no-untyped-def]
            CountingProtocol.requests += 1
            return await super()._accept_request(msg_id, data, address)

    class CountingServer(Server):
        protocol_class = CountingProtocol

    rng = random.Random(seed)
    run = Run("kademlia", "udp", n)
    servers: list[CountingServer] = []
    ours = asyncio.all_tasks()
    try:
        started = time.perf_counter()
        for i in range(n):
            server = CountingServer(node_id=rng.randbytes(20))
            await server.listen(0, interface="127.0.0.1")
            servers.append(server)
            if i:
                port = servers[0].transport.get_extra_info("sockname")[1]
                await server.bootstrap([("127.0.0.1", port)])
        run.join_s = time.perf_counter() - started
        names = workload(rng, keys)
        for name in names:
            await rng.choice(servers).set(name, b"value:" + name)
        pairs = [(name, reader) for name in names for reader in rng.sample(servers, readers)]
        for name, reader in pairs:
            await reader.get(name)
        found = 0
        for name, reader in pairs:
            before = CountingProtocol.requests
            begin = time.perf_counter()
            answer = await reader.get(name)
            run.latency_ms.append((time.perf_counter() - begin) * 1000)
            run.messages.append(CountingProtocol.requests - before)
            found += answer == b"value:" + name
        run.gets = len(pairs)
        run.success = found / len(pairs)
        run.hops = [0]
    finally:
        for server in servers:
            server.stop()
        # kademlia leaves refresh and welcome tasks behind: end them with the run
        leftovers = asyncio.all_tasks() - ours
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
    return run


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
    args = parser.parse_args()
    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    keys, readers = (20, 10) if args.quick else (50, 20)
    runs: list[Run] = []

    def note(run: Run) -> None:
        runs.append(run)
        print(table([run]).splitlines()[-1], file=sys.stderr, flush=True)

    note(await kademlia_network(200, keys, readers, args.seed))
    note(await swarm_network("quic", 200, keys, readers, args.seed))
    note(await kademlia_network(1000, keys, readers, args.seed))
    note(await swarm_network("memory", 100, keys, readers, args.seed))
    for n in (1000, 2000):
        if args.quick:
            note(swarm_simulated(n, keys, readers, args.seed))
        else:
            note(await swarm_network("memory", n, keys, readers, args.seed))
    print(table(runs))
    print(json.dumps(report(runs)))


if __name__ == "__main__":
    asyncio.run(main())
