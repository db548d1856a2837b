"""The DHT node on real Hosts over the memory transport: API, wire refusals, maintenance."""

from __future__ import annotations

import dataclasses
import time

import pytest

from dht import (
    DHT,
    PROTOCOL_ID,
    BadSignature,
    DhtConfigError,
    DhtLimits,
    ExpiryTooFar,
    NotBootstrapped,
    Record,
    RecordExpired,
    RecordTooLarge,
    RefusalCode,
    bucket_index,
    key_id,
    node_id,
    sign_entry,
)
from dht._messages import Store, encode_request
from dht._records import Entry
from p2p import Host, ProtocolNotSupported
from security import KeyPair
from tests.dht.dht_helpers import Cluster, FakeClock, eventually, signed
from transport import MemoryTransport, Multiaddr

HOUR = 3600.0


async def attacker_host(cluster: Cluster) -> Host:
    """A bare Host on the cluster's hub: it speaks the DHT wire protocol by hand."""
    identity = KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await host.start([Multiaddr.for_memory("0")])
    return host


async def raw_store(host: Host, target: DHT, entries: list[Entry]) -> list[RefusalCode]:
    await host.connect(target.host.addrs[0])
    message = encode_request(Store(entries[0].key, tuple(entries)), None)
    reply = await host.rpc_call(target.peer_id, PROTOCOL_ID, message)
    return [RefusalCode(c) for c in reply.value["codes"]]


async def test_store_and_get_plain_values(cluster: Cluster) -> None:
    await cluster.grow(8)
    expiry = time.time() + HOUR
    writer, reader = cluster.nodes[3], cluster.nodes[6]
    assert await writer.store("model/M/config", b"hello", expiry) >= 1
    assert await reader.get("model/M/config") == Record(b"hello", expiry)
    assert await reader.get("absent") is None
    # a later expiry replaces the value; an earlier one does not
    await writer.store("model/M/config", b"newer", expiry + 10)
    assert (await reader.get("model/M/config", latest=True)).value == b"newer"


async def test_subkeys_list_every_server_with_its_own_signed_line(cluster: Cluster) -> None:
    await cluster.grow(8)
    expiry = time.time() + HOUR
    for i, node in enumerate(cluster.nodes[:4]):
        await node.store(b"model/M/block/7", b"online %d" % i, expiry + i, subkey=node.peer_id)
    await cluster.nodes[1].store(b"model/M/block/7", b"note", expiry, subkey=b"comment")
    found = await cluster.nodes[7].get(b"model/M/block/7")
    assert isinstance(found, dict)
    expected = {
        n.peer_id.to_bytes(): Record(b"online %d" % i, expiry + i)
        for i, n in enumerate(cluster.nodes[:4])
    }
    assert found == {**expected, b"comment": Record(b"note", expiry)}


async def test_a_peers_subkey_cannot_be_overwritten_by_another_peer(cluster: Cluster) -> None:
    await cluster.grow(5)
    alice = cluster.nodes[1]
    mallory_identity = KeyPair.generate()
    mallory = await cluster.add(identity=mallory_identity)
    expiry = time.time() + HOUR
    await alice.store(b"block/7", b"alice online", expiry, subkey=alice.peer_id)
    with pytest.raises(BadSignature):
        await mallory.store(b"block/7", b"evil", expiry + 10, subkey=alice.peer_id)
    # by hand on the wire: a forged signature and an unsigned entry, sent to every node
    cell = alice.peer_id.to_bytes()
    proof = alice.identity_proof.nonce  # public: anyone can copy it
    forged = sign_entry(mallory_identity, b"block/7", b"evil", expiry + 10, subkey=cell)
    forged = dataclasses.replace(forged, proof=proof)
    unsigned = Entry(b"block/7", cell, b"evil", expiry + 10, proof=proof)
    attacker = await attacker_host(cluster)
    try:
        for node in cluster.nodes:
            codes = await raw_store(attacker, node, [forged, unsigned])
            assert codes == [RefusalCode.BAD_SIGNATURE, RefusalCode.BAD_SIGNATURE]
            assert node.stats().refusals["BAD_SIGNATURE"] == 2
    finally:
        await attacker.stop()
    for node in cluster.nodes:
        assert await node.get(b"block/7", latest=True) == {cell: Record(b"alice online", expiry)}


async def test_forged_replayed_expired_and_oversized_stores_are_refused(cluster: Cluster) -> None:
    await cluster.grow(3)
    victim = cluster.nodes[1]
    owner = KeyPair.generate()
    now = time.time()
    old = signed(owner, b"k", b"v1", now + HOUR)
    new = signed(owner, b"k", b"v2", now + 2 * HOUR)
    attacker = await attacker_host(cluster)
    try:
        assert await raw_store(attacker, victim, [old, new]) == [RefusalCode.OK, RefusalCode.OK]
        cases = [
            (old, RefusalCode.STALE),  # replayed: older than what is held
            (dataclasses.replace(new, value=b"v3"), RefusalCode.BAD_SIGNATURE),  # forged
            (Entry(b"e", None, b"v", now - 1), RefusalCode.EXPIRED),
            (Entry(b"f", None, b"v", now + 49 * HOUR), RefusalCode.EXPIRY_TOO_FAR),
            (Entry(b"g", None, b"v" * 65536, now + HOUR), RefusalCode.TOO_LARGE),
            (dataclasses.replace(new, proof=b""), RefusalCode.INSUFFICIENT_POW),
        ]
        for entry, code in cases:
            assert await raw_store(attacker, victim, [entry]) == [code]
    finally:
        await attacker.stop()
    stats = victim.stats()
    assert stats.refusals == {
        "STALE": 1,
        "BAD_SIGNATURE": 1,
        "EXPIRED": 1,
        "EXPIRY_TOO_FAR": 1,
        "TOO_LARGE": 1,
        "INSUFFICIENT_POW": 1,
    }
    assert stats.records == 1
    assert await victim.get(b"k") == {owner.peer_id.to_bytes(): Record(b"v2", now + 2 * HOUR)}
    for missing in (b"e", b"f", b"g"):
        assert await victim.get(missing) is None


async def test_stores_over_the_senders_quota_are_refused(cluster: Cluster) -> None:
    await cluster.add()
    victim = await cluster.add(limits=DhtLimits(per_peer_quota_bytes=300))
    expiry = time.time() + HOUR
    attacker = await attacker_host(cluster)
    try:
        first, second = (Entry(b"k", sub, b"x" * 200, expiry) for sub in (b"a", b"b"))
        assert await raw_store(attacker, victim, [first, second]) == [
            RefusalCode.OK,
            RefusalCode.QUOTA,
        ]
    finally:
        await attacker.stop()
    assert victim.stats().refusals == {"QUOTA": 1}
    assert victim.get_local(b"k") == {b"a": Record(b"x" * 200, expiry)}


async def test_local_checks_raise_typed_errors_before_sending(cluster: Cluster) -> None:
    await cluster.grow(2)
    node = cluster.nodes[1]
    now = time.time()
    with pytest.raises(RecordExpired):
        await node.store(b"k", b"v", now - 1)
    with pytest.raises(ExpiryTooFar):
        await node.store(b"k", b"v", now + 49 * HOUR)
    with pytest.raises(RecordTooLarge):
        await node.store(b"k", b"v" * 70_000, now + HOUR)
    sent = node.stats().requests_sent
    with pytest.raises(RecordExpired):
        await node.store(b"k", b"v", now - 1)
    assert node.stats().requests_sent == sent


async def test_malformed_requests_are_refused_and_the_node_keeps_serving(cluster) -> None:
    await cluster.grow(2)
    victim = cluster.nodes[0]
    attacker = await attacker_host(cluster)
    try:
        await attacker.connect(victim.host.addrs[0])
        for garbage in (
            [1, 2],
            {"op": "find_node", "id": b"short"},
            {"op": "nope"},
            "x",
            {"op": "store", "key": b"k", "entries": [[None, b"v"]]},
            {"op": "ping", "from": [b"\xff\xff"]},
        ):
            reply = await attacker.rpc_call(victim.peer_id, PROTOCOL_ID, garbage)
            assert reply.value["refused"] == RefusalCode.MALFORMED
    finally:
        await attacker.stop()
    assert victim.stats().refusals["MALFORMED"] == 6
    assert await cluster.nodes[1].find_peers(victim.peer_id)


async def test_requests_are_rate_limited_per_peer(cluster: Cluster) -> None:
    await cluster.add()
    limited = await cluster.add(
        join=False,
        limits=dataclasses.replace(DhtLimits(), request_rate_per_s=0.001, request_burst=3),
    )
    attacker = await attacker_host(cluster)
    try:
        await attacker.connect(limited.host.addrs[0])
        ping = {"op": "ping"}
        answers = [
            (await attacker.rpc_call(limited.peer_id, PROTOCOL_ID, ping)).value for _ in range(5)
        ]
    finally:
        await attacker.stop()
    assert all("refused" not in a for a in answers[:3])
    assert [a["refused"] for a in answers[3:]] == [RefusalCode.RATE_LIMITED] * 2
    assert limited.stats().refusals["RATE_LIMITED"] == 2


async def test_client_mode_uses_the_dht_but_never_enters_tables(cluster: Cluster) -> None:
    await cluster.grow(5)
    client = await cluster.add(server_mode=False)
    expiry = time.time() + HOUR
    assert await client.store(b"k", b"from a client", expiry) >= 1
    assert await cluster.nodes[2].get(b"k") == Record(b"from a client", expiry)
    assert (await client.get(b"k")).value == b"from a client"
    for node in cluster.nodes[:5]:
        assert client.peer_id not in node.routing_table
    assert len(client.routing_table) == 5
    with pytest.raises(ProtocolNotSupported):
        await cluster.nodes[0].host.rpc_call(client.peer_id, PROTOCOL_ID, {"op": "ping"})


async def test_find_peers_returns_the_nearest_live_peers(cluster: Cluster) -> None:
    await cluster.grow(12)
    target = cluster.nodes[5].peer_id
    found = await cluster.nodes[9].find_peers(target, count=4)
    assert found[0].peer_id == target
    everyone = sorted(cluster.nodes, key=lambda n: node_id(n.peer_id) ^ node_id(target))
    assert [c.peer_id for c in found] == [n.peer_id for n in everyone if n is not cluster.nodes[9]][
        :4
    ]
    by_key = await cluster.nodes[2].find_peers(b"some key")
    assert len(by_key) == 11


async def test_bootstrap_failure_is_a_typed_error(cluster: Cluster) -> None:
    node = await cluster.add(join=False)
    lonely = await cluster.add(join=False)
    await lonely.stop()
    with pytest.raises(NotBootstrapped):
        await node.bootstrap([lonely.host.addrs[0]])
    with pytest.raises(DhtConfigError):
        DHT(node.host, identity=KeyPair.generate())


async def test_found_values_are_cached_on_the_nearest_node_that_lacked_them(
    cluster: Cluster,
) -> None:
    cluster.limits = DhtLimits(k=3)
    await cluster.grow(10)
    key = b"popular"
    target = key_id(key)
    expiry = time.time() + HOUR
    await cluster.nodes[4].store(key, b"v", expiry)
    holders = [n for n in cluster.nodes if n.get_local(key) is not None]
    nearest = min(node_id(n.peer_id) ^ target for n in holders)

    def nearer_than(distance: int) -> KeyPair:
        while True:
            identity = KeyPair.generate()
            if node_id(identity.peer_id) ^ target < distance:
                return identity

    # two late joiners nearer to the key than any holder: neither received the record
    reader_identity = nearer_than(nearest)
    newcomer = await cluster.add(identity=nearer_than(node_id(reader_identity.peer_id) ^ target))
    reader = await cluster.add(identity=reader_identity)
    assert newcomer.get_local(key) is None and reader.get_local(key) is None
    assert newcomer.peer_id in reader.routing_table
    assert await reader.get(key) == Record(b"v", expiry)
    await eventually(lambda: newcomer.get_local(key) == Record(b"v", expiry))


async def test_dead_peer_is_replaced_after_a_failed_ping(cluster: Cluster) -> None:
    """k=1: a full bucket pings its only contact before a newcomer may take the slot."""
    owner = await cluster.add(join=False, limits=DhtLimits(k=1))
    local = node_id(owner.peer_id)

    def far_identity() -> KeyPair:
        while True:
            identity = KeyPair.generate()
            if bucket_index(local, node_id(identity.peer_id)) == 255:
                return identity

    first = await cluster.add(identity=far_identity())
    assert [c.peer_id for c in owner.routing_table] == [first.peer_id]
    second = await cluster.add(identity=far_identity())
    await eventually(lambda: owner.stats().requests_sent >= 1)
    assert [c.peer_id for c in owner.routing_table] == [first.peer_id]
    await cluster.kill(first)
    third = await cluster.add(identity=far_identity())
    await eventually(lambda: first.peer_id not in owner.routing_table)
    assert [c.peer_id for c in owner.routing_table] in ([third.peer_id], [second.peer_id])


async def test_records_are_republished_to_the_new_nearest_nodes_and_expire() -> None:
    clock = FakeClock(time.time())
    limits = DhtLimits(k=3, republish_interval_s=600.0)
    cluster = Cluster(limits=limits, clock=clock)
    try:
        await cluster.grow(6)
        key = b"announce"
        target = key_id(key)
        writer = cluster.nodes[2]
        await writer.store(key, b"v", clock.now + 2 * HOUR)
        await cluster.grow(12)
        nearest = sorted(cluster.nodes, key=lambda n: node_id(n.peer_id) ^ target)[:3]
        clock.advance(601)
        await writer.maintain()
        expiry = clock.now - 601 + 2 * HOUR
        assert [n.get_local(key) for n in nearest] == [Record(b"v", expiry)] * 3
        clock.advance(2 * HOUR)
        for node in cluster.nodes:
            await node.maintain()
            assert node.stats().records == 0
        assert await cluster.nodes[7].get(key) is None
    finally:
        await cluster.close()
