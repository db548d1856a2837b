"""Every DHT RPC handler under hostile values: thousands of seeded cases through the
node's own handler, hundreds more over the wire, and hostile replies to the node's own
requests. The node must never crash, must answer every request with a reply or a
typed refusal, and must keep serving (the autouse fixture fails a test on any error
logged)."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from typing import Any

import msgpack
import pytest

from dht import DHT, PROTOCOL_ID, DhtLimits, DhtProtocolError, RefusalCode
from dht._messages import Codec, Ping, encode_request
from p2p import Host, RpcContext
from security import KeyPair
from tests.dht.dht_helpers import Cluster, proof_of, signed
from tests.fuzz_values import as_key, deep_nest, edge_scalars
from transport import MemoryTransport, Multiaddr

OPS = ["ping", "find_node", "find_value", "store", "", "STORE", "delete", 7, None, b"ping"]
FIELDS = ["op", "id", "key", "entries", "from", "pow"]
REPLY_FIELDS = ["peers", "entries", "codes", "refused", "message", "pow"]


class Hostile:
    """Seeded hostile values: wrong types, edge numbers, wrong lengths, deep and wide
    nesting, and near-valid structures with one field wrong."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        owner = KeyPair.from_seed(b"\x09" * 32)
        self.peer = owner.peer_id.to_bytes()
        self.addr = Multiaddr.for_quic("203.0.113.5", 4001).to_bytes()
        self.entry = signed(owner, b"k", b"v", time.time() + 3600)

    def scalar(self) -> Any:
        r = self.rng
        return r.choice(
            [
                *edge_scalars(r),
                r.randint(-(2**31), 2**31),
                -math.inf,
                1e308,
                r.randbytes(r.choice([1, 31, 32, 33, 38, 39, 64, 600])),
                b"\x00" * 32,
                b"\xff" * 32,
                self.peer,
                self.peer[:-1],
                self.addr,
                self.addr[:-3] + b"\xff\xff\xff",
                b"\x04\x7f\x00\x00\x01" + r.randbytes(r.randint(0, 6)),
            ]
        )

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        roll = r.random()
        if depth > 3 or roll < 0.55:
            return self.scalar()
        if roll < 0.7:
            return [self.value(depth + 1) for _ in range(r.randint(0, 6))]
        if roll < 0.78:
            return {self.scalar_key(): self.value(depth + 1) for _ in range(r.randint(0, 4))}
        if roll < 0.85:
            return self.entry_fields()
        if roll < 0.9:
            return [self.entry_fields() for _ in range(r.randint(1, 5))]
        if roll < 0.95:
            return [self.peer, [self.addr, self.value(depth + 1)]]
        return deep_nest(r, self.scalar(), 60)

    def scalar_key(self) -> Any:
        return as_key(self.scalar())

    def entry_fields(self) -> list[Any]:
        fields: list[Any] = [
            self.entry.subkey,
            self.entry.value,
            self.entry.expiry,
            self.entry.signature,
            self.entry.proof,
        ]
        for _ in range(self.rng.choice([0, 0, 1, 2])):
            fields[self.rng.randrange(5)] = self.scalar()
        return fields[: self.rng.choice([3, 4, 5, 5, 5, 6])]

    def plain_fields(self) -> list[Any]:
        """An unsigned entry whose expiry may be anything a number can be."""
        expiry = self.rng.choice(
            [time.time() + 60, math.nan, math.inf, -math.inf, 1e308, 2**63 - 1, -1, 0.0]
        )
        return [self.rng.choice([None, b"label"]), b"v", expiry, b"", b""]

    def request(self) -> Any:
        r = self.rng
        if r.random() < 0.05:
            return self.value()
        op = r.choice(OPS[:4]) if r.random() < 0.7 else r.choice(OPS)
        message: dict[Any, Any] = {"op": op}
        for field in FIELDS[1:]:
            roll = r.random()
            if roll < 0.5:
                message[field] = self.valid(field)
            elif roll < 0.75:
                message[field] = self.value()
        if r.random() < 0.3:
            message["from"] = [self.addr] * r.randint(0, 10)
            message["pow"] = r.choice([b"", proof_of(self.peer[-32:]).nonce, self.scalar()])
        return message

    def valid(self, field: str) -> Any:
        """A well-formed value for a request ``field``."""
        r = self.rng
        match field:
            case "id":
                return r.randbytes(32)
            case "key":
                return r.choice([b"k", r.randbytes(r.randint(0, 40))])
            case "entries":
                return [
                    self.entry_fields() if r.random() < 0.5 else self.plain_fields()
                    for _ in range(r.randint(0, 3))
                ]
            case "from":
                return [self.addr]
        return proof_of(self.peer[-32:]).nonce

    def reply(self) -> Any:
        r = self.rng
        if r.random() < 0.05:
            return self.value()
        return {field: self.value() for field in r.sample(REPLY_FIELDS, r.randint(0, 4))}


def wire(message: Any) -> Any | None:
    """What the other side decodes from ``message``; None if msgpack cannot carry it."""
    try:
        return msgpack.unpackb(msgpack.packb(message), strict_map_key=False)
    except (ValueError, TypeError, OverflowError):
        return None


async def real_node(cluster: Cluster) -> DHT:
    limits = DhtLimits(request_rate_per_s=1e9, request_burst=10**9, store_burst=10**9)
    node = await cluster.add(limits=limits)
    await cluster.grow(3)
    return node


@pytest.mark.timeout(120)
async def test_thousands_of_hostile_requests_get_typed_answers(cluster: Cluster) -> None:
    node = await real_node(cluster)
    hostile = Hostile(random.Random(6))
    # the sender is the key whose proof the hostile requests sometimes carry
    ctx = RpcContext(KeyPair.from_seed(b"\x09" * 32).peer_id, None, PROTOCOL_ID)
    outcomes: Counter[str] = Counter()
    cases = 0
    while cases < 4000:
        message = wire(hostile.request())
        if message is None:
            continue
        cases += 1
        answer = await node._serve(ctx, message, None)
        assert isinstance(answer, dict)
        assert wire(answer) is not None  # the answer itself can be sent
        if "refused" in answer:
            outcomes[RefusalCode(answer["refused"]).name] += 1
            assert isinstance(answer["message"], str)
        else:
            outcomes["answered"] += 1
            assert set(answer) <= {"peers", "entries", "codes", "pow"}
    # the mix really reached the handlers behind the decoder
    assert outcomes["MALFORMED"] > 1000 and outcomes["answered"] > 400, outcomes
    assert outcomes["INSUFFICIENT_POW"] > 100, outcomes
    served = node.stats().requests_served
    assert min(served.get(op, 0) for op in ("ping", "find_node", "find_value", "store")) > 10
    # what was kept is sound: everything expires, and the byte count returns to 0
    store = node._core.store
    assert len(store) > 0
    store.expire(time.time() + 10**6)
    assert len(store) == 0 and store.size_bytes == 0
    # and the node still works
    await node.store(b"after", b"fuzz", time.time() + 60)
    assert (await cluster.nodes[2].get(b"after")) is not None


@pytest.mark.timeout(120)
async def test_hostile_requests_over_the_wire_are_answered_and_the_node_keeps_serving(
    cluster: Cluster,
) -> None:
    node = await real_node(cluster)
    identity = KeyPair.generate()
    attacker = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await attacker.start([Multiaddr.for_memory("0")])
    hostile = Hostile(random.Random(7))
    refused = answered = 0
    try:
        await attacker.connect(node.host.addrs[0])
        sent = 0
        while sent < 400:
            message = wire(hostile.request())
            if message is None:
                continue
            sent += 1
            reply = await attacker.rpc_call(node.peer_id, PROTOCOL_ID, message, timeout=5)
            assert isinstance(reply.value, dict)
            if "refused" in reply.value:
                refused += 1
            else:
                answered += 1
        ping = encode_request(Ping(), None)
        assert "refused" not in (await attacker.rpc_call(node.peer_id, PROTOCOL_ID, ping)).value
    finally:
        await attacker.stop()
    assert refused > 100 and answered > 20


@pytest.mark.timeout(60)
def test_thousands_of_hostile_replies_raise_only_dht_protocol_error() -> None:
    hostile = Hostile(random.Random(8))
    codec = Codec(DhtLimits())
    decoded = 0
    for _ in range(5000):
        message = wire(hostile.reply())
        if message is None:
            continue
        try:
            codec.decode_reply(message, key=b"k")
        except DhtProtocolError:
            continue
        decoded += 1
    assert decoded > 200


@pytest.mark.timeout(60)
async def test_a_server_answering_garbage_never_breaks_a_lookup(cluster: Cluster) -> None:
    """A proven peer that answers every request with hostile replies: lookups, gets and
    stores of an honest node go on and succeed through the others."""
    honest = await real_node(cluster)
    identity = KeyPair.generate()
    liar = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await liar.start([Multiaddr.for_memory("0")])
    hostile = Hostile(random.Random(9))
    nonce = proof_of(identity.public_key).nonce
    answers = 0

    async def garbage(ctx: RpcContext, message: Any, payload: object) -> Any:
        nonlocal answers
        answers += 1
        reply = hostile.reply()
        if isinstance(reply, dict) and hostile.rng.random() < 0.5:
            reply["pow"] = nonce  # often proven, so that its garbage is parsed
        return reply if wire(reply) is not None else {"peers": 1}

    liar.add_rpc_handler(PROTOCOL_ID, garbage)
    try:
        await liar.connect(honest.host.addrs[0])
        announce = encode_request(Ping(), tuple(liar.listen_addrs), nonce)
        await liar.rpc_call(honest.peer_id, PROTOCOL_ID, announce)
        assert identity.peer_id in honest.routing_table
        expiry = time.time() + 600
        for i in range(40):
            key = b"key-%d" % i
            await honest.find_peers(key)
            await honest.store(key, b"v", expiry)
            assert await cluster.nodes[-1].get(key) is not None
            if identity.peer_id not in honest.routing_table:  # evicted for its garbage
                await liar.rpc_call(honest.peer_id, PROTOCOL_ID, announce)
    finally:
        await liar.stop()
    assert answers > 20
