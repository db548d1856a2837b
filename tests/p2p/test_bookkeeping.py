"""Peer store and connection manager: plain data, bounded, driven with a hand-set clock."""

from __future__ import annotations

from p2p import ConnectionLimits, PeerStore, PeerStoreLimits
from p2p._connmgr import ConnectionManager, ConnectionRecord
from security import KeyPair, PeerId
from transport._multiaddr import Multiaddr


def peer() -> PeerId:
    return KeyPair.generate().peer_id


class FakeConnection:
    is_closed = False
    transport_name = "tcp"


def addr(n: int) -> Multiaddr:
    return Multiaddr.for_tcp("192.0.2.1", n)


def test_peer_store_bounds_addresses_protocols_and_peers() -> None:
    store = PeerStore(
        PeerStoreLimits(
            max_peers=2, max_addrs_per_peer=3, max_protocols_per_peer=2, max_agent_version_chars=5
        )
    )
    a, b, c = peer(), peer(), peer()
    store.add_addrs(a, [addr(n) for n in range(5)] + [addr(1).with_p2p(a)])
    assert store.addrs(a) == (addr(3), addr(4), addr(1))
    store.set_protocols(a, ["/x", "/y", "/z"])
    store.set_agent(a, "agent-with-a-long-name", "ipfs/0.1.0")
    info = store.get(a)
    assert info is not None and len(info.protocols) == 2 and info.agent_version == "agent"
    store.seen(a, 1.0)
    store.seen(b, 2.0)
    store.seen(a, 3.0)
    store.seen(c, 4.0)  # full: b, least recently seen, is evicted
    assert set(store.peers()) == {a, c} and b not in store
    assert store.get(b) is None


def test_latency_is_a_moving_average() -> None:
    store = PeerStore(PeerStoreLimits())
    p = peer()
    store.record_latency(p, 0.1)
    store.record_latency(p, 0.2)
    info = store.get(p)
    assert info is not None and info.latency_s is not None and 0.1 < info.latency_s < 0.2


def test_connection_manager_limits_and_idleness() -> None:
    manager = ConnectionManager(
        ConnectionLimits(max_connections=3, max_connections_per_peer=2, idle_timeout_s=10)
    )
    a, b = peer(), peer()
    first = manager.admit(FakeConnection(), a, outbound=True, now=0.0)  # type: ignore[arg-type]
    second = manager.admit(FakeConnection(), a, outbound=False, now=0.0)  # type: ignore[arg-type]
    assert not isinstance(first, str) and not isinstance(second, str)
    refused = manager.admit(FakeConnection(), a, outbound=True, now=0.0)  # type: ignore[arg-type]
    assert isinstance(refused, str) and "max_connections_per_peer=2" in refused
    assert manager.get(a) is first
    other = manager.admit(FakeConnection(), b, outbound=True, now=0.0)  # type: ignore[arg-type]
    assert not isinstance(other, str) and len(manager) == 3
    full = manager.admit(FakeConnection(), peer(), outbound=True, now=0.0)  # type: ignore[arg-type]
    assert isinstance(full, str) and "max_connections=3" in full

    first.stream_opened()
    assert manager.idle(now=11.0) == [second, other]
    first.stream_closed(now=20.0)
    assert first not in manager.idle(now=29.0) and first in manager.idle(now=30.0)
    manager.remove(second)
    manager.remove(second)
    assert manager.records(a) == [first] and len(manager) == 2


def test_a_direct_connection_is_reused_before_a_relayed_one() -> None:
    manager = ConnectionManager(ConnectionLimits())
    peer = KeyPair.generate().peer_id
    relayed, direct = FakeConnection(), FakeConnection()
    relayed.transport_name = "circuit"
    first = manager.admit(relayed, peer, outbound=True, now=0.0)  # type: ignore[arg-type]
    assert manager.get(peer) is first
    second = manager.admit(direct, peer, outbound=True, now=1.0)  # type: ignore[arg-type]
    assert manager.get(peer) is second
    assert isinstance(second, ConnectionRecord)
    second.closing = True
    assert manager.get(peer) is first
