"""The shard server over real loopback TCP: sessions, forward, backward, and bad requests.

Requests are written by hand (``_server_protocol``), so that every malformed case can be
sent; each bad request must get its typed error while the other sessions keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from model_shards import (
    CacheLimits,
    CachePool,
    Checkpoint,
    Span,
    load_manifest,
    load_span,
)
from model_shards._server import ShardServer
from model_shards._server_errors import remote_error
from model_shards._server_limits import ServerLimits
from model_shards._server_protocol import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    pack_tensors,
    unpack_tensors,
)
from model_shards._wire import Compression, encode_tensor
from p2p import Host, RemoteError, RpcReply, RpcStream
from security import KeyPair
from tests.model_shards.tiny import TinyModel
from tests.swarm.harness import private_copy
from transport import Multiaddr, TcpTransport

WIRE = ServerLimits().wire


@dataclass
class Served:
    server: ShardServer
    client: Host
    span: Span
    model_id: str

    def open_request(self, **changes: Any) -> dict[str, Any]:
        request = {
            "op": "open",
            "model": self.model_id,
            "start": 0,
            "end": 4,
            "batch": 1,
            "max_length": 16,
        }
        return {**request, **changes}


async def serve(
    tm: TinyModel, limits: ServerLimits, throughput: float
) -> tuple[Host, Host, ShardServer, Span, str]:
    checkpoint = Checkpoint.open(tm.path)
    manifest = load_manifest(checkpoint)
    span = load_span(checkpoint, 0, tm.num_blocks, manifest=manifest)
    server_key, client_key = KeyPair.generate(), KeyPair.generate()
    host = Host(server_key, [TcpTransport(server_key)])
    await host.start([Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")])
    client = Host(client_key, [TcpTransport(client_key)])
    await client.start([])
    await client.connect(host.addrs[0])
    server = ShardServer(host, span, manifest, throughput=throughput, limits=limits)
    server.start()
    return host, client, server, span, manifest.model_id


@pytest.fixture
async def make_served(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    stops: list[tuple[ShardServer, Host, Host]] = []

    async def make(limits: ServerLimits | None = None, throughput: float = 100.0) -> Served:
        host, client, server, span, model_id = await serve(
            private_copy(tiny("llama"), tmp_path), limits or ServerLimits(), throughput
        )
        stops.append((server, host, client))
        return Served(server, client, span, model_id)

    yield make
    for server, host, client in stops:
        await server.stop()
        await client.stop()
        await host.stop()


async def exchange(call: RpcStream, value: Any, tensors: list[torch.Tensor] = ()) -> RpcReply:  # type: ignore[assignment]
    sizes, payload = pack_tensors(list(tensors))
    if tensors:
        value = {**value, "tensors": sizes}
    await call.send(value, payload if tensors else None)
    reply = await call.recv()
    assert reply is not None
    return reply


def output(reply: RpcReply) -> torch.Tensor:
    assert "error" not in reply.value, reply.value
    (tensor,) = unpack_tensors(reply.value["tensors"], reply.payload, WIRE, count=range(1, 2))
    return tensor.clone()


def error_code(reply: RpcReply) -> str:
    assert isinstance(reply.value, dict) and "error" in reply.value, reply.value
    return reply.value["error"]


async def open_session(served: Served, **changes: Any) -> RpcStream:
    call = await served.client.rpc_open(served.server.host.peer_id, INFERENCE_PROTOCOL)
    reply = await exchange(call, served.open_request(**changes))
    assert reply.value == {"op": "opened", "position": 0}, reply.value
    return call


@pytest.mark.parametrize("throughput", [100.0, 1e9], ids=["compute-thread", "inline"])
async def test_session_steps_equal_a_local_span_and_rollback_works(
    make_served: Any, throughput: float
) -> None:
    served = await make_served(throughput=throughput)
    hidden = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(3))
    with served.span.open_session(CachePool(), batch_size=1, max_length=16) as local:
        expected = [local.step(hidden[:, :4]), local.step(hidden[:, 4:5])]
        local.rollback(4)
        expected.append(local.step(hidden[:, 5:6]))
    call = await open_session(served)
    step = {"op": "step"}
    assert torch.equal(output(await exchange(call, step, [hidden[:, :4]])), expected[0])
    reply = await exchange(call, step, [hidden[:, 4:5]])
    assert reply.value["position"] == 5
    assert torch.equal(output(reply), expected[1])
    assert (await exchange(call, {"op": "rollback", "position": 4})).value == {
        "op": "ok",
        "position": 4,
    }
    assert torch.equal(output(await exchange(call, step, [hidden[:, 5:6]])), expected[2])
    assert served.server.open_sessions == 1
    await call.aclose()
    await asyncio.sleep(0.05)
    assert served.server.open_sessions == 0
    assert served.server.pool.used_bytes == 0


async def test_bad_requests_get_typed_errors_and_sessions_live_on(make_served: Any) -> None:
    served = await make_served()
    good = await open_session(served)
    bad = await open_session(served)
    hidden = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(4))
    with served.span.open_session(CachePool(), batch_size=1, max_length=16) as local:
        expected = [local.step(hidden[:, i : i + 1]) for i in range(3)]
    step = {"op": "step"}
    assert torch.equal(output(await exchange(good, step, [hidden[:, :1]])), expected[0])

    cases = [
        (step, [torch.zeros(1, 1, 31)], "invalid_shape"),
        (step, [torch.zeros(1, 1, 32, dtype=torch.float16)], "wrong_dtype"),
        (step, [torch.zeros(2, 1, 32)], "invalid_shape"),
        (step, [torch.zeros(1, 17, 32)], "too_long"),
        (step, [torch.zeros(1, 2, 32), torch.ones(1, 3, dtype=torch.bool)], "bad_request"),
        ({"op": "rollback", "position": 5}, [], "bad_request"),
        ({"op": "dance"}, [], "bad_request"),
        ({"op": "open"}, [], "bad_request"),
        ("not a map", [], "bad_request"),
        ({"op": "step", "compression": "zip"}, [torch.zeros(1, 1, 32)], "bad_request"),
    ]
    for value, tensors, code in cases:
        assert error_code(await exchange(bad, value, tensors)) == code, (value, code)
    garbage = [
        ({"op": "step", "tensors": [12]}, b"\x00" * 12),
        ({"op": "step", "tensors": [3, 4]}, b"\xff" * 7),
        ({"op": "step", "tensors": [4]}, b"\x00" * 9),
        ({"op": "step", "tensors": "many"}, b""),
        ({"op": "step"}, None),
    ]
    for value, payload in garbage:
        await bad.send(value, payload)
        reply = await bad.recv()
        assert reply is not None
        assert error_code(reply) == "malformed_tensor", value
    header = encode_tensor(torch.zeros(1, 1, 32))[0]
    await bad.send({"op": "step", "tensors": [len(header) + 5]}, bytes(header) + b"\x00" * 5)
    assert error_code(await bad.recv()) == "malformed_tensor"  # type: ignore[arg-type]

    # the bad session still works, and the good one never noticed
    assert torch.equal(output(await exchange(bad, step, [hidden[:, :1]])), expected[0])
    assert torch.equal(output(await exchange(good, step, [hidden[:, 1:2]])), expected[1])
    assert torch.equal(output(await exchange(good, step, [hidden[:, 2:3]])), expected[2])
    await good.aclose()
    await bad.aclose()


async def test_open_errors_unknown_session_and_blocks_not_served(make_served: Any) -> None:
    served = await make_served()
    peer = served.server.host.peer_id
    cases = [
        ({"op": "step", "tensors": []}, "unknown_session"),
        ({"op": "rollback", "position": 0}, "unknown_session"),
        (served.open_request(model="0" * 64), "block_not_served"),
        (served.open_request(start=2, end=6), "block_not_served"),
        (served.open_request(start=3, end=3), "block_not_served"),
        (served.open_request(max_length=10**6), "too_long"),
        (served.open_request(batch="one"), "bad_request"),
        ([1, 2, 3], "bad_request"),
    ]
    for value, code in cases:
        call = await served.client.rpc_open(peer, INFERENCE_PROTOCOL)
        assert error_code(await exchange(call, value)) == code, value
        assert await call.recv() is None  # a failed open ends the call
        await call.aclose()
    # a sub-span of the server's span is served
    call = await open_session(served, start=1, end=3)
    hidden = torch.randn(1, 2, 32)
    sub = Span(
        served.span.family,
        list(served.span.blocks)[1:3],
        1,
        dtype=torch.float32,
        device=served.span.device,
        quantization=served.span.quantization,
    )
    assert torch.equal(output(await exchange(call, {"op": "step"}, [hidden])), sub.forward(hidden))
    await call.aclose()


async def test_a_full_cache_fails_fast_with_its_figures(make_served: Any) -> None:
    per_session = 4 * 2 * 2 * 8 * 4 * 16  # blocks x (k, v) x kv heads x head dim x bytes x tokens
    limits = ServerLimits(cache=CacheLimits(max_bytes=per_session + per_session // 2))
    served = await make_served(limits)
    assert served.server.cache_tokens_left() == 24
    first = await open_session(served)
    call = await served.client.rpc_open(served.server.host.peer_id, INFERENCE_PROTOCOL)
    reply = await exchange(call, served.open_request())
    assert error_code(reply) == "cache_full"
    error = remote_error(reply.value, served.server.host.peer_id)
    assert (error.requested, error.available) == (per_session, per_session // 2)  # type: ignore[attr-defined]
    await call.aclose()
    await first.aclose()
    await asyncio.sleep(0.05)
    (await open_session(served)).cancel()


async def test_garbage_frames_end_only_their_own_stream(make_served: Any) -> None:
    served = await make_served()
    good = await open_session(served)
    peer = served.server.host.peer_id
    stream, _ = await served.client.new_stream(peer, [INFERENCE_PROTOCOL])
    await stream.write(b"\xff\x00garbage that is no frame at all" * 10)
    await stream.close()
    with pytest.raises(RemoteError):
        await served.client.rpc_call(peer, FORWARD_PROTOCOL, {"model": 1}, b"\x01\x02")
    hidden = torch.randn(1, 2, 32)
    assert torch.equal(
        output(await exchange(good, {"op": "step"}, [hidden])), served.span.forward(hidden)
    )
    await good.aclose()


async def test_forward_and_backward_equal_the_span(make_served: Any) -> None:
    served = await make_served()
    peer = served.server.host.peer_id
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    request = {"model": served.model_id, "start": 0, "end": 4}

    async def call(protocol: str, tensors: list[torch.Tensor], **extra: Any) -> torch.Tensor:
        sizes, payload = pack_tensors(tensors, extra.get("compression", Compression.NONE))
        reply = await served.client.rpc_call(
            peer, protocol, {**request, "tensors": sizes, **extra}, payload
        )
        return output(reply)

    expected = served.span.forward(hidden, attention_mask=mask)
    assert torch.equal(await call(FORWARD_PROTOCOL, [hidden, mask]), expected)
    expected_grad = served.span.backward(hidden, grad, attention_mask=mask)
    assert torch.equal(await call(BACKWARD_PROTOCOL, [hidden, grad, mask]), expected_grad)
    compressed = await call(FORWARD_PROTOCOL, [hidden, mask], compression="float16")
    torch.testing.assert_close(compressed, expected, rtol=0, atol=1e-2)
    for protocol, tensors, changes, code in [
        (FORWARD_PROTOCOL, [torch.zeros(1, 2, 16)], {}, "invalid_shape"),
        (FORWARD_PROTOCOL, [hidden], {"start": 4, "end": 5}, "block_not_served"),
        (BACKWARD_PROTOCOL, [hidden], {}, "malformed_tensor"),
        (BACKWARD_PROTOCOL, [hidden, grad[:, :4]], {}, "invalid_shape"),
    ]:
        sizes, payload = pack_tensors(tensors)
        with pytest.raises(RemoteError) as raised:
            await served.client.rpc_call(
                peer, protocol, {**request, "tensors": sizes, **changes}, payload
            )
        assert raised.value.code == code


async def test_idle_sessions_time_out(make_served: Any) -> None:
    served = await make_served(ServerLimits(session_idle_timeout_s=0.2))
    call = await open_session(served)
    reply = await call.recv()
    assert reply is not None and error_code(reply) == "session_timeout"
    assert await call.recv() is None
    assert served.server.open_sessions == 0


async def test_a_stopping_server_drains_sessions_and_refuses_new_ones(make_served: Any) -> None:
    served = await make_served(ServerLimits(drain_timeout_s=5.0))
    call = await open_session(served)
    stopping = asyncio.ensure_future(served.server.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    late = await served.client.rpc_open(served.server.host.peer_id, INFERENCE_PROTOCOL)
    assert error_code(await exchange(late, served.open_request())) == "server_shutting_down"
    hidden = torch.randn(1, 1, 32)
    assert torch.equal(
        output(await exchange(call, {"op": "step"}, [hidden])), served.span.forward(hidden)
    )
    await call.aclose()
    await asyncio.wait_for(stopping, 5)


def test_throughput_is_measured_once_and_cached(
    tiny: Callable[[str], TinyModel], tmp_path: Any
) -> None:
    from model_shards._quant import Quantization
    from model_shards._server_throughput import CACHE_FILE, throughput_for

    checkpoint = Checkpoint.open(tiny("llama").path)
    args = dict(dtype=torch.float32, device=torch.device("cpu"), quantization=Quantization.NONE)
    first = throughput_for(checkpoint, "model-a", cache_dir=tmp_path, **args)
    assert first > 0
    assert (tmp_path / CACHE_FILE).is_file()
    assert throughput_for(checkpoint, "model-a", cache_dir=tmp_path, **args) == first
    cached = (tmp_path / CACHE_FILE).read_text()
    assert "model-a" in cached and "float32" in cached


def test_client_side_errors_keep_their_types() -> None:
    from model_shards import CacheFull, TooLong
    from model_shards._server_errors import BlockNotServed, ServerError

    assert isinstance(remote_error({"error": "too_long", "message": "x"}, "peer"), TooLong)
    assert isinstance(remote_error({"error": "block_not_served"}, "peer"), BlockNotServed)
    full = remote_error({"error": "cache_full", "requested": 5, "available": 2}, "p")
    assert isinstance(full, CacheFull) and (full.requested, full.available) == (5, 2)
    other = remote_error({"error": "weird", "message": "m"}, "peer")
    assert isinstance(other, ServerError) and other.remote_code == "weird"
    assert "peer" in str(other)
