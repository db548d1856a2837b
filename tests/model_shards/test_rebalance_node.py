"""Real shard servers placing and rebalancing themselves over loopback TCP and the DHT.

Other servers are real peers with DHT identities that announce chosen records (the
"announced" servers), so each swarm shape is exact; the ServerNodes under test load real
blocks of a tiny Llama (4 blocks) and serve them. Only waits are injected.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dht import DHT
from model_shards import Checkpoint, load_manifest, load_span
from model_shards._announce import Announcer, ModelRecord, ServerRecord, read_servers
from model_shards._server_limits import ServerLimits
from model_shards._server_node import PlacementLimits, ServerConfig, ServerNode
from model_shards._server_protocol import (
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    pack_tensors,
    unpack_tensors,
)
from model_shards._span import respan
from p2p import Host, P2PError, RpcReply, RpcStream
from scheduler import SchedulerSettings, ServerState, peer_order
from security import KeyPair
from swarm._peer import start_peer, stop_peer
from tests.model_shards.tiny import TinyModel
from tests.swarm.harness import private_copy

TCP = "/ip4/127.0.0.1/tcp/0"
FAST = PlacementLimits(herd_delay_s=0.05, settle_s=0.05, ping_interval_s=30.0)
LIMITS = ServerLimits(drain_timeout_s=1.0)


class Announced:
    """A peer that announces whatever server record the test gives it."""

    def __init__(self, dht: DHT, model: ModelRecord, record: ServerRecord) -> None:
        self.record = record
        self.announcer = Announcer(
            dht, model, lambda state: replace(self.record, state=state), ServerLimits()
        )

    async def announce(self, **changes: Any) -> None:
        self.record = replace(self.record, **changes)
        await self.announcer.announce(self.record.state)


class Swarm:
    """A bootstrap peer, ServerNodes and announced servers of one tiny model."""

    def __init__(self, model: Path, cache_dir: Path) -> None:
        self.model = model
        self.cache_dir = cache_dir
        self.peers: list[tuple[Host, DHT]] = []
        self.nodes: list[ServerNode] = []
        checkpoint = Checkpoint.open(model)
        manifest = load_manifest(checkpoint)
        self.record = ModelRecord(
            manifest.model_id, manifest.short_name, manifest.model_type, manifest.num_blocks
        )

    async def peer(self, key: KeyPair | None = None) -> tuple[Host, DHT]:
        bootstrap = [str(self.peers[0][0].addrs[0])] if self.peers else []
        made = await start_peer(key or KeyPair.generate(), [TCP], bootstrap, server_mode=True)
        self.peers.append(made)
        return made

    @property
    def dht(self) -> DHT:
        return self.peers[0][1]

    async def node(self, key: KeyPair | None = None, **config: Any) -> ServerNode:
        host, dht = await self.peer(key)
        options = {"rebalance": False, "placement": FAST, "limits": LIMITS, **config}
        sleep = options.pop("sleep", asyncio.sleep)
        node = await ServerNode.start(
            host,
            dht,
            ServerConfig(model=self.model, swarm_cache_dir=self.cache_dir, **options),
            sleep=sleep,
        )
        self.nodes.append(node)
        return node

    async def announced(
        self,
        span: tuple[int, int],
        throughput: float,
        state: ServerState = ServerState.ONLINE,
        key: KeyPair | None = None,
    ) -> Announced:
        host, dht = await self.peer(key)
        record = ServerRecord(
            peer_id=host.peer_id,
            state=state,
            start=span[0],
            end=span[1],
            throughput=throughput,
            cache_tokens_left=4096,
            quantization="none",
            dtype="float32",
            addrs=tuple(host.addrs),
        )
        server = Announced(dht, self.record, record)
        await server.announce()
        return server

    async def records(self) -> dict[str, ServerRecord]:
        found = await read_servers(self.dht, self.record.model_id, self.record.num_blocks)
        return {str(peer): record for peer, record in found.items()}

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
        for host, dht in reversed(self.peers):
            await stop_peer(host, dht)


@pytest.fixture
async def swarm(tiny: Callable[[str], TinyModel], tmp_path: Path) -> AsyncIterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path)
    made = Swarm(tm.path, tmp_path / "cache")
    await made.peer()
    yield made
    await made.close()


def _keys(count: int) -> list[KeyPair]:
    """Fresh keys, sorted by the scheduler's order of their PeerIDs."""
    keys = [KeyPair.generate() for _ in range(count)]
    return sorted(keys, key=lambda k: peer_order(str(k.peer_id)))


async def _forward(client: Host, node: ServerNode, hidden: torch.Tensor) -> torch.Tensor:
    start, end = node.span
    sizes, payload = pack_tensors([hidden])
    request = {"model": node.model.manifest.model_id, "start": start, "end": end, "tensors": sizes}
    reply = await client.rpc_call(node.host.peer_id, FORWARD_PROTOCOL, request, payload)
    wire = ServerLimits().wire
    (out,) = unpack_tensors(reply.value["tensors"], reply.payload, wire, count=range(1, 2))
    return out.clone()


@pytest.mark.timeout(60)
async def test_a_node_moves_into_the_gap_reloading_only_new_blocks_and_never_uncovers_one(
    swarm: Swarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await swarm.node(blocks=(1, 4))
    t = node.model.throughput
    # Block 0 is served by a slow server only; block 3 by the node and a server still
    # loading [2, 4). Moving to [0, 3) lifts the minimum tenfold (and changes fewer blocks
    # than moving the other server would), but would leave block 3 to a server that does
    # not serve yet: the node waits.
    await swarm.announced((0, 2), 0.1 * t)
    loading = await swarm.announced((2, 4), t, ServerState.JOINING)
    assert await node.rebalance_once() is None
    assert node.span == (1, 4) and node.moves == []

    reads: list[str] = []
    original = Checkpoint.read

    def spy(self: Checkpoint, names: Any) -> dict[str, torch.Tensor]:
        names = list(names)
        reads.extend(names)
        return original(self, names)

    monkeypatch.setattr(Checkpoint, "read", spy)
    old_blocks = list(node.server.span.blocks)
    dropped = weakref.ref(old_blocks[2])
    await loading.announce(state=ServerState.ONLINE)
    move = await node.rebalance_once()

    assert move is not None and node.span == (0, 3)
    assert (move.from_span, move.to_span, move.loaded, move.kept) == ((1, 4), (0, 3), (0,), (1, 2))
    # Only block 0 was read from the checkpoint; blocks 1 and 2 are the same modules.
    assert reads and {name.split(".")[2] for name in reads} == {"0"}
    assert list(node.server.span.blocks)[1:] == old_blocks[:2]
    del old_blocks
    gc.collect()
    assert dropped() is None, "block 3 is still held after the move"

    # The swarm sees the node online on its new span, and it serves it.
    mine = (await swarm.records())[str(node.host.peer_id)]
    assert (mine.state, mine.start, mine.end, mine.moving_to) == (ServerState.ONLINE, 0, 3, None)
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    local = load_span(Checkpoint.open(swarm.model), 0, 3)
    client, _ = await swarm.peer()
    await client.connect(node.host.addrs[0])
    torch.testing.assert_close(await _forward(client, node, hidden), local.forward(hidden))

    # Balanced now: no further move.
    assert await node.rebalance_once() is None


@pytest.mark.timeout(60)
async def test_two_nodes_reacting_to_one_gap_move_once_on_their_own(swarm: Swarm) -> None:
    fast = PlacementLimits(
        scheduler=SchedulerSettings(rebalance_period_s=0.3, rebalance_jitter=0.5),
        herd_delay_s=0.2,
        settle_s=0.1,
        ping_interval_s=30.0,
    )
    a = await swarm.node(blocks=(2, 4), rebalance=True, placement=fast)
    b = await swarm.node(blocks=(2, 4), rebalance=True, placement=fast)
    await swarm.announced((0, 2), 0.1 * a.model.throughput)
    for _ in range(200):
        if a.moves or b.moves:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # a few more checks each: the other must stay
    assert sorted([a.span, b.span]) == [(0, 2), (2, 4)]
    assert len(a.moves) + len(b.moves) == 1
    records = await swarm.records()
    assert sorted((r.start, r.end) for r in records.values()) == [(0, 2), (0, 2), (2, 4)]


@pytest.mark.timeout(60)
async def test_two_simultaneous_automatic_joins_take_different_spans(swarm: Swarm) -> None:
    x, y = await asyncio.gather(
        swarm.node(num_blocks=2, placement=replace(FAST, settle_s=0.3)),
        swarm.node(num_blocks=2, placement=replace(FAST, settle_s=0.3)),
    )
    assert sorted([x.span, y.span]) == [(0, 2), (2, 4)]
    first, second = sorted((x, y), key=lambda n: peer_order(str(n.host.peer_id)))
    if first.placements[0] == second.placements[0]:
        # They chose at the same moment: the lower PeerID kept the gap, the other moved on.
        assert (first.placements, second.placements) == ([(0, 2)], [(0, 2), (2, 4)])
    records = await swarm.records()
    for node in (x, y):
        mine = records[str(node.host.peer_id)]
        assert (mine.state, (mine.start, mine.end)) == (ServerState.ONLINE, node.span)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rival_ranks_first", [True, False])
async def test_a_joining_server_yields_a_gap_only_to_a_lower_peer_id(
    swarm: Swarm, rival_ranks_first: bool
) -> None:
    low, high = _keys(2)
    rival_key, node_key = (low, high) if rival_ranks_first else (high, low)
    rival: list[Announced] = []

    async def sleep(seconds: float) -> None:
        # While the node settles on its first choice, a rival announces the same blocks:
        # both chose at the same moment.
        if not rival:
            rival.append(await swarm.announced((0, 2), 100.0, ServerState.JOINING, rival_key))
        await asyncio.sleep(seconds)

    node = await swarm.node(node_key, num_blocks=2, sleep=sleep)
    if rival_ranks_first:
        assert node.placements == [(0, 2), (2, 4)] and node.span == (2, 4)
    else:
        assert node.placements == [(0, 2)] and node.span == (0, 2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rebalance", [True, False])
async def test_rebalancing_checks_are_jittered_and_can_be_switched_off(
    swarm: Swarm, rebalance: bool
) -> None:
    assert ServerConfig(model="m").rebalance is True  # on by default
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    period = PlacementLimits(
        scheduler=SchedulerSettings(rebalance_period_s=0.2, rebalance_jitter=0.5),
        ping_interval_s=100.0,
    )
    await swarm.node(blocks=(0, 4), rebalance=rebalance, placement=period, sleep=sleep)
    await asyncio.sleep(1.5)
    checks = [w for w in waits if w < 1.0]  # the round-trip loop waits about 100 s
    if not rebalance:
        assert checks == []
        return
    assert len(checks) >= 4
    assert all(0.09 <= w <= 0.3 for w in checks), checks
    assert len({round(w, 3) for w in checks}) > 1, "checks are not jittered"


@pytest.mark.timeout(60)
async def test_sessions_open_on_the_old_span_drain_then_end_and_new_ones_use_the_new_span(
    swarm: Swarm,
) -> None:
    node = await swarm.node(blocks=(1, 4))
    t = node.model.throughput
    await swarm.announced((0, 2), 0.1 * t)
    await swarm.announced((2, 4), t)
    client, _ = await swarm.peer()
    await client.connect(node.host.addrs[0])
    model_id = node.model.manifest.model_id
    hidden = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(1))

    async def session(start: int, end: int) -> RpcStream:
        call = await client.rpc_open(node.host.peer_id, INFERENCE_PROTOCOL)
        await call.send(
            {
                "op": "open",
                "model": model_id,
                "start": start,
                "end": end,
                "batch": 1,
                "max_length": 8,
            }
        )
        opened = await call.recv()
        assert opened is not None and opened.value["op"] == "opened", opened
        return call

    async def step(call: RpcStream) -> RpcReply | None:
        sizes, payload = pack_tensors([hidden[:, :1]])
        await call.send({"op": "step", "tensors": sizes}, payload)
        return await call.recv()

    old = await session(1, 4)
    first = await step(old)
    assert first is not None and first.value["op"] == "out"
    moving = asyncio.ensure_future(node.rebalance_once())
    await asyncio.sleep(0.5)  # the node is draining the old span: the session goes on
    assert not moving.done()
    during = await step(old)
    assert during is not None and during.value["op"] == "out"
    move = await moving
    assert move is not None and node.span == (0, 3)
    assert move.seconds < LIMITS.drain_timeout_s + 3
    # Past the drain the old session is ended (closed, or told the server is leaving).
    try:
        after = await step(old)
    except P2PError:
        after = None
    assert after is None or "error" in after.value, after
    fresh = await session(0, 3)
    out = await step(fresh)
    assert out is not None and out.value["op"] == "out", out.value


@pytest.mark.timeout(60)
def test_respan_keeps_the_overlap_and_equals_a_fresh_load(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    checkpoint = Checkpoint.open(private_copy(tiny("llama"), tmp_path).path)
    manifest = load_manifest(checkpoint)
    hidden = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    span = load_span(checkpoint, 1, 3, manifest=manifest)
    for start, end, kept in ((0, 4, (1, 2)), (2, 3, (2,)), (3, 4, ())):
        moved = respan(span, checkpoint, start, end, manifest=manifest)
        for index in kept:
            assert moved.blocks[index - start] is span.blocks[index - 1]
        fresh = load_span(checkpoint, start, end)
        torch.testing.assert_close(moved.forward(hidden), fresh.forward(hidden))
    with pytest.raises(ValueError, match="not inside"):
        respan(span, checkpoint, 2, 5)
    with pytest.raises(ValueError, match="ping_interval_s"):
        PlacementLimits(ping_interval_s=0)
    with pytest.raises(ValueError, match="published_rtts"):
        PlacementLimits(published_rtts=0)
