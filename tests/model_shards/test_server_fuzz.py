"""Every shard server RPC handler under hostile values, on a live in-process server.

Seeded cases, thousands in all: inference streams opened with hostile fields and then
sent steps, links, rollbacks and unknown ops with hostile values, sizes, tensor headers
and payloads; forward and backward calls; pushes with hostile session ids, steps and
tensors from the allowed previous peer and from others. The server must never crash:
every answer is a result or a typed error (a ``ShardError`` code, or ``overloaded`` for a
push the session has no room for), never ``internal`` and never a hang, nothing is
logged as an error, and an honest session opened before the fuzzing still steps exactly
like a local span afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from model_shards import (
    CacheLimits,
    CachePool,
    Checkpoint,
    Span,
    _errors,
    _server_errors,
    load_manifest,
    load_span,
)
from model_shards._errors import ShardError
from model_shards._server import ShardServer
from model_shards._server_limits import ServerLimits
from model_shards._server_protocol import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    PUSH_PROTOCOL,
    pack_tensors,
    unpack_tensors,
)
from model_shards._wire import Compression
from p2p import Host, RemoteError, RpcCode, RpcContext, RpcError, RpcReply, RpcStream
from security import KeyPair
from tests.fuzz_values import as_key, deep_nest, edge_scalars
from tests.model_shards.tiny import TinyModel
from tests.swarm.harness import private_copy
from transport import Multiaddr, TcpTransport

HIDDEN = 32
LIMITS = ServerLimits(
    cache=CacheLimits(max_bytes=256 * 1024, max_sessions=16, max_length=64, max_batch_size=4),
    push_timeout_s=0.3,
    session_queue=8,
    drain_timeout_s=1.0,
)
TYPED = frozenset(
    cls.code
    for module in (_errors, _server_errors)
    for cls in vars(module).values()
    if isinstance(cls, type) and issubclass(cls, ShardError) and cls is not ShardError
) | {RpcCode.OVERLOADED}
"""Every code a hostile request may get: the package's typed errors, and a full inbox."""
ANSWER_S = 10.0
"""Longest wait for any one answer: past it the server hangs."""
DTYPES = [torch.float32] * 6 + [
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test during which anything logged an error (a handler's crash included)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "errors logged:\n" + "\n".join(r.getMessage() for r in errors)


@dataclass
class Live:
    server: ShardServer
    client: Host
    attacker: Host
    span: Span
    model_id: str

    @property
    def peer(self) -> Any:
        return self.server.host.peer_id

    def open_request(self, **changes: Any) -> dict[str, Any]:
        request = {"op": "open", "model": self.model_id, "start": 0, "end": 4}
        return {**request, "batch": 1, "max_length": 16, **changes}


@pytest.fixture
async def live(tiny: Callable[[str], TinyModel], tmp_path: Path) -> AsyncIterator[Live]:
    checkpoint = Checkpoint.open(private_copy(tiny("llama"), tmp_path).path)
    manifest = load_manifest(checkpoint)
    span = load_span(checkpoint, 0, 4, manifest=manifest)
    hosts = []
    for _ in range(3):
        key = KeyPair.generate()
        host = Host(key, [TcpTransport(key)])
        await host.start([Multiaddr.from_string("/ip4/127.0.0.1/tcp/0")])
        hosts.append(host)
    server_host, client, attacker = hosts
    await client.connect(server_host.addrs[0])
    await attacker.connect(server_host.addrs[0])
    server = ShardServer(server_host, span, manifest, throughput=100.0, limits=LIMITS)
    server.start()
    try:
        yield Live(server, client, attacker, span, manifest.model_id)
    finally:
        await server.stop()
        for host in hosts:
            await host.stop()


class Hostile:
    """Seeded hostile values: wrong types, edge numbers, wrong lengths, near-valid requests
    with some fields wrong, and tensors whose sizes, headers or bytes lie."""

    def __init__(self, rng: random.Random, live: Live) -> None:
        self.rng = rng
        self.live = live
        self.peers = [str(live.attacker.peer_id), str(live.client.peer_id), str(live.peer)]
        self.session_ids: list[bytes] = []
        """Ids of sessions open on the server, for hostile links and opens to name."""

    def scalar(self) -> Any:
        r = self.rng
        return r.choice(
            [
                *edge_scalars(r),
                1,
                3,
                16,
                64,
                2**31,
                "step",
                "none",
                "float16",
                r.randbytes(r.choice([1, 16, 64, 65, 300])),
                self.live.model_id,
                r.choice(self.peers),
                [],
                {},
            ]
        )

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        roll = r.random()
        if depth > 2 or roll < 0.6:
            return self.scalar()
        if roll < 0.8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        if roll < 0.95:
            return {self.key(): self.value(depth + 1) for _ in range(r.randint(0, 4))}
        return deep_nest(r, self.scalar(), 40)

    def key(self) -> Any:
        return as_key(self.scalar())

    def pick(self, valid: Any) -> Any:
        """``valid`` most of the time, else a hostile value."""
        return valid if self.rng.random() < 0.6 else self.value()

    def mutate(self, request: dict[str, Any], fields: list[str]) -> Any:
        """``request`` with some fields changed, dropped or added, or something else."""
        r = self.rng
        if r.random() < 0.05:
            return self.value()
        message = dict(request)
        for _ in range(r.choice([0, 1, 1, 2, 3])):
            field = r.choice([*fields, self.key()])
            if r.random() < 0.2:
                message.pop(field, None)
            else:
                message[field] = self.value()
        return message

    # -- chains ------------------------------------------------------------------------------

    def prev(self) -> Any:
        return self.rng.choice([None] * 6 + [*self.peers, "Qm" + "1" * 44, "", "0OIl"])

    def next(self) -> Any:
        r = self.rng
        if r.random() < 0.5:
            return self.rng.choice([None, None, None, self.value()])
        addrs = r.choice(
            [
                [],
                ["/ip4/127.0.0.1/tcp/1"],
                [str(a) for a in self.live.server.host.addrs],
                ["/ip4/127.0.0.1/udp/1/quic-v1", "/memory/nowhere"],
                ["not a multiaddr", 7],
                ["/ip4/127.0.0.1/tcp/1"] * 17,
            ]
        )
        hop = {"peer": r.choice([*self.peers, "nobody"]), "addrs": addrs}
        hop["session_id"] = r.choice([os.urandom(16), *self.session_ids, b"", b"x" * 65, None])
        return self.mutate(hop, ["peer", "addrs", "session_id"])

    # -- tensors -----------------------------------------------------------------------------

    def tensor(self, batch: int, tokens: int, *, mask: bool = False) -> torch.Tensor:
        r = self.rng
        shape = [batch, tokens] if mask else [batch, tokens, HIDDEN]
        if r.random() < 0.15:
            shape = [r.choice([0, 1, 2, 5, 65, HIDDEN - 1]) for _ in range(r.randint(0, 4))]
        dtype = torch.bool if mask else torch.float32
        if r.random() < 0.3:
            dtype = r.choice(DTYPES)
        if dtype == torch.bool:
            return torch.rand(shape) < 0.7
        if not dtype.is_floating_point:
            return torch.randint(-3, 4, shape).to(dtype)
        values = torch.randn(shape)
        if values.numel() and r.random() < 0.1:
            values.view(-1)[0] = r.choice([math.nan, math.inf, -math.inf, 1e30])
        return values.to(dtype)

    def tensors(self, count: int, batch: int = 1, states: int = 1) -> tuple[Any, bytes | None]:
        """``tensors`` sizes and a payload: ``count`` tensors (``states`` hidden states, then
        masks), valid half of the time, else of hostile shapes and dtypes, or damaged."""
        r = self.rng
        if r.random() < 0.5:
            tokens = r.choice([1, 1, 2, 3])
            tensors = [torch.randn(batch, tokens, HIDDEN) for _ in range(min(count, states))]
            tensors += [torch.rand(batch, tokens) < 0.8 for _ in range(count - states)]
            return pack_tensors(tensors, r.choice(list(Compression)))
        tokens = r.choice([1, 1, 2, 3, 0, 17, 65])
        batch = r.choice([batch] * 6 + [0, 2, 5])
        tensors = [self.tensor(batch, tokens, mask=i >= states) for i in range(count)]
        compression = r.choice(list(Compression))
        try:
            sizes, payload = pack_tensors(tensors, compression)
        except ValueError:
            sizes, payload = pack_tensors(tensors)
        roll = r.random()
        if roll < 0.55:
            return sizes, payload
        if roll < 0.65:
            return self.value(), r.choice([None, payload])
        if roll < 0.75:
            index = r.randrange(len(sizes))
            sizes[index] += r.choice([-1, 1, -sizes[index], 2**40])
            return sizes, payload
        if roll < 0.85:
            damaged = bytearray(payload)
            for _ in range(r.randint(1, 4)):
                damaged[r.randrange(min(len(damaged), 64))] = r.randrange(256)
            return sizes, bytes(damaged)
        header = {"dtype": r.choice(["float32", "bool", "complex64", 1]), "compression": "none"}
        header["shape"] = r.choice([[1, 1, HIDDEN], [2**64 - 1, 0], [-1], [2**62, 2**62]])
        raw = msgpack.packb(self.mutate(header, ["dtype", "shape", "compression", "block"]))
        body = struct.pack(">I", r.choice([len(raw), len(raw) + 9, 2**32 - 1])) + raw
        body += r.randbytes(r.choice([0, 4, 4 * HIDDEN]))
        return [len(body)], body

    def step(self) -> tuple[Any, bytes | None]:
        r = self.rng
        sizes, payload = self.tensors(r.choice([1, 1, 1, 2, 3]))
        request = {"op": "step", "tensors": sizes}
        if r.random() < 0.5:
            request["step"] = self.pick(r.randint(0, 40))
        if r.random() < 0.3:
            request["push"] = self.pick(r.random() < 0.5)
        if r.random() < 0.3:
            request["compression"] = self.pick(r.choice(list(Compression)).value)
        return self.mutate(
            request, ["op", "step", "push"]
        ) if r.random() < 0.3 else request, payload

    def session_message(self) -> tuple[Any, bytes | None]:
        r = self.rng
        roll = r.random()
        if roll < 0.55:
            return self.step()
        if roll < 0.7:
            position = r.randint(0, 2) if r.random() < 0.7 else self.pick(r.randint(-1, 20))
            return {"op": "rollback", "position": position}, None
        if roll < 0.8:
            return {"op": "link", "prev": self.prev(), "next": self.next()}, None
        if roll < 0.9:
            return {"op": r.choice(["open", "close", "STEP", "", 7, None, b"step"])}, None
        return self.value(), r.choice([None, r.randbytes(r.randint(0, 40))])

    def open(self) -> Any:
        r = self.rng
        start, end = r.choice([(0, 4)] * 5 + [(1, 3), (3, 4), (4, 5), (-1, 2), (2, 2)])
        request = self.live.open_request(
            start=start,
            end=end,
            batch=r.choice([1] * 6 + [2, 0, 5, 2**63 - 1]),
            max_length=r.choice([16] * 6 + [64, 65, 0, -3, 2**64 - 1]),
        )
        if r.random() < 0.3:
            ids = [os.urandom(16)] * 3 + self.session_ids
            request["session_id"] = r.choice([*ids, b"", b"x" * 65, "sid", 5])
        if r.random() < 0.2:
            request["prev"] = self.prev()
        if r.random() < 0.2:
            request["next"] = self.next()
        fields = ["op", "model", "start", "end", "batch", "max_length"]
        return self.mutate(request, fields) if r.random() < 0.2 else request

    def unary(self, backward: bool) -> tuple[Any, bytes | None]:
        r = self.rng
        count = r.choice([2, 2, 3, 1, 4]) if backward else r.choice([1, 1, 2, 3])
        sizes, payload = self.tensors(count, r.choice([1, 2]), 2 if backward else 1)
        request = {"model": self.live.model_id, "start": 0, "end": r.choice([4, 4, 2, 5])}
        request |= {"tensors": sizes, "compression": r.choice(list(Compression)).value}
        fields = ["model", "start", "end", "compression"]
        return self.mutate(request, fields) if r.random() < 0.5 else request, payload

    def push(self, session_ids: list[bytes], step: int) -> tuple[Any, bytes | None]:
        """A push into one of ``session_ids`` (the first takes them), usually of ``step``."""
        r = self.rng
        sizes, payload = self.tensors(r.choice([1, 1, 2, 3]))
        request = {
            "session_id": r.choice([session_ids[0]] * 6 + [*session_ids, os.urandom(16), b""]),
            "step": step if r.random() < 0.8 else r.choice([None, -1, 0, "1", 0.5]),
            "push": r.random() < 0.3,
            "tensors": sizes,
            "notify": r.random() < 0.5,
        }
        fields = ["session_id", "step", "push", "notify", "compression"]
        return self.mutate(request, fields) if r.random() < 0.3 else request, payload


def sendable(value: Any) -> bool:
    try:
        msgpack.packb(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def wire(value: Any) -> Any:
    """``value`` as the server decodes it."""
    return msgpack.unpackb(msgpack.packb(value), strict_map_key=False)


def await_answer(reply: RpcReply | None) -> tuple[Any, memoryview | None]:
    assert reply is not None, "the server ended an open session on a bad message"
    return reply.value, reply.payload


def check_answer(value: Any, payload: memoryview | None) -> str:
    """What a stream answer was (``out``, ``ok``... or its error code); fails unless it is
    a result that decodes or a typed error."""
    assert isinstance(value, dict), value
    if "error" in value:
        assert value["error"] in TYPED, value
        assert isinstance(value.get("message"), str), value
        return str(value["error"])
    op = value.get("op")
    assert op in ("out", "ok", "opened", "push_refused"), value
    if op == "out":
        (tensor,) = unpack_tensors(value["tensors"], payload, LIMITS.wire, count=range(1, 2))
        assert tensor.shape[-1] == HIDDEN
    if op == "push_refused":
        assert value["reason"] in TYPED, value
    return str(op)


def check_error(error: RpcError) -> str:
    """The code of a refused unary call; fails unless it is typed."""
    assert error.code in TYPED, (error.code, error.message)
    return str(error.code)


async def recv(call: RpcStream) -> RpcReply | None:
    """The next answer: a typed error frame fails the test as an untyped one would."""
    async with asyncio.timeout(ANSWER_S):
        try:
            return await call.recv()
        except RemoteError as e:
            raise AssertionError(f"the stream ended with an RPC error {e.code}: {e}") from e


async def exchange(call: RpcStream, value: Any, payload: bytes | None = None) -> RpcReply:
    await call.send(value, payload)
    reply = await recv(call)
    assert reply is not None, value
    return reply


def output(reply: RpcReply) -> torch.Tensor:
    assert "error" not in reply.value, reply.value
    (tensor,) = unpack_tensors(
        reply.value["tensors"], reply.payload, LIMITS.wire, count=range(1, 2)
    )
    return tensor.clone()


class Honest:
    """A session opened before the fuzzing, stepped alongside a local one.

    It named no ``prev``: pushes into it from anyone are refused, and never reach its
    stream (no ``push_refused`` notice is injected by a stranger).
    """

    def __init__(self, live: Live, call: RpcStream, session_id: bytes) -> None:
        self.live = live
        self.call = call
        self.session_id = session_id
        self.local = live.span.open_session(CachePool(), batch_size=1, max_length=16)
        self.generator = torch.Generator().manual_seed(66)

    @classmethod
    async def open(cls, live: Live) -> Honest:
        session_id = os.urandom(16)
        call = await live.client.rpc_open(live.peer, INFERENCE_PROTOCOL)
        opened = await exchange(call, live.open_request(session_id=session_id))
        assert opened.value == {"op": "opened", "position": 0}
        return cls(live, call, session_id)

    async def step(self, tokens: int) -> None:
        hidden = torch.randn(1, tokens, HIDDEN, generator=self.generator)
        expected = self.local.step(hidden)
        sizes, payload = pack_tensors([hidden])
        reply = await exchange(self.call, {"op": "step", "tensors": sizes}, payload)
        assert reply.value.get("op") != "push_refused", reply.value
        assert torch.equal(output(reply), expected)
        assert reply.value["position"] == self.local.position

    async def close(self) -> None:
        await self.call.aclose()
        self.local.close()


@pytest.mark.timeout(60)
async def test_hostile_inference_streams_get_typed_answers(live: Live) -> None:
    honest = await Honest.open(live)
    await honest.step(3)
    hostile = Hostile(random.Random(61), live)
    hostile.session_ids.append(honest.session_id)
    outcomes: Counter[str] = Counter()
    cases = 0
    while cases < 1200:
        request = hostile.open()
        if not sendable(request):
            continue
        call = await live.client.rpc_open(live.peer, INFERENCE_PROTOCOL)
        reply = await exchange(call, request)
        cases += 1
        if check_answer(reply.value, reply.payload) != "opened":
            outcomes["open refused: " + reply.value["error"]] += 1
            assert await recv(call) is None  # a refused open ends the call
            await call.aclose()
            continue
        for _ in range(hostile.rng.randint(1, 16)):
            value, payload = hostile.session_message()
            if not sendable(value):
                continue
            await call.send(value, payload)
            cases += 1
            outcomes[check_answer(*await_answer(await recv(call)))] += 1
        if hostile.rng.random() < 0.2:
            call.cancel()
        else:
            await call.aclose()
    await honest.step(1)
    await honest.step(2)
    await honest.close()
    assert outcomes["out"] > 100 and outcomes["ok"] > 50, outcomes
    assert min(outcomes[c] for c in ("malformed_tensor", "invalid_shape", "bad_request")) > 20
    assert sum(n for o, n in outcomes.items() if o.startswith("open refused")) > 50, outcomes
    await asyncio.sleep(0.1)
    assert live.server.open_sessions == 0 and live.server.pool.used_bytes == 0


@pytest.mark.timeout(60)
async def test_hostile_forward_and_backward_calls_get_typed_answers(live: Live) -> None:
    honest = await Honest.open(live)
    await honest.step(2)
    hostile = Hostile(random.Random(62), live)
    handlers = {FORWARD_PROTOCOL: live.server._serve_forward}
    handlers[BACKWARD_PROTOCOL] = live.server._serve_backward
    outcomes: Counter[str] = Counter()
    cases = 0
    while cases < 2000:
        protocol = hostile.rng.choice(list(handlers))
        request, payload = hostile.unary(protocol == BACKWARD_PROTOCOL)
        if not sendable(request):
            continue
        cases += 1
        try:
            if cases % 8 == 0:  # some over the wire, the rest straight into the handler
                reply = await live.client.rpc_call(
                    live.peer, protocol, request, payload, timeout=ANSWER_S
                )
            else:
                ctx = RpcContext(live.client.peer_id, None, protocol)
                view = None if payload is None else memoryview(payload)
                async with asyncio.timeout(ANSWER_S):
                    reply = await handlers[protocol](ctx, wire(request), view)
        except RpcError as e:
            outcomes[check_error(e)] += 1
            continue
        payload = memoryview(reply.payload)
        (tensor,) = unpack_tensors(reply.value["tensors"], payload, LIMITS.wire, count=range(1, 2))
        assert tensor.shape[-1] == HIDDEN
        outcomes[protocol] += 1
    await honest.step(1)
    await honest.close()
    assert outcomes[FORWARD_PROTOCOL] > 100 and outcomes[BACKWARD_PROTOCOL] > 50, outcomes
    assert min(outcomes[c] for c in ("malformed_tensor", "invalid_shape", "bad_request")) > 50


@pytest.mark.timeout(60)
async def test_hostile_pushes_from_allowed_and_other_peers_get_typed_answers(live: Live) -> None:
    honest = await Honest.open(live)
    await honest.step(2)
    # a session that takes pushes from the attacker, its answers read as they come
    target_id = os.urandom(16)
    target = await live.client.rpc_open(live.peer, INFERENCE_PROTOCOL)
    opened = await exchange(
        target,
        live.open_request(session_id=target_id, max_length=64, prev=str(live.attacker.peer_id)),
    )
    assert opened.value["op"] == "opened"
    answers: Counter[str] = Counter()

    async def read_target() -> None:
        while (reply := await target.recv()) is not None:
            answers[check_answer(reply.value, reply.payload)] += 1

    reader = asyncio.ensure_future(read_target())
    try:
        hostile = Hostile(random.Random(63), live)
        peers = [live.attacker.peer_id] * 3 + [live.client.peer_id, live.peer]
        outcomes: Counter[str] = Counter()
        cases = 0
        while cases < 2000:
            request, payload = hostile.push([target_id, honest.session_id], cases)
            if not sendable(request):
                continue
            cases += 1
            try:
                if cases % 8 == 0:
                    host = hostile.rng.choice([live.attacker, live.client])
                    reply = await host.rpc_call(
                        live.peer, PUSH_PROTOCOL, request, payload, timeout=ANSWER_S
                    )
                    answer = reply.value
                else:
                    ctx = RpcContext(hostile.rng.choice(peers), None, PUSH_PROTOCOL)
                    view = None if payload is None else memoryview(payload)
                    async with asyncio.timeout(ANSWER_S):
                        answer = await live.server._serve_push(ctx, wire(request), view)
            except RpcError as e:
                outcomes[check_error(e)] += 1
                continue
            assert answer == {"ok": True}
            outcomes["ok"] += 1
            if cases % 16 == 0:
                await target.send({"op": "rollback", "position": 0})
                await asyncio.sleep(0)
        await target.close()
        async with asyncio.timeout(ANSWER_S):
            await reader
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    await honest.step(1)
    await honest.close()
    assert outcomes["ok"] > 100 and outcomes["not_allowed"] > 100, outcomes
    assert outcomes["unknown_session"] > 100 and outcomes["malformed_tensor"] > 100, outcomes
    assert answers["out"] > 0, answers


def test_the_checks_catch_untyped_answers() -> None:
    """An internal error, an unknown code or an unknown op fails the checks."""
    for value in (
        {"error": "internal", "message": "the server failed: KeyError"},
        {"error": "weird", "message": "m"},
        {"op": "outt"},
        {"op": "push_refused", "step": 1, "reason": "internal"},
        ["out"],
    ):
        with pytest.raises(AssertionError):
            check_answer(value, None)
    with pytest.raises(AssertionError):
        check_error(RemoteError(RpcCode.INTERNAL, "handler failed: IndexError"))
    assert check_answer({"error": "too_long", "message": "m"}, None) == "too_long"
    assert check_error(RpcError(RpcCode.OVERLOADED, "full")) == "overloaded"
