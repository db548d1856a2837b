"""Wire messages: round trips, bounds, and garbage that must only ever be refused."""

from __future__ import annotations

import random
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dht
from dht import DhtLimits, DhtProtocolError, RefusalCode, rejection
from dht._contact import Contact
from dht._errors import BadSignature, MalformedRecord, RecordRejected
from dht._messages import (
    Codec,
    FindNode,
    FindValue,
    Ping,
    Reply,
    Store,
    encode_reply,
    encode_request,
)
from dht._records import Entry
from security import KeyPair
from tests.dht.dht_helpers import fake_peer
from transport import Multiaddr

LIMITS = DhtLimits()


def wire(message: object) -> object:
    """What the other side decodes: the message through msgpack, as the RPC carries it."""
    return msgpack.unpackb(msgpack.packb(message))


@pytest.mark.parametrize(
    "request_",
    [
        Ping(),
        FindNode(2**255 + 12345),
        FindValue(b"model/M/block/7"),
        Store(b"k", (Entry(b"k", None, b"v", 1.5), Entry(b"k", b"sub", b"w", 2.0, b"sig"))),
    ],
)
def test_requests_round_trip(request_) -> None:
    addrs = (Multiaddr.for_quic("127.0.0.1", 4001), Multiaddr.for_memory("n7"))
    codec = Codec(LIMITS)
    inbound = codec.decode_request(wire(encode_request(request_, addrs, b"\x00\x07")))
    assert inbound.request == request_ and inbound.proof == b"\x00\x07"
    peer = fake_peer(random.Random(1))
    assert codec.contact(peer.to_bytes(), inbound.addrs) == Contact(peer, addrs)
    as_client = codec.decode_request(wire(encode_request(request_, None, b"\x00\x07")))
    assert as_client.addrs is None and as_client.proof == b""


def test_replies_round_trip() -> None:
    gen = random.Random(2)
    peers = tuple(Contact(fake_peer(gen), (Multiaddr.for_memory(f"m{i}"),)) for i in range(5))
    entries = (Entry(b"k", None, b"v", 10.0), Entry(b"k", b"s", b"w", 11.0, b"x" * 64, b"n"))
    codec = Codec(LIMITS)
    for reply in (
        Reply(peers=peers, proof=b"\x00\x00\x01"),
        Reply(entries=entries),
        Reply(codes=(RefusalCode.OK, RefusalCode.STALE)),
        Reply(),
    ):
        assert codec.decode_reply(wire(encode_reply(reply)), key=b"k") == reply
    refused = codec.decode_reply(
        wire(encode_reply(Reply(refused=RefusalCode.RATE_LIMITED, message="slow down")))
    )
    assert refused.refused is RefusalCode.RATE_LIMITED and refused.message == "slow down"


def test_reply_peers_beyond_k_are_dropped() -> None:
    gen = random.Random(3)
    peers = tuple(Contact(fake_peer(gen)) for _ in range(30))
    reply = Codec(DhtLimits(k=8)).decode_reply(wire(encode_reply(Reply(peers=peers))))
    assert reply.peers == peers[:8]


def test_contacts_are_cached_by_their_wire_bytes() -> None:
    codec = Codec(DhtLimits(contact_cache_size=2))
    gen = random.Random(4)
    raw = [
        (fake_peer(gen).to_bytes(), [Multiaddr.for_memory(f"a{i}").to_bytes()]) for i in range(3)
    ]
    first = codec.contact(*raw[0])
    assert codec.contact(*raw[0]) is first
    codec.contact(*raw[1])
    codec.contact(*raw[2])
    assert codec.contact(*raw[0]) is not first
    assert codec.contact(*raw[0]) == first


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        {"op": 7},
        {"op": "find_node"},
        {"op": "find_node", "id": b"x" * 31},
        {"op": "find_value", "key": "text"},
        {"op": "find_value", "key": b"k" * 600},
        {"op": "store", "key": b"k", "entries": "nope"},
        {"op": "store", "key": b"k", "entries": [[None, b"v", "soon", b""]]},
        {"op": "store", "key": b"k", "entries": [[None, b"v", True, b""]]},
        {"op": "store", "key": b"k", "entries": [[None, b"v", 1.0]]},
        {"op": "store", "key": b"k", "entries": [[7, b"v", 1.0, b""]]},
        {"op": "store", "key": b"k", "entries": [[None, b"v", 1.0, b""]] * 5000},
    ],
)
def test_malformed_requests_raise_only_dht_protocol_error(message) -> None:
    with pytest.raises(DhtProtocolError):
        Codec(LIMITS).decode_request(message)


@pytest.mark.parametrize(
    ("peer", "addrs"),
    [
        (b"not a peer id", []),
        ([1], []),
        (KeyPair.generate().peer_id.to_bytes(), "x"),
        (KeyPair.generate().peer_id.to_bytes(), [b"\x00\x01"]),
        (KeyPair.generate().peer_id.to_bytes(), [[b"a"]]),
        (KeyPair.generate().peer_id.to_bytes(), [b"x"] * 9),
    ],
)
def test_malformed_contacts_raise_only_dht_protocol_error(peer, addrs) -> None:
    with pytest.raises(DhtProtocolError):
        Codec(LIMITS).contact(peer, addrs)


@pytest.mark.parametrize(
    "message",
    [
        "x",
        {"refused": 99},
        {"peers": "x"},
        {"peers": [[b"bad", []]]},
        {"peers": [[b"only one field"]]},
        {"codes": [42]},
        {"entries": [[None, b"v", None, b""]]},
    ],
)
def test_malformed_replies_raise_only_dht_protocol_error(message) -> None:
    with pytest.raises(DhtProtocolError):
        Codec(LIMITS).decode_reply(message)


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=48) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)
ops = st.sampled_from(["ping", "find_node", "find_value", "store", "other"])


@settings(max_examples=100, deadline=None)
@given(ops, st.dictionaries(st.sampled_from(["id", "key", "entries", "from"]), wire_values))
def test_fuzzed_requests_decode_or_raise_dht_protocol_error(op, fields) -> None:
    codec = Codec(LIMITS)
    try:
        sender = codec.decode_request({"op": op, **fields}).addrs
        if sender is not None:
            codec.contact(fake_peer(random.Random(0)).to_bytes(), sender)
    except DhtProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["peers", "entries", "codes", "refused"]), wire_values))
def test_fuzzed_replies_decode_or_raise_dht_protocol_error(message) -> None:
    try:
        Codec(LIMITS).decode_reply(message, key=b"k")
    except DhtProtocolError:
        pass


def test_refusal_codes_map_to_their_exceptions() -> None:
    for code in RefusalCode:
        if code is RefusalCode.OK:
            continue
        error = rejection(code, "why")
        assert isinstance(error, RecordRejected) and error.code is code
    assert isinstance(rejection(RefusalCode.BAD_SIGNATURE, "x"), BadSignature)
    assert isinstance(rejection(RefusalCode.OK, "x"), MalformedRecord)


def test_exports_and_no_torch_or_numpy() -> None:
    for name in dht.__all__:
        obj = getattr(dht, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__module__ == "dht", name
    code = "import dht, sys; sys.exit(('torch' in sys.modules) + 2 * ('numpy' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
