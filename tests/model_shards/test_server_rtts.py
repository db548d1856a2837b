"""Server-measured round trips: the record field, and servers publishing what they ping."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from model_shards._announce import MAX_RTTS, InvalidRecord, ServerRecord, snapshot_of
from model_shards._server_node import PlacementLimits
from scheduler import ServerState, route_min_latency
from security import KeyPair
from tests.model_shards.test_rebalance_node import Swarm
from tests.model_shards.tiny import TinyModel
from tests.swarm.harness import private_copy
from transport import Multiaddr


def _record(**changes: object) -> ServerRecord:
    values: dict[str, object] = {
        "peer_id": KeyPair.generate().peer_id,
        "state": ServerState.ONLINE,
        "start": 1,
        "end": 3,
        "throughput": 250.0,
        "cache_tokens_left": 4096,
        "quantization": "none",
        "dtype": "float32",
        "addrs": (Multiaddr.from_string("/ip4/127.0.0.1/tcp/4001"),),
    }
    values.update(changes)
    return ServerRecord(**values)  # type: ignore[arg-type]


def test_round_trips_and_moves_travel_in_records_and_old_records_still_parse() -> None:
    near, far = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    record = _record(rtts={near: 0.0015, far: 0.25}, moving_to=(2, 4))
    back = ServerRecord.from_bytes(record.peer_id, record.to_bytes())
    assert back.rtts == {near: pytest.approx(0.0015), far: pytest.approx(0.25)}
    assert back.moving_to == (2, 4) and back.blocks == (1, 2, 3)
    # On the wire: milliseconds by PeerID bytes.
    assert msgpack.unpackb(record.to_bytes())["rtts"] == {
        near.to_bytes(): 1.5,
        far.to_bytes(): 250.0,
    }
    # A record written before the fields existed parses, with neither.
    old = msgpack.unpackb(record.to_bytes())
    del old["rtts"], old["moving"]
    parsed = ServerRecord.from_bytes(record.peer_id, msgpack.packb(old))
    assert (parsed.rtts, parsed.moving_to) == ({}, None)
    # Routing sees what is served now with the round trips in seconds; placement sees
    # the move as the new span joining.
    info = back.server_info()
    assert (info.start, info.end, info.state) == (1, 3, ServerState.ONLINE)
    assert dict(info.rtts) == {str(near): pytest.approx(0.0015), str(far): pytest.approx(0.25)}
    planned = back.planning_info()
    assert (planned.start, planned.end, planned.state) == (2, 4, ServerState.JOINING)
    assert [s.start for s in snapshot_of(4, [back], keep=lambda s: True)] == [1]
    assert [s.start for s in snapshot_of(4, [back], keep=lambda s: True, planning=True)] == [2]
    assert snapshot_of(3, [back], keep=lambda s: True).servers == ()  # moves past the model


def test_malformed_round_trips_are_refused_and_long_maps_cut() -> None:
    record = _record()
    good = msgpack.unpackb(record.to_bytes())
    peer = KeyPair.generate().peer_id.to_bytes()
    for bad in (
        {"rtts": [1, 2]},
        {"rtts": {"text": 1.0}},
        {"rtts": {peer: -1.0}},
        {"rtts": {peer: math.nan}},
        {"rtts": {peer: "1"}},
        {"rtts": {b"\x00\x01": 1.0}},
        {"moving": [3, 1]},
        {"moving": [1]},
        {"moving": [0, 1.5]},
    ):
        with pytest.raises(InvalidRecord):
            ServerRecord.from_bytes(record.peer_id, msgpack.packb({**good, **bad}))
    many = {KeyPair.generate().peer_id.to_bytes(): float(i) for i in range(MAX_RTTS + 5)}
    parsed = ServerRecord.from_bytes(record.peer_id, msgpack.packb({**good, "rtts": many}))
    assert len(parsed.rtts) == MAX_RTTS


@pytest.fixture
async def swarm(tiny: Callable[[str], TinyModel], tmp_path: Path) -> AsyncIterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path)
    made = Swarm(tm.path, tmp_path / "cache")
    await made.peer()
    yield made
    await made.close()


@pytest.mark.timeout(60)
async def test_servers_publish_round_trips_to_their_neighbours_and_routing_uses_them(
    swarm: Swarm,
) -> None:
    pinging = PlacementLimits(ping_interval_s=0.2, ping_jitter=0.2)
    first = await swarm.node(blocks=(0, 2), placement=replace(pinging, published_rtts=1))
    second = await swarm.node(blocks=(2, 4), placement=pinging)
    # Another server of blocks 0-1: next to the second node's span, not to the first's.
    other = await swarm.announced((0, 2), 10.0)
    a, b, c = (str(first.host.peer_id), str(second.host.peer_id), str(other.record.peer_id))
    records: dict[str, ServerRecord] = {}
    for _ in range(100):
        records = await swarm.records()
        published = {name: {str(p) for p in records[name].rtts} for name in (a, b)}
        if published == {a: {b}, b: {a, c}}:
            break
        await asyncio.sleep(0.1)
    # The first node publishes one round trip (its limit): to the server of the blocks
    # after its own, not the nearer-or-not server of its own blocks.
    assert {str(p) for p in records[a].rtts} == {b}
    assert {str(p) for p in records[b].rtts} == {a, c}
    for record in (records[a], records[b]):
        assert all(0.0 < rtt < 1.0 for rtt in record.rtts.values())

    # A push route runs client -> first -> second -> client, each link one way.
    snapshot = snapshot_of(4, records.values(), keep=lambda s: s.peer_id != other.record.peer_id)
    client = {a: 0.04, b: 0.06}
    route = route_min_latency(snapshot, client)
    assert [hop.peer_id for hop in route.hops] == [a, b]
    between = records[a].rtts[second.host.peer_id]
    compute = 2 / first.model.throughput + 2 / second.model.throughput
    assert route.expected_latency_s == pytest.approx((0.04 + between + 0.06) / 2 + compute)
