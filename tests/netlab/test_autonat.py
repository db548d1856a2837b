"""Reachability checks: the dial-back address rule, and public vs NATed peers in the lab."""

from __future__ import annotations

import asyncio
import time

import pytest

from p2p.nat import dialback_candidates
from tests.netlab._lab import Lab
from tests.netlab.conftest import Spawn
from transport import Multiaddr


def test_server_dials_only_the_askers_observed_ip() -> None:
    observed = Multiaddr.for_quic("198.51.100.7", 6000)
    requested = [
        Multiaddr.for_quic("0.0.0.0", 4001),
        Multiaddr.for_quic("192.0.2.99", 4001),  # a third party's IP: its port is kept only
        Multiaddr.for_quic("198.51.100.7", 4002),
        Multiaddr.for_tcp("198.51.100.7", 4003),
        Multiaddr.for_memory("x"),
    ]
    assert dialback_candidates(requested, observed, 8) == [
        Multiaddr.for_quic("198.51.100.7", 4001),
        Multiaddr.for_quic("198.51.100.7", 4002),
    ]
    assert dialback_candidates(requested, observed, 1) == [Multiaddr.for_quic("198.51.100.7", 4001)]


@pytest.mark.netns
@pytest.mark.timeout(60)
async def test_public_peer_is_reachable_and_natted_peer_is_not(lab: Lab, spawn: Spawn) -> None:
    server = await spawn(lab.public_host("srv"), "--autonat-server")
    public = await spawn(lab.public_host("pub"))
    natted = await spawn(lab.lan_host(lab.home()))
    for peer in (public, natted):
        await peer.request("connect", addr=server.addr)
    started = time.monotonic()
    pub_result, nat_result = await asyncio.gather(
        public.request("reachability", servers=[server.peer_id]),
        natted.request("reachability", servers=[server.peer_id]),
    )
    elapsed = time.monotonic() - started
    assert pub_result == {
        "status": "public",
        "addr": f"/ip4/{public.node.ip}/udp/{public.hello['port']}/quic-v1",
        "answered": 1,
    }
    assert nat_result == {"status": "private", "addr": None, "answered": 1}
    assert elapsed < 10.0
