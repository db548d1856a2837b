"""Hosts over real sockets on 127.0.0.1: TCP (TLS 1.3 + yamux) and QUIC."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from p2p import (
    ConnectionLost,
    Host,
    HostLimits,
    IdentifyLimits,
    PeerIdMismatch,
    RpcCancelled,
    RpcContext,
    RpcReply,
    RpcStream,
)
from security import KeyPair
from tests.p2p.helpers import eventually
from transport._base import Transport
from transport._limits import MIB
from transport._multiaddr import Multiaddr
from transport._quic import QuicTransport
from transport._tcp import TcpTransport

pytestmark = pytest.mark.timeout(120)

KINDS = {
    "tcp": (TcpTransport, "/ip4/127.0.0.1/tcp/0"),
    "quic": (QuicTransport, "/ip4/127.0.0.1/udp/0/quic-v1"),
}
MakeRealHost = Callable[..., Awaitable[Host]]


@pytest.fixture(params=sorted(KINDS))
async def make_real_host(request: pytest.FixtureRequest) -> AsyncIterator[MakeRealHost]:
    factory, listen = KINDS[request.param]
    hosts: list[Host] = []

    async def make(limits: HostLimits = HostLimits()) -> Host:  # noqa: B008 - frozen value
        identity = KeyPair.generate()
        host = Host(identity, [factory(identity)], limits)
        await host.start([Multiaddr.from_string(listen)])
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        await host.stop()


async def echo(ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
    return RpcReply(request, payload)


async def echo_stream(ctx: RpcContext, call: RpcStream) -> None:
    while (message := await call.recv()) is not None:
        await call.send(message.value, message.payload)


async def test_connect_ping_identify(make_real_host: MakeRealHost) -> None:
    confirm_once = HostLimits(identify=IdentifyLimits(observed_confirmations=1))
    a, b = await make_real_host(confirm_once), await make_real_host()
    b.add_rpc_handler("/echo/1", echo)
    assert await a.connect(b.addrs[0]) == b.peer_id
    assert await a.ping(b.peer_id) > 0
    info = await a.identify(b.peer_id)
    assert info.peer_id == b.peer_id and "/echo/1" in info.protocols
    assert info.listen_addrs == tuple(b.listen_addrs)
    (conn,) = a.connections(b.peer_id)
    # b reports the address it sees us at: our end of this very connection.
    assert info.observed_addr == conn.local_addr
    assert a.observed_addrs == {conn.local_addr: 1}
    assert conn.local_addr.with_p2p(a.peer_id) in a.addrs


async def test_wrong_peer_id_is_refused(make_real_host: MakeRealHost) -> None:
    a, b = await make_real_host(), await make_real_host()
    impostor = KeyPair.generate().peer_id
    with pytest.raises(PeerIdMismatch):
        await a.connect(b.listen_addrs[0].with_p2p(impostor))
    assert a.connections() == []


async def test_rpc_both_ways_and_streaming(make_real_host: MakeRealHost) -> None:
    a, b = await make_real_host(), await make_real_host()
    for host in (a, b):
        host.add_rpc_handler("/echo/1", echo)
        host.add_rpc_stream_handler("/stream/1", echo_stream)
    await a.connect(b.addrs[0])
    assert (await a.rpc_call(b.peer_id, "/echo/1", {"k": [1, 2]}, b"x")).value == {"k": [1, 2]}
    assert (await b.rpc_call(a.peer_id, "/echo/1", "back")).value == "back"
    async with await b.rpc_open(a.peer_id, "/stream/1") as call:
        for n in range(3):
            await call.send(n, bytes([n]) * 1000)
            reply = await call.recv()
            assert reply is not None and reply.value == n and reply.payload == bytes([n]) * 1000
    replies = await asyncio.gather(*(a.rpc_call(b.peer_id, "/echo/1", n) for n in range(100)))
    assert [r.value for r in replies] == list(range(100))


async def test_large_payload_intact(make_real_host: MakeRealHost) -> None:
    a, b = await make_real_host(), await make_real_host()
    b.add_rpc_stream_handler("/stream/1", echo_stream)
    await a.connect(b.addrs[0])
    # 64 MiB over TCP; QUIC in pure Python moves a few MB/s here, so it carries 8 MiB.
    size = 64 * MIB if a.connections()[0].transport_name == "tcp" else 8 * MIB
    blob = os.urandom(size)
    async with await a.rpc_open(b.peer_id, "/stream/1", timeout=100) as call:
        await call.send("blob", blob)
        reply = await call.recv()
    assert reply is not None and reply.payload == blob


async def test_peer_vanishing_mid_call(make_real_host: MakeRealHost) -> None:
    a, b = await make_real_host(), await make_real_host()
    started = asyncio.Event()

    async def hang(ctx: RpcContext, request: Any, payload: memoryview | None) -> None:
        started.set()
        await asyncio.sleep(3600)

    b.add_rpc_handler("/hang/1", hang)
    await a.connect(b.addrs[0])
    call = asyncio.create_task(a.rpc_call(b.peer_id, "/hang/1", None, timeout=60))
    await started.wait()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await b.stop()
    with pytest.raises((ConnectionLost, RpcCancelled)):
        await call
    assert loop.time() - start < 5
    await eventually(lambda: a.connected_peers() == [], timeout=30)


async def test_tcp_preferred_when_a_peer_has_both() -> None:
    hosts: list[Host] = []
    try:
        for _ in range(2):
            identity = KeyPair.generate()
            transports: list[Transport] = [QuicTransport(identity), TcpTransport(identity)]
            host = Host(identity, transports)
            await host.start(
                [
                    Multiaddr.from_string("/ip4/127.0.0.1/udp/0/quic-v1"),
                    Multiaddr.from_string("/ip4/127.0.0.1/tcp/0"),
                ]
            )
            hosts.append(host)
        a, b = hosts
        quic_first = sorted(b.listen_addrs, key=lambda addr: addr.transport_kind != "quic")
        a.peerstore.add_addrs(b.peer_id, quic_first)
        await a.connect(b.peer_id)
        assert [conn.transport_name for conn in a.connections(b.peer_id)] == ["tcp"]
    finally:
        for host in hosts:
            await host.stop()
