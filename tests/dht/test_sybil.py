"""A Sybil attack: one /24, 300 identities with their proof-of-work paid, half of them
ground to sit nearer a target key than any honest node. They answer every lookup with
each other, accept stores and drop them. The IP-group caps must hold them to a capped
share of every honest routing table, and every honest ``get`` must still find a record
honest nodes stored; with the caps lifted, the same attack hides the record (so the
test can fail)."""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from dataclasses import dataclass
from typing import Any

import pytest

from dht import (
    DHT,
    PROTOCOL_ID,
    DhtLimits,
    Entry,
    Record,
    RefusalCode,
    SimNetwork,
    bucket_index,
    key_id,
    node_id,
)
from dht._messages import FindNode, FindValue, Ping, Reply, Request, Store, encode_request
from p2p import Host, RpcContext
from security import KeyPair, PeerId, solve_pow
from tests.dht.dht_helpers import proof_of
from transport import Multiaddr, QuicTransport

ATTACKER_GROUP = "203.0.113.0/24"
TARGET = b"model/M/block/7"
SYBILS = 300
HONEST = 80
POW_BITS = 8


@dataclass(frozen=True)
class Outcome:
    found: int
    readers: int
    worst_share: float
    worst_count: int
    worst_bucket: int


def sybil_identities(rng: random.Random, near: int) -> list[PeerId]:
    """300 identities: half ground (out of 40x as many) to be nearest ``near``, half random."""
    pool = [PeerId.from_public_key(rng.randbytes(32)) for _ in range(40 * SYBILS // 2)]
    pool.sort(key=lambda p: node_id(p) ^ near)
    return pool[: SYBILS // 2] + [PeerId.from_public_key(rng.randbytes(32)) for _ in range(150)]


def sybil_behaviour(sybils: list[PeerId]):
    """Answer with the sybils nearest the target (never a value); accept and drop stores."""

    ids = [(node_id(p), p) for p in sybils]

    def answer(net: SimNetwork, me: PeerId, request: Request) -> Reply:
        proof = net.cores[me].proof
        match request:
            case Ping():
                return Reply(proof=proof)
            case FindNode(target) | FindValue(target):
                ident = key_id(target) if isinstance(target, bytes) else target
                nearest = heapq.nsmallest(net.limits.k, ids, key=lambda item: item[0] ^ ident)
                return Reply(peers=tuple(net.contacts[p] for _, p in nearest), proof=proof)
            case Store(_, entries):
                return Reply(codes=tuple(RefusalCode.OK for _ in entries), proof=proof)
        raise AssertionError(request)

    return answer


def attack(limits: DhtLimits, seed: int) -> Outcome:
    net = SimNetwork(limits, seed=seed, now=1_000_000.0)
    rng = random.Random(f"attacker-{seed}")  # not the network's stream: no shared IDs
    honest = [net.add_node(ip="198.51.100.1")]
    for i in range(1, HONEST):
        honest.append(net.add_node(honest[0], ip=f"100.{64 + i // 200}.{i % 200}.1"))
    sybils = sybil_identities(rng, key_id(TARGET))
    behaviour = sybil_behaviour(sybils)
    for i, sybil in enumerate(sybils):
        proof = solve_pow(sybil.public_key(), limits.pow_difficulty).nonce  # paid
        ip = f"203.0.113.{1 + i % 250}"
        net.add_node(peer_id=sybil, ip=ip, behaviour=behaviour, proof=proof)
    for sybil in sybils:  # each announces itself to every honest node, to take every slot
        for peer in honest:
            net.call(sybil, net.contacts[peer], Ping())
    for peer in honest:  # honest nodes keep refreshing their tables meanwhile
        for target in net.cores[peer].table.refresh_targets(net.now, net.rng, force=True)[:8]:
            net.lookup(peer, target)

    worst_share, worst_count, worst_bucket = 0.0, 0, 0
    for peer in honest:
        table = net.cores[peer].table
        count = table.group_count(ATTACKER_GROUP)
        worst_count = max(worst_count, count)
        worst_share = max(worst_share, count / len(table))
        per_bucket: dict[int, int] = {}
        for c in table:
            if c.peer_id in sybils:
                index = bucket_index(table.local_id, c.node_id)
                per_bucket[index] = per_bucket.get(index, 0) + 1
        worst_bucket = max(worst_bucket, *per_bucket.values(), 0)

    net.store(honest[1], Entry(TARGET, None, b"online", net.now + 3600))
    found = sum(
        [e.value for e in net.get(reader, TARGET).entries] == [b"online"] for reader in honest
    )
    return Outcome(found, len(honest), worst_share, worst_count, worst_bucket)


@pytest.mark.timeout(120)
def test_one_slash_24_with_300_identities_holds_a_capped_share_and_hides_nothing() -> None:
    limits = DhtLimits(exempt_private_addrs=False, pow_difficulty=POW_BITS)
    outcome = attack(limits, seed=5)
    assert outcome.worst_count <= limits.max_per_ip_group_in_table
    assert outcome.worst_bucket <= limits.max_per_ip_group_per_bucket
    assert outcome.worst_share <= limits.max_per_ip_group_in_table / 20
    assert outcome.found == outcome.readers, outcome


@pytest.mark.timeout(120)
def test_without_the_caps_the_same_attack_hides_the_record() -> None:
    uncapped = DhtLimits(
        exempt_private_addrs=False,
        pow_difficulty=POW_BITS,
        max_per_ip_group_per_bucket=10**6,
        max_per_ip_group_in_table=10**6,
        max_per_ip_group_in_lookup=10**6,
    )
    outcome = attack(uncapped, seed=5)
    assert outcome.worst_count > 10
    assert outcome.found < outcome.readers // 2, outcome


# -- the same attack on real sockets -------------------------------------------------


async def quic_host(ip: str, identity: KeyPair) -> Host:
    host = Host(identity, [QuicTransport(identity)])
    await host.start([Multiaddr.for_quic(ip, 0)])
    return host


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_300_identities_of_one_slash_24_on_real_sockets_hide_nothing() -> None:
    """Honest QUIC nodes each on their own 127.0.x.1 /24; 300 proven sybil hosts on
    127.66.0.0/24, half ground near the key, each announcing itself to two honest nodes,
    answering lookups with sybils and dropping stores."""
    limits = DhtLimits(k=3, alpha=2, exempt_private_addrs=False, rpc_timeout_s=3.0)
    honest: list[DHT] = []
    sybil_hosts: list[Host] = []
    try:
        for i in range(8):
            identity = KeyPair.generate()
            node = DHT(await quic_host(f"127.0.{i + 1}.1", identity), limits, identity=identity)
            await node.start([honest[0].host.addrs[0]] if honest else [])
            honest.append(node)
        target = key_id(TARGET)
        rng = random.Random("real-sybils")
        pool = [KeyPair.from_seed(rng.randbytes(32)) for _ in range(1500)]
        pool.sort(key=lambda k: node_id(k.peer_id) ^ target)
        identities = pool[:150] + pool[-150:]
        contacts: list[tuple[int, list[Any]]] = []
        asked = [0]

        def liar(identity: KeyPair):
            nonce = proof_of(identity.public_key).nonce

            async def answer(ctx: RpcContext, message: Any, payload: object) -> Any:
                asked[0] += 1
                op = message.get("op") if isinstance(message, dict) else None
                if op == "store":
                    return {"codes": [0] * len(message.get("entries", [])), "pow": nonce}
                ident = target
                if op == "find_node" and isinstance(message.get("id"), bytes):
                    ident = int.from_bytes(message["id"], "big")
                nearest = heapq.nsmallest(limits.k, contacts, key=lambda c: c[0] ^ ident)
                return {"peers": [c[1] for c in nearest], "pow": nonce}

            return answer

        semaphore = asyncio.Semaphore(16)

        async def launch(index: int, identity: KeyPair) -> None:
            async with semaphore:
                host = await quic_host(f"127.66.0.{1 + index % 250}", identity)
                sybil_hosts.append(host)
                host.add_rpc_handler(PROTOCOL_ID, liar(identity))
                addrs = tuple(host.listen_addrs)
                wire = [identity.peer_id.to_bytes(), [a.to_bytes() for a in addrs]]
                contacts.append((node_id(identity.peer_id), wire))
                proof = proof_of(identity.public_key).nonce
                for victim in (honest[index % 8], honest[(index + 3) % 8]):
                    await host.connect(victim.host.addrs[0])
                    ping = encode_request(Ping(), addrs, proof)
                    await host.rpc_call(victim.peer_id, PROTOCOL_ID, ping)

        await asyncio.gather(*(launch(i, k) for i, k in enumerate(identities)))
        for node in honest:
            await node.refresh(force=True)
        held = [node.routing_table.group_count("127.66.0.0/24") for node in honest]
        assert max(held) <= limits.max_per_ip_group_in_table
        assert sum(held) >= len(honest), held  # they did get in, as far as the caps allow
        expiry = time.time() + 600
        await honest[1].store(TARGET, b"online", expiry)
        for reader in honest:
            assert await reader.get(TARGET) == Record(b"online", expiry), reader
        assert asked[0] > 0  # the sybils were consulted by honest lookups
    finally:
        for node in honest:
            await node.stop()
            await node.host.stop()
        await asyncio.gather(*(h.stop() for h in sybil_hosts))
