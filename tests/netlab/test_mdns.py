"""mDNS discovery: the TXT record codec, and three hosts on one LAN finding each other."""

from __future__ import annotations

import asyncio
import time

import pytest

from p2p.discovery import MdnsLimits, encode_txt, parse_txt
from security import KeyPair
from tests.netlab._lab import Lab
from tests.netlab.conftest import Spawn
from transport import Multiaddr

LIMITS = MdnsLimits()


def test_txt_round_trip_keeps_every_dnsaddr() -> None:
    peer = KeyPair.generate().peer_id
    addrs = [Multiaddr.for_quic("10.1.0.10", 4001), Multiaddr.for_tcp("10.1.0.10", 4002)]
    raw = encode_txt(peer, addrs, LIMITS)
    assert raw.count(b"dnsaddr=") == 2
    assert parse_txt(raw, LIMITS) == (peer, tuple(addrs))


def test_txt_parser_skips_junk_and_rejects_mixed_or_truncated_records() -> None:
    a, b = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    addr = Multiaddr.for_quic("10.1.0.10", 4001)
    good = encode_txt(a, [addr], LIMITS)
    junk = b"".join(
        bytes([len(entry)]) + entry
        for entry in (b"hello", b"dnsaddr=/x", b"dnsaddr=/ip4/1.2.3.4/udp/1")
    )
    assert parse_txt(junk + good, LIMITS) == (a, (addr,))
    assert parse_txt(good + encode_txt(b, [addr], LIMITS), LIMITS) is None
    assert parse_txt(good[:-3], LIMITS) is None
    assert parse_txt(junk, LIMITS) is None
    assert parse_txt(good, MdnsLimits(max_txt_bytes=10)) is None


def test_txt_announces_at_most_the_limit() -> None:
    peer = KeyPair.generate().peer_id
    addrs = [Multiaddr.for_quic("10.1.0.10", 4000 + i) for i in range(5)]
    limits = MdnsLimits(max_addrs_per_peer=2)
    parsed = parse_txt(encode_txt(peer, addrs, limits), LIMITS)
    assert parsed == (peer, tuple(addrs[:2]))


@pytest.mark.netns
@pytest.mark.timeout(60)
async def test_three_hosts_on_a_lan_discover_each_other(lab: Lab, spawn: Spawn) -> None:
    home = lab.home()
    nodes = [lab.lan_host(home) for _ in range(3)]
    peers = await asyncio.gather(*(spawn(node, "--mdns") for node in nodes))
    ids = [peer.peer_id for peer in peers]
    started = time.monotonic()
    for peer in peers:
        others = [i for i in ids if i != peer.peer_id]
        await peer.request("wait_peers", peers=others, timeout=5.0)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0
    for peer in peers:
        other = next(i for i in ids if i != peer.peer_id)
        assert (await peer.request("echo", peer=other, text="lan"))["echo"] == "lan"
