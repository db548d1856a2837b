"""Batch forwards spread load by throughput (``RemoteChain.route_for_batch``).

Blocks [2, 4) are served by three in-process servers, one announcing ten times the
throughput of the other two: over many stateless forwards it must receive about ten times
the calls of each (``scheduler.route_for_throughput`` draws each hop with probability
proportional to throughput). The forwards still equal the local model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._client_chain import RemoteChain
from model_shards._server_node import ServerNode
from model_shards._server_protocol import FORWARD_PROTOCOL
from p2p import RpcContext, RpcReply
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import LocalSwarm, private_copy

FORWARDS = 240
FAST = 10.0
TOLERANCE = 0.06
"""Allowed gap between the fast server's share of the calls and its share of throughput."""


@pytest.fixture
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    made = LocalSwarm(tmp_path_factory.mktemp("batch-routing"))
    try:
        yield made
    finally:
        made.close()


def count_forwards(swarm: LocalSwarm, node: ServerNode) -> list[int]:
    """A one-element list counting the forward calls ``node`` serves from now on."""
    calls = [0]
    server = node.server
    serve = server._serve_forward

    async def counted(ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
        calls[0] += 1
        return await serve(ctx, request, payload)

    async def install() -> None:
        server.host.remove_handler(FORWARD_PROTOCOL)
        server.host.add_rpc_handler(FORWARD_PROTOCOL, counted)

    swarm.thread.run(install())
    return calls


@pytest.mark.timeout(60)
def test_a_server_ten_times_faster_gets_ten_times_the_batch_calls(
    swarm: LocalSwarm, tiny: Callable[[str], TinyModel]
) -> None:
    tm = private_copy(tiny("llama"), swarm.cache_dir)
    swarm.serve(tm.path, 0, 2, rebalance=False)
    fast, *slow = (swarm.serve(tm.path, 2, 4, rebalance=False) for _ in range(3))
    base = fast.server.throughput
    swarm.announce_throughput(fast, base * FAST)
    for node in slow:
        swarm.announce_throughput(node, base)
    counts = {node: count_forwards(swarm, node) for node in (fast, *slow)}

    with DistributedModelForCausalLM.from_pretrained(tm.path, initial_peers=[swarm.addr]) as model:
        chain = model.chain
        model.chain = RemoteChain(
            chain.host, chain.dht, chain.model_id, chain.num_blocks, rng=random.Random(5)
        )
        ids = prompts(2, 6, seed=9)
        expected = tm.model(ids).logits
        for _ in range(FORWARDS):
            with torch.no_grad():
                logits = model(ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)

    calls = {node: count[0] for node, count in counts.items()}
    assert sum(calls.values()) == FORWARDS
    share = calls[fast] / FORWARDS
    ideal = FAST / (FAST + len(slow))
    print(f"fast server: {calls[fast]} of {FORWARDS} calls ({share:.3f}, ideal {ideal:.3f})")
    assert abs(share - ideal) <= TOLERANCE
    for node in slow:
        assert 0 < calls[node] < calls[fast] / 4


@pytest.mark.timeout(60)
def test_batch_forwards_go_on_when_a_server_leaves(
    swarm: LocalSwarm, tiny: Callable[[str], TinyModel]
) -> None:
    tm = private_copy(tiny("llama"), swarm.cache_dir)
    swarm.serve(tm.path, 0, 2, rebalance=False)
    leaving, staying = (swarm.serve(tm.path, 2, 4, rebalance=False) for _ in range(2))
    counts = {node: count_forwards(swarm, node) for node in (leaving, staying)}
    ids = prompts(1, 5, seed=4)
    expected = tm.model(ids).logits
    with DistributedModelForCausalLM.from_pretrained(tm.path, initial_peers=[swarm.addr]) as model:
        for forward in range(40):
            if forward == 20:
                swarm.stop(leaving)
                left_with = counts[leaving][0]
            with torch.no_grad():
                logits = model(ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # every forward after the stop ran on the staying server; the leaving one answered at
    # most one more call (with an error), and was banned
    assert left_with > 0 and counts[leaving][0] - left_with <= 1
    assert counts[staying][0] + left_with == 40
