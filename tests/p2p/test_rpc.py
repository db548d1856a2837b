"""RPC between two Hosts over the in-process transport."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import pytest

from p2p import (
    ConnectionLost,
    Host,
    HostLimits,
    LimitExceeded,
    ProtocolNotSupported,
    RemoteError,
    RpcCancelled,
    RpcCode,
    RpcContext,
    RpcError,
    RpcLimits,
    RpcReply,
    RpcStream,
    RpcTimeout,
)
from p2p._frames import (
    ErrorFrame,
    FrameDecoder,
    MessageFrame,
    encode_cancel,
    encode_message,
)
from tests.p2p.helpers import MakeHost, errors_logged, eventually
from transport._limits import MIB
from transport._varint import encode_uvarint

pytestmark = pytest.mark.timeout(60)


async def echo(ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
    return RpcReply({"echo": request, "from": str(ctx.peer)}, payload)


async def echo_stream(ctx: RpcContext, call: RpcStream) -> None:
    while (message := await call.recv()) is not None:
        await call.send(message.value, message.payload)


async def test_unary_calls_both_ways(pair: tuple[Host, Host]) -> None:
    a, b = pair
    a.add_rpc_handler("/echo/1", echo)
    b.add_rpc_handler("/echo/1", echo)
    reply = await a.rpc_call(b.peer_id, "/echo/1", {"n": 1, 2: [3]}, b"raw")
    assert reply.value == {"echo": {"n": 1, 2: [3]}, "from": str(a.peer_id)}
    assert reply.payload == b"raw" and isinstance(reply.payload, memoryview)
    back = await b.rpc_call(a.peer_id, "/echo/1", None)
    assert back.value["echo"] is None and back.payload is None
    empty = await b.rpc_call(a.peer_id, "/echo/1", 0, b"")
    assert empty.payload == b""


async def test_handler_sees_context_and_deadline(pair: tuple[Host, Host]) -> None:
    a, b = pair
    seen: list[RpcContext] = []

    async def record(ctx: RpcContext, request: Any, payload: memoryview | None) -> int:
        seen.append(ctx)
        return 7

    b.add_rpc_handler("/ctx/1", record)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert (await a.rpc_call(b.peer_id, "/ctx/1", None, timeout=5)).value == 7
    (ctx,) = seen
    assert ctx.peer == a.peer_id and ctx.protocol == "/ctx/1"
    assert ctx.deadline is not None and start + 4 < ctx.deadline <= start + 5.01


async def test_streaming_both_ways(pair: tuple[Host, Host]) -> None:
    a, b = pair
    b.add_rpc_stream_handler("/stream/1", echo_stream)

    async def countdown(ctx: RpcContext, call: RpcStream) -> None:
        start = await call.recv()
        assert start is not None
        for n in range(start.value, 0, -1):
            await call.send(n, bytes([n]))

    a.add_rpc_stream_handler("/countdown/1", countdown)

    async with await a.rpc_open(b.peer_id, "/stream/1") as call:
        for n in range(5):
            await call.send({"n": n}, bytes(n))
            reply = await call.recv()
            assert reply is not None and reply.value == {"n": n} and reply.payload == bytes(n)
        await call.close()
        assert await call.recv() is None

    async with await b.rpc_open(a.peer_id, "/countdown/1") as call:
        await call.send(3)
        got = [await call.recv() for _ in range(3)]
        assert [(m.value, bytes(m.payload)) for m in got if m] == [
            (3, b"\3"),
            (2, b"\2"),
            (1, b"\1"),
        ]
        assert await call.recv() is None


async def test_64_mib_payload_arrives_intact(pair: tuple[Host, Host]) -> None:
    a, b = pair

    async def digest(ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
        assert payload is not None
        return RpcReply(len(payload), payload)

    b.add_rpc_handler("/big/1", digest)
    blob = os.urandom(64 * MIB)
    reply = await a.rpc_call(b.peer_id, "/big/1", "go", blob, timeout=30)
    assert reply.value == len(blob)
    assert reply.payload == blob


async def test_hundred_concurrent_calls_on_one_connection(pair: tuple[Host, Host]) -> None:
    a, b = pair
    in_flight = 0
    peak = 0

    async def slow(ctx: RpcContext, request: int, payload: memoryview | None) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return request * 2

    b.add_rpc_handler("/slow/1", slow)
    replies = await asyncio.gather(*(a.rpc_call(b.peer_id, "/slow/1", n) for n in range(100)))
    assert [r.value for r in replies] == [2 * n for n in range(100)]
    assert peak == 100
    assert len(a.connections(b.peer_id)) == 1


async def test_cancelling_a_call_cancels_the_remote_handler(pair: tuple[Host, Host]) -> None:
    a, b = pair
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.add_rpc_handler("/forever/1", forever)
    call = asyncio.create_task(a.rpc_call(b.peer_id, "/forever/1", None))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with asyncio.timeout(2):
        await cancelled.wait()
    assert await a.ping(b.peer_id) > 0


async def test_deadline_expires_on_both_sides(pair: tuple[Host, Host]) -> None:
    a, b = pair
    cancelled = asyncio.Event()

    async def slow(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.add_rpc_handler("/slow/1", slow)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(RpcTimeout) as caught:
        await a.rpc_call(b.peer_id, "/slow/1", None, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert 0.15 < loop.time() - start < 1.0
    async with asyncio.timeout(2):
        await cancelled.wait()


async def test_server_gives_up_at_the_deadline_it_was_sent(pair: tuple[Host, Host]) -> None:
    """A deadline already past when it arrives ends the handler at once with an error frame."""
    a, b = pair

    async def slow(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        await asyncio.sleep(3600)

    b.add_rpc_handler("/slow/1", slow)
    stream, _ = await a.new_stream(b.peer_id, ["/slow/1"])
    await stream.write(encode_message(None, None, deadline_s=-1.0, max_frame_bytes=MIB))
    reply = b""
    while chunk := await stream.read():
        reply += chunk
    assert RpcCode.DEADLINE_EXCEEDED.encode() in reply
    await stream.close()


async def test_peer_disappearing_mid_call_is_a_typed_error(pair: tuple[Host, Host]) -> None:
    a, b = pair
    started = asyncio.Event()

    async def hang(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        started.set()
        await asyncio.sleep(3600)

    b.add_rpc_handler("/hang/1", hang)
    call = asyncio.create_task(a.rpc_call(b.peer_id, "/hang/1", None, timeout=30))
    await started.wait()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await b.stop()
    with pytest.raises((ConnectionLost, RpcCancelled)):
        await call
    assert loop.time() - start < 1.0


async def test_errors_come_back_typed(
    pair: tuple[Host, Host], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair

    async def refuse(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        raise RpcError("not_found", f"no key {request!r}")

    async def crash(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        raise ValueError("handler bug")

    async def unencodable(ctx: RpcContext, request: Any, payload: memoryview | None) -> object:
        return object()

    b.add_rpc_handler("/refuse/1", refuse)
    b.add_rpc_handler("/crash/1", crash)
    b.add_rpc_handler("/unencodable/1", unencodable)
    b.add_rpc_stream_handler("/stream/1", echo_stream)

    with pytest.raises(RemoteError) as caught:
        await a.rpc_call(b.peer_id, "/refuse/1", "k")
    assert caught.value.code == "not_found" and caught.value.message == "no key 'k'"
    assert caught.value.peer == b.peer_id

    with pytest.raises(RemoteError) as caught:
        await a.rpc_call(b.peer_id, "/crash/1", None)
    assert caught.value.code == RpcCode.INTERNAL and "handler bug" in caught.value.message
    (logged,) = errors_logged(caplog)
    assert "/crash/1" in logged.getMessage()

    with pytest.raises(RemoteError) as caught:
        await a.rpc_call(b.peer_id, "/unencodable/1", None)
    assert caught.value.code == RpcCode.INTERNAL
    assert len(errors_logged(caplog)) == 1

    with pytest.raises(ProtocolNotSupported):
        await a.rpc_call(b.peer_id, "/nobody/1", None)
    with pytest.raises(RemoteError) as caught:
        await a.rpc_call(b.peer_id, "/stream/1", None)
    assert caught.value.code == RpcCode.UNKNOWN_METHOD
    async with await a.rpc_open(b.peer_id, "/nobody/1") as call:
        with pytest.raises(ProtocolNotSupported):
            await call.recv()
    assert await a.ping(b.peer_id) > 0


async def test_oversized_frame_closes_only_its_stream(make_host: MakeHost) -> None:
    small = HostLimits(rpc=RpcLimits(max_frame_bytes=4 * MIB))
    a, b = await make_host(), await make_host(small)
    await a.connect(b.addrs[0])
    b.add_rpc_handler("/echo/1", echo)
    b.add_rpc_stream_handler("/stream/1", echo_stream)
    async with await a.rpc_open(b.peer_id, "/stream/1") as bystander:
        with pytest.raises(RemoteError) as caught:
            await a.rpc_call(b.peer_id, "/echo/1", None, bytes(9 * MIB))
        assert caught.value.code == RpcCode.BAD_FRAME
        message = caught.value.message
        assert message.startswith(f"RPC frame of 9 MiB from {a.peer_id} exceeds")
        assert message.endswith("RpcLimits.max_frame_bytes=4 MiB")
        await bystander.send("still there")
        reply = await bystander.recv()
        assert reply is not None and reply.value == "still there"
        # The same limit on a streaming call: only that call ends.
        async with await a.rpc_open(b.peer_id, "/stream/1") as victim:
            await victim.send(None, bytes(5 * MIB))
            with pytest.raises(RemoteError, match=r"RpcLimits\.max_frame_bytes=4 MiB"):
                await victim.recv()
        await bystander.send(2)
        reply = await bystander.recv()
        assert reply is not None and reply.value == 2
    assert (await a.rpc_call(b.peer_id, "/echo/1", 1)).value["echo"] == 1


async def test_sender_refuses_a_frame_over_its_own_limit(make_host: MakeHost) -> None:
    small = HostLimits(rpc=RpcLimits(max_frame_bytes=MIB))
    a, b = await make_host(small), await make_host()
    await a.connect(b.addrs[0])
    b.add_rpc_handler("/echo/1", echo)
    with pytest.raises(LimitExceeded, match=r"RpcLimits\.max_frame_bytes=1 MiB"):
        await a.rpc_call(b.peer_id, "/echo/1", None, bytes(2 * MIB))


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 12,  # a varint longer than 9 bytes
        encode_uvarint(3) + b"\x00" + b"\xc1\xc1\xc1",  # not msgpack
        encode_uvarint(1) + b"\x00" + b"\x93",  # a truncated array as header
        encode_uvarint(1) + b"\x00" + b"\x05",  # a header that is not a map
        encode_uvarint(1) + b"\x03" + b"\x80" + b"abc",  # payload without the flag
    ],
)
async def test_malformed_frame_closes_only_its_stream(
    pair: tuple[Host, Host], garbage: bytes
) -> None:
    a, b = pair
    b.add_rpc_handler("/echo/1", echo)
    stream, _ = await a.new_stream(b.peer_id, ["/echo/1"])
    await stream.write(garbage)
    answer = b""
    while chunk := await stream.read():
        answer += chunk
    assert RpcCode.BAD_FRAME.encode() in answer and b"malformed RPC frame from" in answer
    await stream.close()
    assert (await a.rpc_call(b.peer_id, "/echo/1", "ok")).value["echo"] == "ok"


async def test_server_limits_concurrent_calls_per_peer(make_host: MakeHost) -> None:
    two = HostLimits(rpc=RpcLimits(max_concurrent_calls_per_peer=2))
    a, b = await make_host(), await make_host(two)
    await a.connect(b.addrs[0])
    release = asyncio.Event()

    async def wait(ctx: RpcContext, request: Any, payload: memoryview | None) -> str:
        await release.wait()
        return "done"

    b.add_rpc_handler("/wait/1", wait)
    first = [asyncio.create_task(a.rpc_call(b.peer_id, "/wait/1", n)) for n in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(RemoteError) as caught:
        await a.rpc_call(b.peer_id, "/wait/1", 3)
    assert caught.value.code == RpcCode.OVERLOADED
    assert "max_concurrent_calls_per_peer=2" in caught.value.message
    release.set()
    assert [(await t).value for t in first] == ["done", "done"]


async def test_caller_waits_for_a_call_slot(make_host: MakeHost) -> None:
    two = HostLimits(rpc=RpcLimits(max_concurrent_calls_per_peer=2))
    a, b = await make_host(two), await make_host(two)
    await a.connect(b.addrs[0])
    in_flight = peak = 0

    async def slow(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1

    b.add_rpc_handler("/slow/1", slow)
    await asyncio.gather(*(a.rpc_call(b.peer_id, "/slow/1", n) for n in range(6)))
    assert peak == 2


async def test_streaming_deadline_and_cancel_reach_the_handler(pair: tuple[Host, Host]) -> None:
    a, b = pair
    outcomes: list[str] = []
    started = asyncio.Event()

    async def sit(ctx: RpcContext, call: RpcStream) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise

    b.add_rpc_stream_handler("/sit/1", sit)
    call = await a.rpc_open(b.peer_id, "/sit/1", timeout=0.2)
    with pytest.raises(RpcTimeout):
        await call.recv()
    await eventually(lambda: outcomes == ["cancelled"])

    started.clear()
    call = await a.rpc_open(b.peer_id, "/sit/1")
    await started.wait()
    call.cancel()
    await eventually(lambda: outcomes == ["cancelled", "cancelled"])
    with pytest.raises(RpcCancelled):
        await call.send(1)


async def test_handlers_are_registered_once(pair: tuple[Host, Host]) -> None:
    a, _ = pair
    a.add_rpc_handler("/echo/1", echo)
    with pytest.raises(ValueError, match="already registered"):
        a.add_rpc_stream_handler("/echo/1", echo_stream)
    with pytest.raises(ValueError):
        a.add_rpc_handler("/bad\nname", echo)
    a.remove_handler("/echo/1")
    a.add_rpc_handler("/echo/1", echo)


async def test_idle_pruning_spares_connections_with_calls(make_host: MakeHost) -> None:
    idle = HostLimits(connections=dataclasses.replace(HostLimits().connections, idle_timeout_s=0.1))
    a, b = await make_host(idle), await make_host()
    await a.connect(b.addrs[0])
    b.add_rpc_stream_handler("/stream/1", echo_stream)
    async with await a.rpc_open(b.peer_id, "/stream/1") as call:
        await asyncio.sleep(0.4)
        await call.send(1)
        reply = await call.recv()
        assert reply is not None and reply.value == 1
    await eventually(lambda: a.connections() == [])


async def read_events(stream: Any, decoder: FrameDecoder, count: int) -> list[Any]:
    events: list[Any] = []
    while len(events) < count:
        chunk = await stream.read()
        if not chunk:
            break
        events += decoder.feed(chunk)
    return events


async def test_unary_calls_share_one_stream_matched_by_id(pair: tuple[Host, Host]) -> None:
    a, b = pair
    inbound: list[object] = []
    release = asyncio.Event()

    async def ordered(ctx: RpcContext, request: Any, payload: memoryview | None) -> Any:
        inbound.append(ctx.deadline)
        if request == 0:
            await release.wait()
        return request

    b.add_rpc_handler("/ordered/1", ordered)
    first = asyncio.create_task(a.rpc_call(b.peer_id, "/ordered/1", 0))
    await eventually(lambda: len(inbound) == 1)
    later = [await a.rpc_call(b.peer_id, "/ordered/1", n, timeout=5) for n in range(1, 4)]
    assert [reply.value for reply in later] == [1, 2, 3]
    release.set()
    assert (await first).value == 0
    assert all(deadline is not None for deadline in inbound)
    assert len(a._rpc_client._call_streams) == 1


async def test_cancel_frame_cancels_only_its_call(pair: tuple[Host, Host]) -> None:
    a, b = pair
    cancelled: list[Any] = []

    async def maybe_hang(ctx: RpcContext, request: Any, payload: memoryview | None) -> Any:
        if request == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(request)
                raise
        return request

    b.add_rpc_handler("/maybe/1", maybe_hang)
    stream, _ = await a.new_stream(b.peer_id, ["/maybe/1"])
    decoder = FrameDecoder(MIB)
    await stream.write(
        encode_message("hang", None, deadline_s=30.0, max_frame_bytes=MIB, call_id=5)
    )
    await stream.write(
        encode_message("quick", None, deadline_s=30.0, max_frame_bytes=MIB, call_id=6)
    )
    assert await read_events(stream, decoder, 1) == [MessageFrame("quick", None, None, 6)]
    await stream.write(encode_cancel(5))
    await eventually(lambda: cancelled == ["hang"])
    await stream.write(
        encode_message("again", None, deadline_s=None, max_frame_bytes=MIB, call_id=5)
    )
    assert await read_events(stream, decoder, 1) == [MessageFrame("again", None, None, 5)]
    await stream.close_write()
    assert await read_events(stream, decoder, 1) == []
    await stream.close()


async def test_bad_frame_on_a_call_stream_fails_only_that_stream(pair: tuple[Host, Host]) -> None:
    a, b = pair
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.add_rpc_handler("/hang/1", hang)
    b.add_rpc_handler("/echo/1", echo)
    stream, _ = await a.new_stream(b.peer_id, ["/hang/1"])
    await stream.write(encode_message(None, None, deadline_s=None, max_frame_bytes=MIB, call_id=0))
    await started.wait()
    await stream.write(encode_message(None, None, deadline_s=None, max_frame_bytes=MIB, call_id=0))
    events = await read_events(stream, FrameDecoder(MIB), 2)
    assert len(events) == 1 and isinstance(events[0], ErrorFrame)
    assert events[0].code == RpcCode.BAD_FRAME and events[0].call_id is None
    assert "reused call id 0" in events[0].message
    async with asyncio.timeout(2):
        await cancelled.wait()
    await stream.close()
    assert (await a.rpc_call(b.peer_id, "/echo/1", "ok")).value["echo"] == "ok"
    await eventually(lambda: not b._rpc_server._active)


async def test_a_refused_call_stream_is_replaced(pair: tuple[Host, Host]) -> None:
    a, b = pair
    with pytest.raises(ProtocolNotSupported):
        await a.rpc_call(b.peer_id, "/late/1", 1)
    b.add_rpc_handler("/late/1", echo)
    assert (await a.rpc_call(b.peer_id, "/late/1", 2)).value["echo"] == 2
