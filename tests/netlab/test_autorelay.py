"""Automatic NAT traversal (``NatTraversal``): a NATed peer learns it is unreachable,
reserves a slot on a reachable peer by itself, advertises the relayed address, and drops
it as soon as the relay leaves; a wildcard listen address is announced as the interface's.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.netlab._lab import Lab
from tests.netlab._peers import PeerProcess
from tests.netlab.conftest import Spawn


async def _circuits(peer: PeerProcess) -> list[str]:
    return [a for a in (await peer.request("addrs"))["addrs"] if "/p2p-circuit/" in a]


@pytest.mark.netns
@pytest.mark.timeout(60)
async def test_unreachable_peer_relays_itself_and_drops_a_gone_relay(
    lab: Lab, spawn: Spawn
) -> None:
    relay = await spawn(lab.public_host("relay"), "--auto")
    natted = await spawn(lab.lan_host(lab.home()), "--auto")
    dialer = await spawn(lab.lan_host(lab.home()), "--auto")
    await natted.request("connect", addr=relay.addr)
    started = time.monotonic()
    while not (circuits := await _circuits(natted)):
        assert time.monotonic() - started < 10.0, natted.stderr()[-3000:]
        await asyncio.sleep(0.1)
    print(f"relayed address advertised {time.monotonic() - started:.2f}s after connecting")
    assert circuits == [f"{relay.addr}/p2p-circuit/p2p/{natted.peer_id}"]
    assert await natted.request("nat") == {
        "reachability": "private",
        "relays": [relay.peer_id],
        "serving": False,
    }
    assert await relay.request("nat") == {"reachability": "public", "relays": [], "serving": True}

    addrs = (await natted.request("addrs"))["addrs"]
    assert not any("/0.0.0.0/" in a for a in addrs)
    direct = f"/ip4/{natted.node.ip}/udp/{natted.hello['port']}/quic-v1/p2p/{natted.peer_id}"
    assert direct in addrs

    assert await dialer.request("connect", addr=circuits[0]) == natted.peer_id
    reply = await dialer.request("echo", peer=natted.peer_id, text="auto")
    assert reply == {"echo": "auto", "from": dialer.peer_id}

    await relay.leave()
    left = time.monotonic()
    while await _circuits(natted):
        assert time.monotonic() - left < 3.0, "a reservation outlived its relay"
        await asyncio.sleep(0.05)
    assert (await natted.request("nat"))["relays"] == []
