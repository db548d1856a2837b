"""IDs, XOR distance, bucket indices and IP diversity groups."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dht._contact import Contact, ip_group
from dht._errors import DhtConfigError, DhtProtocolError
from dht._ids import (
    ID_BITS,
    bucket_index,
    distance,
    id_from_bytes,
    id_to_bytes,
    key_id,
    node_id,
    random_id_in_bucket,
)
from security import KeyPair
from tests.dht.dht_helpers import fake_peer
from transport import Multiaddr

ids = st.integers(min_value=0, max_value=2**ID_BITS - 1)


def test_node_id_is_sha256_of_peer_id_bytes() -> None:
    peer = KeyPair.generate().peer_id
    expected = int.from_bytes(hashlib.sha256(peer.to_bytes()).digest(), "big")
    assert node_id(peer) == expected
    assert key_id(b"block/7") == int.from_bytes(hashlib.sha256(b"block/7").digest(), "big")


def test_contact_carries_its_node_id(rng: random.Random) -> None:
    peer = fake_peer(rng)
    assert Contact(peer).node_id == node_id(peer)


@given(ids, ids)
def test_xor_metric(a: int, b: int) -> None:
    assert distance(a, b) == distance(b, a)
    assert distance(a, a) == 0
    assert (distance(a, b) == 0) == (a == b)


@given(ids, ids, ids)
def test_xor_triangle_inequality(a: int, b: int, c: int) -> None:
    assert distance(a, c) <= distance(a, b) + distance(b, c)


def test_bucket_index_edges() -> None:
    assert bucket_index(0, 0) == -1
    assert bucket_index(0, 1) == 0
    assert bucket_index(0, 2**255) == 255
    assert bucket_index(2**255, 0) == 255
    assert bucket_index(0b1010, 0b1000) == 1


@given(ids, st.integers(min_value=0, max_value=ID_BITS - 1), st.integers())
def test_random_id_lands_in_its_bucket(local: int, index: int, seed: int) -> None:
    target = random_id_in_bucket(local, index, random.Random(seed))
    assert bucket_index(local, target) == index


def test_random_id_rejects_bad_index() -> None:
    with pytest.raises(DhtConfigError):
        random_id_in_bucket(0, 256, random.Random(0))


@given(ids)
def test_id_bytes_roundtrip(ident: int) -> None:
    assert id_from_bytes(id_to_bytes(ident)) == ident


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32, None])
def test_id_from_bytes_rejects_wrong_length(bad: object) -> None:
    with pytest.raises(DhtProtocolError):
        id_from_bytes(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ip", "exempt", "group"),
    [
        ("203.0.113.7", True, "203.0.113.0/24"),
        ("203.0.113.250", False, "203.0.113.0/24"),
        ("2001:db8:1234:5678::1", True, "2001:db8:1234::/48"),
        ("::ffff:198.51.100.9", True, "198.51.100.0/24"),
        ("127.0.0.1", True, None),
        ("127.0.0.1", False, "127.0.0.0/24"),
        ("192.168.1.20", True, None),
        ("192.168.1.20", False, "192.168.1.0/24"),
        ("10.1.2.3", True, None),
        ("172.20.0.5", True, None),
        ("fd00::5", True, None),
        ("100.64.0.1", True, "100.64.0.0/24"),
        ("fe80::1", True, None),
        ("::1", False, "::/48"),
        (None, False, None),
        ("not-an-ip", False, None),
    ],
)
def test_ip_groups(ip: str | None, exempt: bool, group: str | None) -> None:
    assert ip_group(ip, exempt_private=exempt) == group


def test_contact_ip_comes_from_first_ip_address(rng: random.Random) -> None:
    peer = fake_peer(rng)
    addrs = (Multiaddr.for_memory("n1"), Multiaddr.for_quic("198.51.100.4", 4001))
    assert Contact(peer, addrs).ip == "198.51.100.4"
    assert Contact(peer, (Multiaddr.for_memory("n1"),)).ip is None
    assert Contact(peer, addrs, "203.0.113.1").ip == "203.0.113.1"
