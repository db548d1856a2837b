"""Multiaddr text and binary forms (multiformats multiaddr spec)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from security import KeyPair, PeerId
from transport._errors import MultiaddrError
from transport._multiaddr import Multiaddr

ED25519_PEER = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
ED25519_PEER_HEX = "0024080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
RSA_PEER = "QmcgpsyWgH8Y8ajJz1Cu72KnS5uo2Aa2LpzU7kinSupNKC"
RSA_PEER_HEX = "1220d52ebb89d85b02a284948203a62ff28389c57c9f42beec4ec20db76a68911c0b"

# Text and binary pairs from the multiaddr spec repository (test/multiaddr.feature) and
# the test suites of go-multiaddr and other implementations; the last rows use the
# protocols Swarm adds on top (quic-v1, dns*, p2p-circuit, memory).
VECTORS = [
    ("/ip4/127.0.0.1/udp/1234", "047f000001910204d2"),
    ("/ip4/127.0.0.1/tcp/4321", "047f0000010610e1"),
    ("/ip4/127.0.0.1/udp/1234/ip4/127.0.0.1/tcp/4321", "047f000001910204d2047f0000010610e1"),
    ("/ip4/192.0.2.42/tcp/443", "04c000022a0601bb"),
    ("/ip6/2001:8a0:7ac5:4201:3ac9:86ff:fe31:7095", "29200108a07ac542013ac986fffe317095"),
    (f"/p2p/{RSA_PEER}", "a50322" + RSA_PEER_HEX),
    ("/ip4/1.2.3.4/udp/4001/quic-v1", "040102030491020fa1cd03"),
    ("/ip6/::1/tcp/4001", "2900000000000000000000000000000001060fa1"),
    ("/dns4/example.com/tcp/443", "360b6578616d706c652e636f6d0601bb"),
    ("/dns/example.com/udp/1/quic-v1", "350b6578616d706c652e636f6d91020001cd03"),
    ("/dns6/a.b/tcp/65535", "3703612e6206ffff"),
    (
        f"/ip4/1.2.3.4/tcp/80/p2p/{RSA_PEER}/p2p-circuit/p2p/{ED25519_PEER}",
        "0401020304060050a50322" + RSA_PEER_HEX + "a202a50326" + ED25519_PEER_HEX,
    ),
    ("/memory/abc", "890603616263"),
]


@pytest.mark.parametrize(("text", "packed"), VECTORS)
def test_spec_vectors_round_trip(text: str, packed: str) -> None:
    from_text = Multiaddr.from_string(text)
    from_binary = Multiaddr.from_bytes(bytes.fromhex(packed))
    assert from_text.to_bytes().hex() == packed
    assert str(from_binary) == text
    assert from_text == from_binary
    assert hash(from_text) == hash(from_binary)


def test_components_and_values() -> None:
    addr = Multiaddr.from_string(f"/ip4/1.2.3.4/udp/4001/quic-v1/p2p/{ED25519_PEER}")
    assert addr.components == (
        ("ip4", "1.2.3.4"),
        ("udp", "4001"),
        ("quic-v1", None),
        ("p2p", ED25519_PEER),
    )
    assert addr.value_for("udp") == "4001"
    assert addr.value_for("tcp") is None
    assert addr.peer_id == PeerId.from_base58(ED25519_PEER)
    assert repr(addr) == f"Multiaddr('{addr}')"


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("/ip6/0:0::1/tcp/1", "/ip6/::1/tcp/1"),
        ("/ip6/2001:DB8::1/udp/5/quic-v1", "/ip6/2001:db8::1/udp/5/quic-v1"),
        ("/ip4/127.0.0.1/tcp/1234/", "/ip4/127.0.0.1/tcp/1234"),
        (f"/ipfs/{RSA_PEER}", f"/p2p/{RSA_PEER}"),
        ("/tcp/080", "/tcp/80"),
    ],
)
def test_equal_addresses_compare_equal(written: str, canonical: str) -> None:
    assert Multiaddr.from_string(written) == Multiaddr.from_string(canonical)
    assert str(Multiaddr.from_string(written)) == canonical
    assert len({Multiaddr.from_string(written), Multiaddr.from_string(canonical)}) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "//",
        "ip4/1.2.3.4",
        "/ip4",
        "/ip4/",
        "/ip4/256.0.0.1",
        "/ip4/1.2.3",
        "/ip4/01.2.3.4",
        "/ip4/1.2.3.4//tcp/1",
        "/ip6/1.2.3.4",
        "/ip6/fe80::1%eth0",
        "/tcp/65536",
        "/tcp/-1",
        "/tcp/+1",
        "/tcp/1_0",
        "/tcp/ 1",
        "/tcp/\u0661",
        "/udp/abc",
        "/quic-v1/x",
        "/quic/x",
        "/onion/aaimaq4ygg2iegci:80",
        "/p2p",
        "/p2p/0OIl",
        "/p2p/1",
        "/p2p/" + ED25519_PEER[:-3],
        "/memory",
        "/dns4",
    ],
)
def test_invalid_text_is_rejected_naming_the_input(text: str) -> None:
    with pytest.raises(MultiaddrError) as caught:
        Multiaddr.from_string(text)
    assert repr(text) in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("packed", "reason"),
    [
        ("", "at least one component"),
        ("7f", "unknown protocol code 0x7f"),
        ("047f00", "needs 4 bytes"),
        ("91", "truncated"),
        ("8400", "not minimally encoded"),
        ("ffffffffffffffffff01", "longer than"),
        ("a50322" + RSA_PEER_HEX[:-2], "needs 34 bytes"),
        ("a503021220", "not a multihash"),
        ("890602ff00", "not UTF-8"),
        ("8906032f6162", "contains '/'"),
        ("890600", "empty"),
        ("047f0000010604", "needs 2 bytes"),
    ],
)
def test_invalid_binary_is_rejected_naming_the_input(packed: str, reason: str) -> None:
    with pytest.raises(MultiaddrError, match=reason) as caught:
        Multiaddr.from_bytes(bytes.fromhex(packed))
    assert packed[:128] in str(caught.value)


def test_peer_id_needs_an_ed25519_identity() -> None:
    assert Multiaddr.from_string("/ip4/1.2.3.4/tcp/1").peer_id is None
    with pytest.raises(MultiaddrError, match="Ed25519"):
        _ = Multiaddr.from_string(f"/p2p/{RSA_PEER}").peer_id


def test_peer_id_is_the_last_one() -> None:
    relay, target = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    addr = Multiaddr.from_string(f"/ip4/1.2.3.4/tcp/1/p2p/{relay}/p2p-circuit/p2p/{target}")
    assert addr.peer_id == target
    assert addr.without_p2p() == Multiaddr.from_string(
        f"/ip4/1.2.3.4/tcp/1/p2p/{relay}/p2p-circuit"
    )
    assert addr.without_p2p().peer_id == relay


def test_with_and_without_p2p() -> None:
    peer, other = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    base = Multiaddr.for_quic("10.0.0.1", 4001)
    full = base.with_p2p(peer)
    assert str(full) == f"/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{peer}"
    assert full.peer_id == peer
    assert full.without_p2p() == base
    assert base.without_p2p() is base
    assert full.with_p2p(other) == base.with_p2p(other)
    bare = Multiaddr.from_string(f"/p2p/{peer}")
    assert bare.with_p2p(other) == Multiaddr.from_string(f"/p2p/{other}")
    with pytest.raises(MultiaddrError, match="nothing but a PeerID"):
        bare.without_p2p()


def test_encapsulate() -> None:
    relay = Multiaddr.for_tcp("1.2.3.4", 80)
    circuit = Multiaddr.from_string("/p2p-circuit")
    joined = relay.encapsulate(circuit)
    assert str(joined) == "/ip4/1.2.3.4/tcp/80/p2p-circuit"
    assert joined.to_bytes() == relay.to_bytes() + circuit.to_bytes()
    assert joined == Multiaddr.from_bytes(joined.to_bytes())


def test_host_port() -> None:
    assert Multiaddr.for_quic("127.0.0.1", 4001).host_port() == ("127.0.0.1", 4001)
    assert Multiaddr.for_tcp("::1", 0).host_port() == ("::1", 0)
    assert Multiaddr.from_string("/ip6/::1/tcp/9/p2p-circuit").host_port() == ("::1", 9)
    for text in (
        "/memory/x",
        "/dns4/example.com/tcp/1",
        "/ip4/1.2.3.4",
        "/ip4/1.2.3.4/p2p-circuit",
    ):
        with pytest.raises(MultiaddrError, match="does not start with"):
            Multiaddr.from_string(text).host_port()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("/ip4/1.2.3.4/udp/1/quic-v1", "quic"),
        (f"/ip6/::1/udp/1/quic-v1/p2p/{ED25519_PEER}", "quic"),
        ("/ip4/1.2.3.4/tcp/1", "tcp"),
        (f"/ip6/::1/tcp/1/p2p/{ED25519_PEER}", "tcp"),
        ("/memory/a", "memory"),
        (f"/memory/a/p2p/{ED25519_PEER}", "memory"),
        (f"/ip4/1.2.3.4/tcp/1/p2p/{ED25519_PEER}/p2p-circuit/p2p/{ED25519_PEER}", "circuit"),
        ("/ip4/1.2.3.4/udp/1", None),
        ("/ip4/1.2.3.4/tcp/1/quic-v1", None),
        ("/dns4/example.com/tcp/1", None),
        ("/ip4/1.2.3.4/tcp/1/memory/a", None),
        (f"/p2p/{ED25519_PEER}", None),
    ],
)
def test_transport_kind(text: str, kind: str | None) -> None:
    assert Multiaddr.from_string(text).transport_kind == kind


def test_constructors() -> None:
    assert str(Multiaddr.for_quic("::1", 0)) == "/ip6/::1/udp/0/quic-v1"
    assert str(Multiaddr.for_tcp("192.168.1.2", 65535)) == "/ip4/192.168.1.2/tcp/65535"
    assert str(Multiaddr.for_memory("node-7")) == "/memory/node-7"
    assert (
        Multiaddr.for_memory("ünïcode").to_bytes()
        == bytes.fromhex("8906") + bytes([len("ünïcode".encode())]) + "ünïcode".encode()
    )
    for bad in (
        lambda: Multiaddr.for_quic("example.com", 1),
        lambda: Multiaddr.for_tcp("127.0.0.1", 70000),
        lambda: Multiaddr.for_tcp("127.0.0.1", -1),
        lambda: Multiaddr.for_memory("a/b"),
        lambda: Multiaddr.for_memory(""),
        lambda: Multiaddr.for_memory("\udc80"),
    ):
        with pytest.raises(MultiaddrError):
            bad()


_names = st.text(
    alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
)
_ports = st.integers(0, 65535).map(str)
_component = st.one_of(
    st.tuples(st.just("ip4"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("ip6"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.sampled_from(["tcp", "udp"]), _ports),
    st.tuples(st.sampled_from(["dns", "dns4", "dns6", "memory"]), _names),
    st.tuples(st.sampled_from(["quic-v1", "p2p-circuit"]), st.none()),
    st.tuples(
        st.just("p2p"),
        st.binary(min_size=32, max_size=32).map(lambda seed: str(KeyPair.from_seed(seed).peer_id)),
    ),
)


@given(st.lists(_component, min_size=1, max_size=8))
def test_text_binary_round_trip(components: list[tuple[str, str | None]]) -> None:
    text = "".join(
        f"/{name}" if value is None else f"/{name}/{value}" for name, value in components
    )
    addr = Multiaddr.from_string(text)
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert Multiaddr.from_string(str(addr)) == addr
    assert Multiaddr.from_string(str(addr)).to_bytes() == addr.to_bytes()
    assert [name for name, _ in addr.components] == [name for name, _ in components]


@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_exactly_or_raise_multiaddr_error(data: bytes) -> None:
    try:
        addr = Multiaddr.from_bytes(data)
    except MultiaddrError:
        return
    assert addr.to_bytes() == data
    assert Multiaddr.from_string(str(addr)) == addr


@given(
    st.lists(
        st.one_of(
            st.sampled_from(["ip4", "ip6", "tcp", "udp", "p2p", "memory", "quic-v1", "dns4"]),
            st.text(alphabet=string.printable, max_size=12),
        ),
        max_size=6,
    )
)
def test_arbitrary_text_parses_or_raises_multiaddr_error(parts: list[str]) -> None:
    text = "/" + "/".join(parts)
    try:
        addr = Multiaddr.from_string(text)
    except MultiaddrError:
        return
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
