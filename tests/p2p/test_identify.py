"""The identify codec, checked against py-libp2p's generated protobuf; observed addresses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.identity.identify.pb.identify_pb2 import Identify

from p2p import IdentifyInfo, IdentifyLimits, PeerProtocolError
from p2p._identify import (
    ObservedAddrs,
    decode_identify,
    encode_identify,
    normalize_observed,
)
from p2p._protobuf import decode_fields
from security import KeyPair
from transport._multiaddr import Multiaddr

KEY = KeyPair.generate()
TCP = Multiaddr.from_string("/ip4/192.0.2.7/tcp/4001")
QUIC = Multiaddr.from_string("/ip4/192.0.2.7/udp/4001/quic-v1")


def test_our_message_parses_with_the_reference_protobuf() -> None:
    info = IdentifyInfo(
        peer_id=KEY.peer_id,
        listen_addrs=(TCP, QUIC),
        protocols=("/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"),
        observed_addr=Multiaddr.from_string("/ip4/198.51.100.1/tcp/50000"),
        protocol_version="ipfs/0.1.0",
        agent_version="swarm/test",
    )
    reference = Identify.FromString(encode_identify(info))
    assert reference.public_key == bytes([0x08, 0x01, 0x12, 0x20]) + KEY.public_key
    assert list(reference.listen_addrs) == [TCP.to_bytes(), QUIC.to_bytes()]
    assert list(reference.protocols) == list(info.protocols)
    assert reference.observed_addr == info.observed_addr.to_bytes()
    assert reference.protocol_version == "ipfs/0.1.0"
    assert reference.agent_version == "swarm/test"
    assert decode_identify(encode_identify(info)) == info


def test_reference_message_with_unknown_fields_decodes() -> None:
    reference = Identify(
        public_key=bytes([0x08, 0x01, 0x12, 0x20]) + KEY.public_key,
        listen_addrs=[TCP.to_bytes(), b"\xff\xff garbage"],
        protocols=["/meshsub/1.1.0"],
        observed_addr=QUIC.to_bytes(),
        protocol_version="ipfs/0.1.0",
        agent_version="py-libp2p/0.8.1",
        signedPeerRecord=b"\x01" * 40,
    )
    extra = bytes([0x78, 0x96, 0x01]) + bytes([0x81, 0x01]) + b"\0" * 8  # fields 15 and 16
    info = decode_identify(reference.SerializeToString() + extra)
    assert info.peer_id == KEY.peer_id
    assert info.listen_addrs == (TCP,)  # the unparsable address is dropped alone
    assert info.protocols == ("/meshsub/1.1.0",)
    assert info.observed_addr == QUIC
    assert info.agent_version == "py-libp2p/0.8.1"


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # truncated bytes field
        b"\x0b",  # group wire type
        b"\x0a\x04abcd",  # a public key that is not an Ed25519 PublicKey
        b"\x1a\x02\xff\xfe",  # protocols not UTF-8
        b"\x18\x01",  # protocols as a varint
        b"\x02\x00",  # field number 0
        b"\x28" + b"\xff" * 11,  # a varint over 10 bytes
    ],
)
def test_malformed_messages_are_the_peers_fault(data: bytes) -> None:
    with pytest.raises(PeerProtocolError):
        decode_identify(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_decoding_garbage_raises_only_peer_protocol_errors(data: bytes) -> None:
    try:
        decode_fields(data)
        decode_identify(data)
    except PeerProtocolError:
        pass


def test_observed_addresses_are_normalized() -> None:
    # py-libp2p reports a QUIC connection's observed address as /tcp/<udp port>.
    assert normalize_observed(TCP, "quic") == QUIC
    assert normalize_observed(TCP.with_p2p(KEY.peer_id), "tcp") == TCP
    assert normalize_observed(QUIC, "quic") == QUIC
    assert normalize_observed(QUIC, "tcp") is None
    assert normalize_observed(Multiaddr.for_memory("m"), "memory") == Multiaddr.for_memory("m")


def test_observed_addresses_count_distinct_reporters() -> None:
    observed = ObservedAddrs(IdentifyLimits(observed_confirmations=2, max_observed_addrs=2))
    peers = [KeyPair.generate().peer_id for _ in range(3)]
    observed.record(peers[0], QUIC)
    observed.record(peers[0], QUIC)
    assert observed.counts() == {QUIC: 1} and observed.confirmed() == []
    observed.record(peers[1], QUIC)
    assert observed.confirmed() == [QUIC]
    observed.record(peers[2], TCP)
    other = Multiaddr.from_string("/ip4/203.0.113.9/tcp/1")
    observed.record(peers[2], other)  # full: the least confirmed address makes room
    assert observed.counts() == {QUIC: 2, other: 1}
