"""Identity proof-of-work gates DHT membership; the reputation hook ranks table contacts."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from dht import (
    DHT,
    PROTOCOL_ID,
    Admission,
    DhtConfigError,
    DhtLimits,
    NotBootstrapped,
    RefusalCode,
    RoutingTable,
    SimNetwork,
)
from dht._messages import Ping, encode_request
from p2p import Host, RpcContext
from security import (
    Event,
    IdentityProof,
    KeyPair,
    PeerId,
    ReputationBook,
    proof_bits,
    search_pow,
)
from tests.dht.dht_helpers import Cluster, proof_of
from tests.dht.test_dht_routing import far_contacts
from transport import MemoryTransport, Multiaddr

HOUR = 3600.0


async def bare_host(cluster: Cluster) -> Host:
    identity = KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await host.start([Multiaddr.for_memory("0")])
    return host


def weak_proof(public_key: bytes, below: int, at_least: int = 1) -> IdentityProof:
    """A proof for ``public_key`` of ``at_least`` bits or more, but fewer than ``below``."""
    start = 0
    while True:
        proof = search_pow(public_key, at_least, start, 1)
        if proof is not None and proof.difficulty(public_key) < below:
            return proof
        start += 1


@pytest.mark.timeout(30)
async def test_a_server_without_enough_proof_of_work_is_refused_and_counted(
    cluster: Cluster,
) -> None:
    node = await cluster.add()
    attacker = await bare_host(cluster)
    try:
        await attacker.connect(node.host.addrs[0])
        addrs = tuple(attacker.listen_addrs)
        key = attacker.peer_id.public_key()
        answers = []
        for proof in (b"", weak_proof(key, 12).nonce, b"\x00" * 33):
            request = encode_request(Ping(), addrs, proof)
            answers.append((await attacker.rpc_call(node.peer_id, PROTOCOL_ID, request)).value)
        client = await attacker.rpc_call(node.peer_id, PROTOCOL_ID, encode_request(Ping(), None))
        assert attacker.peer_id not in node.routing_table
        proven = encode_request(Ping(), addrs, proof_of(key).nonce)
        accepted = (await attacker.rpc_call(node.peer_id, PROTOCOL_ID, proven)).value
    finally:
        await attacker.stop()
    for answer in answers[:2]:
        assert answer["refused"] == RefusalCode.INSUFFICIENT_POW
        assert "DhtLimits.pow_difficulty=12" in answer["message"]
    assert answers[2]["refused"] == RefusalCode.MALFORMED  # an overlong nonce
    assert "refused" not in client.value
    assert "refused" not in accepted
    assert proof_bits(node.peer_id.public_key(), accepted["pow"]) >= 12
    assert attacker.peer_id in node.routing_table
    stats = node.stats()
    assert stats.rejected_by_pow == 2 and stats.refusals["INSUFFICIENT_POW"] == 2


@pytest.mark.timeout(30)
async def test_replies_without_proof_neither_enter_the_table_nor_bootstrap(
    cluster: Cluster,
) -> None:
    impostor = await bare_host(cluster)

    async def answer_without_proof(ctx: RpcContext, message: Any, payload: object) -> Any:
        return {"peers": []}

    impostor.add_rpc_handler(PROTOCOL_ID, answer_without_proof)
    node = await cluster.add()
    try:
        with pytest.raises(NotBootstrapped, match="INSUFFICIENT_POW"):
            await node.bootstrap([impostor.addrs[0]])
    finally:
        await impostor.stop()
    assert impostor.peer_id not in node.routing_table
    assert node.stats().rejected_by_pow == 1


@pytest.mark.timeout(30)
async def test_a_node_whose_proof_is_too_weak_for_the_swarm_is_told_why(
    cluster: Cluster,
) -> None:
    strict = await cluster.add(limits=DhtLimits(pow_difficulty=14))
    identity = KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await host.start([Multiaddr.for_memory("0")])
    weak = weak_proof(identity.public_key, 14, at_least=4)
    node = DHT(host, DhtLimits(pow_difficulty=4), identity=identity, proof=weak)
    cluster.nodes.append(node)
    with pytest.raises(NotBootstrapped, match="pow_difficulty=14"):
        await node.start([strict.host.addrs[0]])
    assert strict.stats().refusals["INSUFFICIENT_POW"] == 1


@pytest.mark.timeout(30)
async def test_the_proof_is_solved_at_start_and_travels_with_owned_entries(
    cluster: Cluster,
) -> None:
    first = await cluster.add()
    assert first.identity_proof is not None
    assert first.identity_proof.difficulty(first.peer_id.public_key()) >= 12
    await cluster.grow(3)
    reader = await cluster.add(server_mode=False)
    assert reader.identity_proof is None  # a client solves only when it must
    expiry = time.time() + HOUR
    await reader.store(b"evidence/x", b"accusation", expiry, subkey=reader.peer_id)
    assert reader.identity_proof is not None
    found = await first.get(b"evidence/x", latest=True)
    assert isinstance(found, dict) and found[reader.peer_id.to_bytes()].value == b"accusation"
    held = [e for n in cluster.nodes for e in n._core.store.get(b"evidence/x", time.time())]
    assert held and all(e.proof == reader.identity_proof.nonce for e in held)


async def test_a_given_proof_below_the_difficulty_is_a_config_error(cluster: Cluster) -> None:
    identity = KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    with pytest.raises(DhtConfigError, match="pow_difficulty=12"):
        DHT(host, identity=identity, proof=weak_proof(identity.public_key, 12))
    with pytest.raises(DhtConfigError):
        DhtLimits(pow_difficulty=65)


def test_simulated_nodes_without_proof_stay_out_of_every_table() -> None:
    net = SimNetwork(DhtLimits(k=8, pow_difficulty=6), seed=3, now=1_000_000.0)
    boot = net.add_node()
    honest = [boot] + [net.add_node(boot) for _ in range(30)]
    freeloaders = [net.add_node(boot, proof=b"") for _ in range(10)]
    for peer in honest:
        table = net.cores[peer].table
        assert not any(f in table for f in freeloaders)
    assert all(len(net.cores[f].table) == 0 for f in freeloaders)
    assert sum(net.cores[p].rejected_by_pow for p in honest) >= 10


# -- the reputation hook -----------------------------------------------------------------

LIMITS = DhtLimits(k=4, replacement_cache_size=3)


def scored(values: dict[PeerId, float]):
    return lambda peer: values.get(peer, 0.5)


def test_contacts_scoring_below_zero_are_refused(rng: random.Random) -> None:
    local = KeyPair.generate().peer_id
    banned, fine = far_contacts(rng, local, 2)
    table = RoutingTable(local, LIMITS, now=0.0, score=scored({banned.peer_id: -1.0}))
    assert table.update(banned, 0.0).admission is Admission.REJECTED
    assert table.update(fine, 0.0).admission is Admission.ADDED
    assert table.rejected_by_score == 1


def test_a_full_bucket_pings_its_lowest_scoring_contact(rng: random.Random) -> None:
    local = KeyPair.generate().peer_id
    first, second, third, fourth, newcomer = far_contacts(rng, local, 5)
    scores = {first.peer_id: 0.9, second.peer_id: 0.8, third.peer_id: 0.3, fourth.peer_id: 0.6}
    table = RoutingTable(local, LIMITS, now=0.0, score=scored(scores))
    for c in (first, second, third, fourth):
        table.update(c, 0.0)
    update = table.update(newcomer, 1.0)
    assert update.admission is Admission.CACHED and update.ping == third
    table.ping_result(third.peer_id, False, 2.0)
    assert newcomer.peer_id in table and third.peer_id not in table


def test_a_contact_banned_after_admission_makes_room_at_once(rng: random.Random) -> None:
    local = KeyPair.generate().peer_id
    members = far_contacts(rng, local, 4)
    newcomer = far_contacts(rng, local, 1)[0]
    scores: dict[PeerId, float] = {}
    table = RoutingTable(local, LIMITS, now=0.0, score=scored(scores))
    for c in members:
        table.update(c, 0.0)
    scores[members[2].peer_id] = -1.0
    update = table.update(newcomer, 1.0)
    assert update.admission is Admission.ADDED and update.ping is None
    assert members[2].peer_id not in table and newcomer.peer_id in table


def test_the_best_scoring_replacement_takes_a_freed_slot(rng: random.Random) -> None:
    local = KeyPair.generate().peer_id
    members = far_contacts(rng, local, 4)
    good, better, worse = far_contacts(rng, local, 3)
    scores = {good.peer_id: 0.6, better.peer_id: 0.9, worse.peer_id: 0.1}
    table = RoutingTable(local, LIMITS, now=0.0, score=scored(scores))
    for c in (*members, good, better, worse):
        table.update(c, 0.0)
    table.remove(members[0].peer_id)
    assert better.peer_id in table and good.peer_id not in table


@pytest.mark.timeout(30)
async def test_the_dht_consults_the_reputation_book(cluster: Cluster) -> None:
    book = ReputationBook()
    identity = KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await host.start([Multiaddr.for_memory("0")])
    node = DHT(host, identity=identity, score=book.contact_score)
    cluster.nodes.append(node)
    await node.start()
    cheat, honest = await cluster.add(join=False), await cluster.add(join=False)
    book.record(cheat.peer_id, Event.CHECK_FAILED)
    for other in (cheat, honest):
        await other.bootstrap([node.host.addrs[0]])
    assert honest.peer_id in node.routing_table
    assert cheat.peer_id not in node.routing_table
    assert node.stats().rejected_by_score >= 1
