"""Server-to-server push, step ids, relinking and graceful leave, over real loopback TCP.

Chains of in-process shard servers (each its own Host) serve the tiny Llama's blocks in
parts; the requests are written by hand (``_server_protocol``), so each rule of the
protocol is exercised on its own: a step sent to the first hop reaches every hop by
push and each hop answers on its own stream, a step seen twice runs once, pushes from
anyone but the named previous server are refused, a refused push leaves the relay to
the client, and a stopping server tells the sessions it still holds to go elsewhere.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from model_shards import CachePool, Checkpoint, Span, load_manifest, load_span
from model_shards._server import ShardServer
from model_shards._server_limits import ServerLimits
from model_shards._server_protocol import (
    INFERENCE_PROTOCOL,
    PUSH_PROTOCOL,
    pack_tensors,
    unpack_tensors,
)
from p2p import Host, RemoteError, RpcReply, RpcStream
from security import KeyPair
from tests.model_shards.tiny import TinyModel
from tests.swarm.harness import private_copy
from transport import Multiaddr, TcpTransport

pytestmark = pytest.mark.timeout(60)

WIRE = ServerLimits().wire
QUIET_S = 0.3
"""How long a stream must stay silent to count as 'nothing was sent'."""


@dataclass
class Chain:
    servers: list[ShardServer]
    client: Host
    model_id: str

    def hop(self, index: int) -> Host:
        return self.servers[index].host

    def span(self, index: int) -> Span:
        return self.servers[index].span


@pytest.fixture
async def make_chain(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    made: list[Chain] = []

    async def make(bounds: Sequence[tuple[int, int]], limits: ServerLimits | None = None) -> Chain:
        checkpoint = Checkpoint.open(private_copy(tiny("llama"), tmp_path).path)
        manifest = load_manifest(checkpoint)
        servers = []
        for start, end in bounds:
            key = KeyPair.generate()
            host = Host(key, [TcpTransport(key)])
            await host.start([Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")])
            span = load_span(checkpoint, start, end, manifest=manifest)
            server = ShardServer(host, span, manifest, throughput=100.0, limits=limits)
            server.start()
            servers.append(server)
        key = KeyPair.generate()
        client = Host(key, [TcpTransport(key)])
        await client.start([])
        for server in servers:
            await client.connect(server.host.addrs[0])
        chain = Chain(servers, client, manifest.model_id)
        made.append(chain)
        return chain

    yield make
    for chain in made:
        for server in chain.servers:
            await server.stop()
        await chain.client.stop()
        for server in chain.servers:
            await server.host.stop()


def next_of(chain: Chain, index: int, session_id: bytes) -> dict[str, Any]:
    host = chain.hop(index)
    return {
        "peer": str(host.peer_id),
        "addrs": [str(a) for a in host.addrs],
        "session_id": session_id,
    }


async def open_hop(
    chain: Chain, index: int, session_id: bytes, *, prev: str | None, next: Any
) -> RpcStream:
    span = chain.span(index)
    call = await chain.client.rpc_open(chain.hop(index).peer_id, INFERENCE_PROTOCOL)
    await call.send(
        {
            "op": "open",
            "model": chain.model_id,
            "start": span.start,
            "end": span.end,
            "batch": 1,
            "max_length": 16,
            "session_id": session_id,
            "prev": prev,
            "next": next,
        }
    )
    reply = await call.recv()
    assert reply is not None and reply.value == {"op": "opened", "position": 0}, reply
    return call


async def open_chain(chain: Chain) -> tuple[list[RpcStream], list[bytes]]:
    """One session per hop, each linked to its neighbours for push."""
    ids = [os.urandom(16) for _ in chain.servers]
    calls = []
    last = len(ids) - 1
    for i, session_id in enumerate(ids):
        prev = None if i == 0 else str(chain.hop(i - 1).peer_id)
        nxt = None if i == last else next_of(chain, i + 1, ids[i + 1])
        calls.append(await open_hop(chain, i, session_id, prev=prev, next=nxt))
    return calls, ids


async def send_step(
    call: RpcStream, step: int, tensors: list[torch.Tensor], *, push: bool = True
) -> None:
    sizes, payload = pack_tensors(tensors)
    await call.send({"op": "step", "step": step, "push": push, "tensors": sizes}, payload)


async def recv(call: RpcStream) -> RpcReply:
    async with asyncio.timeout(10):
        reply = await call.recv()
    assert reply is not None
    return reply


def output(reply: RpcReply) -> torch.Tensor:
    assert "error" not in reply.value, reply.value
    (tensor,) = unpack_tensors(reply.value["tensors"], reply.payload, WIRE, count=range(1, 2))
    return tensor.clone()


async def silent(call: RpcStream) -> bool:
    try:
        async with asyncio.timeout(QUIET_S):
            await call.recv()
    except TimeoutError:
        return True
    return False


def local_chain(chain: Chain, inputs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Any:
    """Every hop's expected output for each step, computed with local sessions."""
    sessions = [
        server.span.open_session(CachePool(), batch_size=1, max_length=16)
        for server in chain.servers
    ]
    expected = []
    for hidden, mask in inputs:
        outs = []
        for session in sessions:
            hidden = session.step(hidden, attention_mask=mask)
            outs.append(hidden)
        expected.append(outs)
    for session in sessions:
        session.close()
    return expected


async def test_a_step_sent_to_the_first_hop_reaches_every_hop_by_push(make_chain: Any) -> None:
    chain = await make_chain([(0, 1), (1, 3), (3, 4)])
    calls, _ = await open_chain(chain)
    generator = torch.Generator().manual_seed(7)
    prompt_mask = torch.tensor([[False, True, True]])
    inputs = [(torch.randn(1, 3, 32, generator=generator), prompt_mask)]
    inputs += [(torch.randn(1, 1, 32, generator=generator), None) for _ in range(3)]
    expected = local_chain(chain, inputs)
    position = 0
    for step, (hidden, mask) in enumerate(inputs):
        await send_step(calls[0], step, [hidden] if mask is None else [hidden, mask])
        position += hidden.shape[1]
        for i, call in enumerate(calls):
            reply = await recv(call)
            assert reply.value["step"] == step
            assert reply.value["position"] == position
            assert reply.value["pushed"] is (i < len(calls) - 1), (i, reply.value)
            assert torch.equal(output(reply), expected[step][i]), (step, i)
    # the client relays the last step to the middle hop as well: it ran, so the hop sends
    # its last answer again and runs nothing
    last = len(inputs) - 1
    await send_step(calls[1], last, [expected[last][0]])
    again = await recv(calls[1])
    assert again.value["step"] == last and again.value["position"] == position
    assert torch.equal(output(again), expected[last][1])
    assert await silent(calls[2]), "a duplicate step is not pushed again"
    for call in calls:
        await call.aclose()


async def test_pushes_are_checked_and_duplicates_acked_and_dropped(make_chain: Any) -> None:
    chain = await make_chain([(0, 2), (2, 4)])
    calls, ids = await open_chain(chain)
    prev = chain.hop(0)
    target = chain.hop(1).peer_id
    hidden = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(8))
    sizes, payload = pack_tensors([hidden])
    good = {"session_id": ids[1], "step": 0, "push": False, "tensors": sizes}

    async def refused(host: Host, request: Any, data: bytes | None) -> str:
        with pytest.raises(RemoteError) as raised:
            await host.rpc_call(target, PUSH_PROTOCOL, request, data, timeout=5)
        return raised.value.code

    await chain.client.connect(chain.hop(1).addrs[0])
    assert await refused(chain.client, good, payload) == "not_allowed"
    await prev.connect(chain.hop(1).addrs[0])
    assert await refused(prev, {**good, "session_id": os.urandom(16)}, payload) == (
        "unknown_session"
    )
    assert await refused(prev, {**good, "step": None}, payload) == "bad_request"
    assert await refused(prev, {**good, "session_id": "sid"}, payload) == "bad_request"
    assert await refused(prev, {**good, "tensors": [len(payload) + 1]}, payload) == (
        "malformed_tensor"
    )
    assert await refused(prev, "not a map", None) == "bad_request"
    assert await silent(calls[1]), "a refused push runs nothing"

    reply = await prev.rpc_call(target, PUSH_PROTOCOL, good, payload, timeout=5)
    assert reply.value == {"ok": True}
    out = await recv(calls[1])
    assert out.value["step"] == 0 and out.value["position"] == 1
    assert out.value["pushed"] is False
    assert torch.equal(output(out), chain.span(1).forward(hidden))
    # the same step pushed again is acknowledged and dropped
    reply = await prev.rpc_call(target, PUSH_PROTOCOL, good, payload, timeout=5)
    assert reply.value == {"ok": True}
    assert await silent(calls[1])
    await send_step(calls[1], 1, [hidden], push=False)
    assert (await recv(calls[1])).value["position"] == 2, "the duplicate did not run"
    for call in calls:
        await call.aclose()


async def test_a_refused_push_is_left_to_the_client_and_link_repairs_the_chain(
    make_chain: Any,
) -> None:
    chain = await make_chain([(0, 2), (2, 4)])
    second = os.urandom(16)
    first = await open_hop(
        chain, 0, os.urandom(16), prev=None, next=next_of(chain, 1, os.urandom(16))
    )
    follower = await open_hop(chain, 1, second, prev=str(chain.hop(0).peer_id), next=None)
    generator = torch.Generator().manual_seed(9)
    inputs = [(torch.randn(1, 1, 32, generator=generator), None) for _ in range(2)]
    expected = local_chain(chain, inputs)

    await send_step(first, 0, [inputs[0][0]])
    reply = await recv(first)
    assert reply.value["pushed"] is False, "the next session named does not exist"
    assert await silent(follower)
    await send_step(follower, 0, [output(reply)])  # the client relays
    assert torch.equal(output(await recv(follower)), expected[0][1])

    await first.send({"op": "link", "prev": None, "next": next_of(chain, 1, second)})
    assert (await recv(first)).value == {"op": "ok", "position": 1}
    await send_step(first, 1, [inputs[1][0]])
    assert (await recv(first)).value["pushed"] is True
    pushed = await recv(follower)
    assert pushed.value["step"] == 1 and torch.equal(output(pushed), expected[1][1])

    # once a push was acknowledged, the next ones do not wait for theirs: the next server
    # tells its own client of a refusal (the client relays), and the push after a refusal
    # waits and reports again
    await follower.send({"op": "link", "prev": None, "next": None})
    assert (await recv(follower)).value == {"op": "ok", "position": 2}
    await send_step(first, 2, [inputs[0][0]])
    out = await recv(first)
    assert out.value["pushed"] is True
    notice = await recv(follower)
    assert notice.value == {"op": "push_refused", "step": 2, "reason": "not_allowed"}
    await send_step(follower, 2, [output(out)])
    assert (await recv(follower)).value["position"] == 3
    await send_step(first, 3, [inputs[0][0]])
    assert (await recv(first)).value["pushed"] is False
    assert await silent(follower), "a refusal the sender waited for is not told twice"
    await follower.aclose()

    await first.send({"op": "link", "prev": None, "next": {"peer": "nobody"}})
    assert (await recv(first)).value["error"] == "bad_request"
    await first.aclose()


async def test_session_ids_are_unique_per_server(make_chain: Any) -> None:
    chain = await make_chain([(0, 4)])
    session_id = os.urandom(16)
    call = await open_hop(chain, 0, session_id, prev=None, next=None)
    again = await chain.client.rpc_open(chain.hop(0).peer_id, INFERENCE_PROTOCOL)
    await again.send(
        {
            "op": "open",
            "model": chain.model_id,
            "start": 0,
            "end": 4,
            "batch": 1,
            "max_length": 16,
            "session_id": session_id,
        }
    )
    assert (await recv(again)).value["error"] == "bad_request"
    await again.aclose()
    await call.aclose()
    await asyncio.sleep(0.05)
    call = await open_hop(chain, 0, session_id, prev=None, next=None)
    await call.aclose()


async def test_a_leaving_server_tells_its_open_sessions_to_go_elsewhere(make_chain: Any) -> None:
    chain = await make_chain([(0, 2), (2, 4)], ServerLimits(drain_timeout_s=0.3))
    calls, _ = await open_chain(chain)
    hidden = torch.randn(1, 1, 32)
    await send_step(calls[0], 0, [hidden])
    for call in calls:
        assert "error" not in (await recv(call)).value
    server = chain.servers[1]
    stopping = asyncio.ensure_future(server.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done(), "open sessions get the drain time first"
    late = await chain.client.rpc_open(server.host.peer_id, INFERENCE_PROTOCOL)
    await late.send({"op": "open", "model": chain.model_id, "start": 2, "end": 4, "batch": 1})
    assert (await recv(late)).value["error"] == "server_shutting_down"
    await late.aclose()
    told = await recv(calls[1])
    assert told.value["error"] == "server_shutting_down", told.value
    async with asyncio.timeout(5):
        assert await calls[1].recv() is None, "the session's call ends"
        await stopping
    assert server.open_sessions == 0 and server.pool.used_bytes == 0
    await calls[0].aclose()
    await calls[1].aclose()
