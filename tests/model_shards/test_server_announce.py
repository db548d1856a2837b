"""DHT announcements: the record schema, and a server's joining -> online -> offline life."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgpack
import pytest

from dht import DHT
from model_shards._announce import (
    MODELS_KEY,
    Announcer,
    InvalidRecord,
    ModelRecord,
    ServerRecord,
    block_key,
    read_models,
    read_servers,
    snapshot_of,
)
from model_shards._server_limits import ServerLimits
from p2p import Host
from scheduler import ServerState
from security import KeyPair
from transport import Multiaddr, TcpTransport

MODEL = ModelRecord(model_id="ab" * 32, short_name="tiny", model_type="llama", num_blocks=4)


def record(peer: KeyPair, state: ServerState, start: int = 1, end: int = 3) -> ServerRecord:
    return ServerRecord(
        peer_id=peer.peer_id,
        state=state,
        start=start,
        end=end,
        throughput=250.0,
        cache_tokens_left=4096,
        quantization="nf4",
        dtype="bfloat16",
        addrs=(Multiaddr.from_string("/ip4/127.0.0.1/tcp/4001"),),
    )


def test_records_round_trip_and_garbage_is_refused() -> None:
    peer = KeyPair.generate()
    server = record(peer, ServerState.ONLINE)
    assert ServerRecord.from_bytes(peer.peer_id, server.to_bytes()) == server
    assert ModelRecord.from_bytes(MODEL.to_bytes()) == MODEL
    assert MODEL.display_name == "tiny@" + "ab" * 6
    info = server.server_info()
    assert (info.peer_id, info.start, info.end, info.state) == (str(peer.peer_id), 1, 3, "online")
    good = msgpack.unpackb(server.to_bytes())
    for change in (
        {"v": 2},
        {"span": [3, 1]},
        {"span": [0]},
        {"state": "dancing"},
        {"throughput": "fast"},
        {"throughput": float("nan")},
        {"addrs": [b"\x00\x01"]},
        {"cache_tokens_left": 1.5},
    ):
        with pytest.raises(InvalidRecord):
            ServerRecord.from_bytes(peer.peer_id, msgpack.packb({**good, **change}))
    for garbage in (b"", b"\xc1", msgpack.packb([1, 2])):
        with pytest.raises(InvalidRecord):
            ServerRecord.from_bytes(peer.peer_id, garbage)
        with pytest.raises(InvalidRecord):
            ModelRecord.from_bytes(garbage)
    with pytest.raises(InvalidRecord):
        ModelRecord.from_bytes(msgpack.packb({**msgpack.unpackb(MODEL.to_bytes()), "blocks": 0}))
    beyond = record(peer, ServerState.ONLINE, 2, 9)
    assert len(snapshot_of(4, [server, beyond], keep=lambda s: True)) == 1


@pytest.fixture
async def peers() -> AsyncIterator[tuple[DHT, DHT, KeyPair]]:
    """A server's DHT node and a client's, on loopback TCP."""
    made: list[tuple[Host, DHT]] = []
    keys = [KeyPair.generate(), KeyPair.generate()]
    for index, key in enumerate(keys):
        host = Host(key, [TcpTransport(key)])
        await host.start([Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")] if index == 0 else [])
        dht = DHT(host, server_mode=index == 0, identity=key)
        await dht.start(bootstrap=[made[0][0].addrs[0]] if made else [])
        made.append((host, dht))
    yield made[0][1], made[1][1], keys[0]
    for host, dht in reversed(made):
        await dht.stop()
        await host.stop()


async def test_a_server_announces_each_block_and_refreshes_before_expiry(
    peers: tuple[DHT, DHT, KeyPair],
) -> None:
    server_dht, client_dht, key = peers
    states: list[ServerState] = []

    def describe(state: ServerState) -> ServerRecord:
        states.append(state)
        return record(key, state)

    limits = ServerLimits(announce_interval_s=0.2, record_ttl_s=0.6)
    announcer = Announcer(server_dht, MODEL, describe, limits)
    await announcer.announce(ServerState.JOINING)
    found = await read_servers(client_dht, MODEL.model_id, MODEL.num_blocks)
    assert found[key.peer_id].state is ServerState.JOINING
    assert await read_models(client_dht) == {MODEL.model_id: MODEL}
    for block, expected in ((0, False), (1, True), (2, True), (3, False)):
        entries = await client_dht.get(block_key(MODEL.model_id, block), latest=True)
        assert (entries is not None and key.peer_id.to_bytes() in entries) is expected

    await announcer.announce(ServerState.ONLINE)
    refresh = asyncio.ensure_future(announcer.run())
    try:
        await asyncio.sleep(1.2)  # twice the records' lifetime: only refreshes keep them
        found = await read_servers(client_dht, MODEL.model_id, MODEL.num_blocks)
        assert found[key.peer_id].state is ServerState.ONLINE
        assert states.count(ServerState.ONLINE) >= 4
    finally:
        refresh.cancel()
    await announcer.announce(ServerState.OFFLINE)
    found = await read_servers(client_dht, MODEL.model_id, MODEL.num_blocks)
    assert found[key.peer_id].state is ServerState.OFFLINE
    assert MODELS_KEY == b"swarm/v1/models"
