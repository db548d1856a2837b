"""Relaying: a NATed peer reachable through a public relay, and the relay's limits.

The first test runs on loopback; the others build NATed homes in network namespaces,
with hole punching off so that the connections stay relayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from p2p import ConnectionLost, Host, P2PError, Relay, RelayLimits, RpcContext
from security import KeyPair
from tests.netlab._lab import Lab
from tests.netlab._peers import PeerError, PeerProcess
from tests.netlab.conftest import Spawn
from transport import Multiaddr, QuicTransport

ECHO = "/test/echo/1"


async def _echo(ctx: RpcContext, request: Any, payload: Any) -> Any:
    return {"echo": request}


@pytest.fixture
async def nodes() -> AsyncIterator[list[tuple[Host, Relay]]]:
    made: list[tuple[Host, Relay]] = []
    yield made
    for host, relay in reversed(made):
        await relay.stop()
        await host.stop()


async def _node(made: list[tuple[Host, Relay]], limits: RelayLimits, serve: bool) -> Host:
    identity = KeyPair.generate()
    host = Host(identity, [QuicTransport(identity)])
    await host.start([Multiaddr.for_quic("127.0.0.1", 0)])
    host.add_rpc_handler(ECHO, _echo)
    relay = Relay(host, identity, serve=serve, limits=limits)
    made.append((host, relay))
    await relay.start()
    return host


@pytest.mark.timeout(30)
async def test_circuit_carries_rpc_and_is_cut_past_its_data_limit(
    nodes: list[tuple[Host, Relay]],
) -> None:
    limits = replace(RelayLimits(), circuit_max_bytes=100_000)
    relay_host = await _node(nodes, limits, serve=True)
    target = await _node(nodes, limits, serve=False)
    dialer = await _node(nodes, limits, serve=False)
    reservation = await nodes[1][1].reserve(relay_host.addrs[0])
    circuit = reservation.addr.with_p2p(target.peer_id)
    assert circuit in target.addrs
    assert await dialer.connect(circuit) == target.peer_id
    (conn,) = dialer.connections(target.peer_id)
    assert conn.transport_name == "circuit"
    assert (await dialer.rpc_call(target.peer_id, ECHO, "hi", timeout=5)).value == {"echo": "hi"}
    assert (await target.rpc_call(dialer.peer_id, ECHO, "back", timeout=5)).value == {
        "echo": "back"
    }
    with pytest.raises(ConnectionLost):
        await dialer.rpc_call(target.peer_id, ECHO, "x" * 150_000, timeout=5)
    await asyncio.wait_for(conn.wait_closed(), 5)
    with pytest.raises(P2PError, match="reached directly"):
        await nodes[2][1].reserve(circuit)


async def _circuit_of(peer: PeerProcess) -> str:
    addrs = (await peer.request("addrs"))["addrs"]
    (circuit,) = [a for a in addrs if "/p2p-circuit/" in a]
    return circuit


@pytest.mark.netns
@pytest.mark.timeout(60)
async def test_natted_peer_is_reached_through_a_public_relay(lab: Lab, spawn: Spawn) -> None:
    relay = await spawn(lab.public_host("relay"), "--relay-server")
    home_a, home_b = lab.home(), lab.home()
    target = await spawn(lab.lan_host(home_a), "--no-punch")
    dialer = await spawn(lab.lan_host(home_b), "--no-punch")
    reserved = await target.request("reserve", relay=relay.addr)
    assert reserved == f"{relay.addr}/p2p-circuit"
    circuit = await _circuit_of(target)
    assert circuit == f"{reserved}/p2p/{target.peer_id}"
    assert await dialer.request("connect", addr=circuit) == target.peer_id
    conns = await dialer.request("connections", peer=target.peer_id)
    assert [c["transport"] for c in conns] == ["circuit"]
    for text in ("one", "two"):
        reply = await dialer.request("echo", peer=target.peer_id, text=text)
        assert reply == {"echo": text, "from": dialer.peer_id}
    back = await target.request("echo", peer=dialer.peer_id, text="back")
    assert back == {"echo": "back", "from": target.peer_id}


@pytest.mark.netns
@pytest.mark.timeout(60)
async def test_relay_enforces_circuit_and_reservation_limits(lab: Lab, spawn: Spawn) -> None:
    relay = await spawn(
        lab.public_host("relay"),
        "--relay-server",
        "--relay-max-bytes=100000",
        "--relay-max-seconds=2",
        "--relay-per-ip=2",
    )
    target = await spawn(lab.lan_host(lab.home()), "--no-punch")
    dialer = await spawn(lab.public_host("dialer"), "--no-punch")
    await target.request("reserve", relay=relay.addr)
    circuit = await _circuit_of(target)
    await dialer.request("connect", addr=circuit)
    assert await dialer.request("echo", peer=target.peer_id, text="small")
    with pytest.raises(PeerError, match=r"ConnectionLost|closed|reset"):
        await dialer.request("echo", peer=target.peer_id, text="x", repeat=150_000)
    await dialer.request("connect", addr=circuit)
    started = time.monotonic()
    assert await dialer.request("echo", peer=target.peer_id, text="in time")
    while await dialer.request("connections", peer=target.peer_id):
        assert time.monotonic() - started < 6.0, "the circuit outlived its time limit"
        await asyncio.sleep(0.2)
    assert time.monotonic() - started > 1.0
    flooder = await spawn(lab.lan_host(lab.home()))
    flood = await flooder.request("reserve_flood", relay=relay.addr, n=6, timeout=60)
    assert flood == {"granted": 2, "refused": 4}
