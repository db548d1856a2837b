"""Whole networks on real Hosts: 200 nodes on the memory transport, 30 on QUIC over
loopback, each grown from a single bootstrap node; churn without goodbyes; a node
bombarded by hundreds of identities from one IP group."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from dht import DHT, PROTOCOL_ID, DhtLimits, Record, bucket_index
from dht._messages import Ping, encode_request
from p2p import Host
from security import KeyPair
from tests.dht.dht_helpers import Cluster, proof_of
from transport import Multiaddr, QuicTransport

HOUR = 3600.0


async def check_network(cluster: Cluster, keys: int, readers: int, rng: random.Random) -> None:
    """Store ``keys`` keys (one with sub-keys from several servers), read every one from
    ``readers`` sampled nodes, kill 30 % of the nodes, read again."""
    expiry = time.time() + HOUR
    names = [b"key-%d" % i for i in range(keys)]
    for name in names:
        await rng.choice(cluster.nodes).store(name, b"value of " + name, expiry)
    servers = rng.sample(cluster.nodes, 5)
    for server in servers:
        await server.store(b"model/M/block/7", b"online", expiry, subkey=server.peer_id)
    hosting = {s.peer_id.to_bytes(): Record(b"online", expiry) for s in servers}

    for name in names:
        for reader in rng.sample(cluster.nodes, readers):
            assert await reader.get(name) == Record(b"value of " + name, expiry), (name, reader)
    for reader in rng.sample(cluster.nodes, readers):
        assert await reader.get(b"model/M/block/7", latest=True) == hosting

    for victim in rng.sample(cluster.nodes, int(0.3 * len(cluster.nodes))):
        await cluster.kill(victim)

    async def read(name: bytes, reader: DHT) -> bool:
        return await reader.get(name) == Record(b"value of " + name, expiry)

    # reads run ten at a time: a request to a vanished QUIC peer waits for its timeout
    pairs = [(name, reader) for name in names for reader in rng.sample(cluster.alive, readers)]
    found = 0
    for first in range(0, len(pairs), 10):
        batch = pairs[first : first + 10]
        found += sum(await asyncio.gather(*(read(name, reader) for name, reader in batch)))
    assert found / len(pairs) >= 0.99, f"{found}/{len(pairs)} found after churn"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_200_nodes_on_the_memory_transport_form_one_network() -> None:
    rng = random.Random(200)
    cluster = Cluster()
    try:
        await cluster.grow(200)
        sizes = sorted(len(n.routing_table) for n in cluster.nodes)
        assert sizes[0] >= 20, sizes
        await check_network(cluster, keys=25, readers=20, rng=rng)
        hops = [n.last_lookup.hops for n in cluster.alive]
        assert max(hops) <= 4
    finally:
        await cluster.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_30_nodes_on_quic_over_loopback_form_one_network() -> None:
    rng = random.Random(30)
    cluster = Cluster(kind="quic")
    try:
        await cluster.grow(30)
        assert all(str(n.host.addrs[0]).startswith("/ip4/127.0.0.1/udp/") for n in cluster.nodes)
        assert min(len(n.routing_table) for n in cluster.nodes) >= 20
        await check_network(cluster, keys=15, readers=10, rng=rng)
    finally:
        await cluster.close()


async def bombard(target: Multiaddr, identities: int) -> None:
    """``identities`` fresh QUIC hosts on 127.0.0.1 each announce themselves to ``target``,
    their identity proof-of-work paid."""
    for _ in range(identities):
        identity = KeyPair.generate()
        host = Host(identity, [QuicTransport(identity)])
        await host.start([Multiaddr.for_quic("127.0.0.1", 0)])
        try:
            await host.connect(target)
            proof = proof_of(identity.public_key).nonce
            request = encode_request(Ping(), tuple(host.listen_addrs), proof)
            reply = await host.rpc_call(target.peer_id, PROTOCOL_ID, request)
            assert "refused" not in reply.value
        finally:
            await host.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_one_ip_group_gets_at_most_10_slots_when_loopback_is_not_exempt() -> None:
    limits = DhtLimits(exempt_private_addrs=False)
    cluster = Cluster(kind="quic", limits=limits)
    try:
        victim = await cluster.add()
        await bombard(victim.host.addrs[0], 300)
        table = victim.routing_table
        assert len(table) == table.group_count("127.0.0.0/24") == 10
        per_bucket: dict[int, int] = {}
        for peer in table:
            index = bucket_index(table.local_id, peer.node_id)
            per_bucket[index] = per_bucket.get(index, 0) + 1
        assert max(per_bucket.values()) <= 2
        assert victim.stats().rejected_by_diversity >= 200
    finally:
        await cluster.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_loopback_is_exempt_from_the_caps_by_default() -> None:
    cluster = Cluster(kind="quic")
    try:
        victim = await cluster.add()
        await bombard(victim.host.addrs[0], 40)
        assert len(victim.routing_table) > 30
        assert victim.stats().rejected_by_diversity == 0
    finally:
        await cluster.close()
