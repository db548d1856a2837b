"""Identities, key files, TLS certificates, signed envelopes and proof-of-work."""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from security import (
    LIBP2P_ALPN,
    LIBP2P_EXTENSION_OID,
    MAX_ENVELOPE_BYTES,
    MAX_NONCE_BYTES,
    EnvelopeError,
    IdentityProof,
    InvalidCertificate,
    InvalidPeerId,
    KeyFileError,
    KeyPair,
    PeerId,
    ProofOfWorkError,
    SecurityError,
    SequenceTracker,
    SignedEnvelope,
    make_tls_certificate,
    peer_id_from_certificate,
    proof_bits,
    search_pow,
    solve_pow,
    verify_pow,
    verify_signature,
)
from security._base58 import b58decode, b58encode
from security._pow import leading_zero_bits, pow_digest
from security._tls import _encode_signed_key

# libp2p specs, peer-ids/peer-ids.md, "Test vectors": an Ed25519 PrivateKey and its
# PublicKey protobuf. The PeerID text is the one go-libp2p's tests derive from this key.
SPEC_PRIVATE_KEY = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC_KEY = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
# The spec's own examples of PeerID text: Ed25519 (identity multihash) and sha256 (RSA).
SPEC_EXAMPLE_ED25519 = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
SPEC_EXAMPLE_SHA256 = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"

DOMAIN = "swarm-test-record"


# -- PeerIDs and keys ---------------------------------------------------------------


def test_spec_test_vector_ed25519() -> None:
    pair = KeyPair.from_protobuf(SPEC_PRIVATE_KEY)
    assert pair.public_key == SPEC_PUBLIC_KEY[4:]
    assert pair.peer_id.to_bytes() == bytes([0x00, len(SPEC_PUBLIC_KEY)]) + SPEC_PUBLIC_KEY
    assert str(pair.peer_id) == SPEC_PEER_ID
    assert pair.peer_id.public_key() == pair.public_key
    assert pair.to_protobuf() == SPEC_PRIVATE_KEY
    assert pair.seed() == SPEC_PRIVATE_KEY[4:36]
    assert PeerId.from_base58(SPEC_PEER_ID) == pair.peer_id


def test_spec_example_peer_ids() -> None:
    peer = PeerId.from_base58(SPEC_EXAMPLE_ED25519)
    assert str(peer) == SPEC_EXAMPLE_ED25519
    assert PeerId.from_public_key(peer.public_key()) == peer
    with pytest.raises(InvalidPeerId, match="only Ed25519"):
        PeerId.from_base58(SPEC_EXAMPLE_SHA256)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0OIl",
        SPEC_PEER_ID[:-1],
        SPEC_PEER_ID + "1",
        "1" + SPEC_PEER_ID,
        b58encode(
            bytes.fromhex(
                "0024080212201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
            )
        ),
    ],
)
def test_invalid_peer_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidPeerId):
        PeerId.from_base58(text)


def test_peer_id_forms() -> None:
    pair = KeyPair.generate()
    peer = pair.peer_id
    assert str(peer).startswith("12D3KooW")
    assert PeerId.from_bytes(peer.to_bytes()) == peer
    assert PeerId.from_base58(peer.to_base58()) == peer
    assert peer.short() == "…" + str(peer)[-6:]
    assert repr(peer) == f"PeerId({peer})"
    assert len({peer, PeerId.from_bytes(peer.to_bytes())}) == 1
    with pytest.raises(InvalidPeerId):
        PeerId.from_public_key(b"\x01" * 31)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b"\x00", "1"),
        (b"\x00\x00\x01", "112"),
        (b"hello world", "StV1DL6CwTryKyV"),
        (
            bytes.fromhex(
                "0024080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
            ),
            SPEC_PEER_ID,
        ),
    ],
)
def test_base58_vectors(raw: bytes, text: str) -> None:
    assert b58encode(raw) == text
    assert b58decode(text) == raw


@given(st.binary(max_size=80))
def test_base58_round_trip(raw: bytes) -> None:
    text = b58encode(raw)
    assert b58decode(text) == raw
    assert not set(text) & set("0OIl")


@given(st.binary(min_size=32, max_size=32))
def test_peer_id_text_round_trip(seed: bytes) -> None:
    peer = KeyPair.from_seed(seed).peer_id
    assert PeerId.from_base58(str(peer)) == peer
    assert str(peer).startswith("12D3KooW")


def test_signatures() -> None:
    pair, other = KeyPair.generate(), KeyPair.generate()
    signature = pair.sign(b"message")
    assert verify_signature(pair.public_key, b"message", signature)
    assert verify_signature(pair.peer_id.public_key(), b"message", signature)
    assert not verify_signature(pair.public_key, b"messagE", signature)
    assert not verify_signature(other.public_key, b"message", signature)
    assert not verify_signature(pair.public_key, b"message", signature[:-1])
    assert not verify_signature(b"\x00" * 31, b"message", signature)


def test_private_key_protobuf_is_checked() -> None:
    with pytest.raises(KeyFileError):
        KeyPair.from_protobuf(SPEC_PRIVATE_KEY[:-1])
    with pytest.raises(KeyFileError):
        KeyPair.from_protobuf(b"\x08\x02" + SPEC_PRIVATE_KEY[2:])
    mismatched = SPEC_PRIVATE_KEY[:-1] + bytes([SPEC_PRIVATE_KEY[-1] ^ 1])
    with pytest.raises(KeyFileError, match="does not match"):
        KeyPair.from_protobuf(mismatched)
    with pytest.raises(KeyFileError):
        KeyPair.from_seed(b"\x00" * 31)


# -- key files ----------------------------------------------------------------------


def test_key_file_is_written_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.key"
    pair = KeyPair.generate()
    old_umask = os.umask(0)
    try:
        pair.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == pair.to_protobuf()
    assert KeyPair.load(path).peer_id == pair.peer_id
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"], "no temporary left"


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    KeyPair.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="0644") as caught:
        KeyPair.load(path)
    assert f"chmod 600 {path}" in str(caught.value)
    path.chmod(0o640)
    with pytest.raises(KeyFileError):
        KeyPair.load(path)


def test_missing_or_malformed_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no key file"):
        KeyPair.load(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a libp2p Ed25519 PrivateKey"):
        KeyPair.load(garbage)


def test_spec_key_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "go-libp2p.key"
    path.write_bytes(SPEC_PRIVATE_KEY)
    path.chmod(0o600)
    assert str(KeyPair.load(path).peer_id) == SPEC_PEER_ID


def test_load_or_create_keeps_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    first = KeyPair.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyPair.load_or_create(path).peer_id == first.peer_id


# -- TLS certificates ---------------------------------------------------------------


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    extension: bytes | None,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "1")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=1))
    )
    if extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, extension), False
        )
    return builder.sign(key, hashes.SHA256())


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _extension_for(identity: KeyPair, key: ec.EllipticCurvePrivateKey) -> bytes:
    signature = identity.sign(b"libp2p-tls-handshake:" + _spki(key))
    return _encode_signed_key(SPEC_PUBLIC_KEY[:4] + identity.public_key, signature)


def test_certificate_round_trip() -> None:
    pair = KeyPair.generate()
    cert = make_tls_certificate(pair)
    assert LIBP2P_ALPN == "libp2p"
    assert peer_id_from_certificate(cert.certificate) == pair.peer_id
    assert peer_id_from_certificate(cert.cert_der) == pair.peer_id
    assert x509.load_pem_x509_certificate(cert.cert_pem) == cert.certificate
    key = serialization.load_pem_private_key(cert.key_pem, None)
    assert _spki(key) == _spki(cert.private_key)  # type: ignore[arg-type]
    assert cert.certificate.public_key() == cert.private_key.public_key()


def test_handmade_certificate_with_a_valid_extension_is_accepted() -> None:
    pair = KeyPair.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    assert peer_id_from_certificate(_self_signed(key, _extension_for(pair, key))) == pair.peer_id


def test_certificate_without_the_extension_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidCertificate, match="no libp2p public-key extension"):
        peer_id_from_certificate(_self_signed(key, None))


def test_extension_signed_for_another_certificate_key_is_refused() -> None:
    pair = KeyPair.generate()
    signed_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    stolen = _extension_for(pair, signed_key)
    with pytest.raises(InvalidCertificate, match="signature does not match"):
        peer_id_from_certificate(_self_signed(other_key, stolen))


def test_extension_claiming_another_identity_is_refused() -> None:
    pair, impostor = KeyPair.generate(), KeyPair.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    signature = pair.sign(b"libp2p-tls-handshake:" + _spki(key))
    claimed = _encode_signed_key(SPEC_PUBLIC_KEY[:4] + impostor.public_key, signature)
    with pytest.raises(InvalidCertificate):
        peer_id_from_certificate(_self_signed(key, claimed))


@pytest.mark.parametrize(
    "extension",
    [
        b"",
        b"\x04\x00",
        b"\x30\x02\x04\x00",
        b"\x30\x04\x04\x00\x04\x00\x00",
        b"\x30\x85\x00\x00\x00\x00\x00",
        b"\x30\x80",
        b"\x30\x7f\x04\x00",
        _encode_signed_key(b"\x08\x01\x12\x20" + b"\x00" * 31, b"\x00" * 64),
    ],
)
def test_malformed_extension_is_refused(extension: bytes) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidCertificate):
        peer_id_from_certificate(_self_signed(key, extension))


def test_tampered_certificate_bytes_are_refused() -> None:
    der = bytearray(make_tls_certificate(KeyPair.generate()).cert_der)
    der[-5] ^= 0x01
    with pytest.raises(InvalidCertificate):
        peer_id_from_certificate(bytes(der))
    with pytest.raises(InvalidCertificate, match="not valid DER"):
        peer_id_from_certificate(b"\x30\x03junk")


def test_certificate_signed_by_another_key_is_refused() -> None:
    pair = KeyPair.generate()
    key, signer = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "1")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, _extension_for(pair, key)), False
        )
        .sign(signer, hashes.SHA256())
    )
    with pytest.raises(InvalidCertificate, match="self-signature"):
        peer_id_from_certificate(cert)


def test_expired_or_future_certificate_is_refused() -> None:
    pair = KeyPair.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    expired = _self_signed(
        key, _extension_for(pair, key), not_before=now - 3 * day, not_after=now - day
    )
    future = _self_signed(
        key, _extension_for(pair, key), not_before=now + day, not_after=now + 3 * day
    )
    for cert in (expired, future):
        with pytest.raises(InvalidCertificate, match="clock"):
            peer_id_from_certificate(cert)


# -- signed envelopes ---------------------------------------------------------------


def test_envelope_round_trip_and_open() -> None:
    pair = KeyPair.generate()
    envelope = SignedEnvelope.seal(pair, DOMAIN, b"payload", seq=1, payload_type=b"/t")
    decoded = SignedEnvelope.from_bytes(envelope.to_bytes())
    assert decoded == envelope
    assert decoded.signer == pair.peer_id
    assert SequenceTracker().open(decoded, DOMAIN) == b"payload"


def test_envelope_for_another_domain_is_refused() -> None:
    envelope = SignedEnvelope.seal(KeyPair.generate(), DOMAIN, b"payload", seq=1)
    with pytest.raises(EnvelopeError, match="domain"):
        SequenceTracker().open(envelope, "another-domain")
    relabelled = dataclasses.replace(envelope, domain="another-domain")
    with pytest.raises(EnvelopeError, match="does not verify"):
        relabelled.verify("another-domain")


def test_envelope_under_the_wrong_key_is_refused() -> None:
    envelope = SignedEnvelope.seal(KeyPair.generate(), DOMAIN, b"payload", seq=1)
    claimed = dataclasses.replace(envelope, signer=KeyPair.generate().peer_id)
    with pytest.raises(EnvelopeError, match="does not verify"):
        SequenceTracker().open(claimed, DOMAIN)


@pytest.mark.parametrize(
    "changes",
    [
        {"payload": b"Payload"},
        {"payload_type": b"/other"},
        {"seq": 2},
        {"signature": b"\x00" * 64},
        {"signature": b""},
    ],
)
def test_tampered_envelope_is_refused(changes: dict[str, object]) -> None:
    envelope = SignedEnvelope.seal(KeyPair.generate(), DOMAIN, b"payload", seq=1)
    tampered = dataclasses.replace(envelope, **changes)
    with pytest.raises(EnvelopeError):
        SequenceTracker().open(SignedEnvelope.from_bytes(tampered.to_bytes()), DOMAIN)


def test_replayed_or_older_envelopes_are_refused() -> None:
    pair = KeyPair.generate()
    tracker = SequenceTracker()
    fifth = SignedEnvelope.seal(pair, DOMAIN, b"v5", seq=5)
    assert tracker.open(fifth, DOMAIN) == b"v5"
    with pytest.raises(EnvelopeError, match="replayed or stale"):
        tracker.open(fifth, DOMAIN)
    with pytest.raises(EnvelopeError, match="replayed or stale"):
        tracker.open(SignedEnvelope.seal(pair, DOMAIN, b"v4", seq=4), DOMAIN)
    assert tracker.open(SignedEnvelope.seal(pair, DOMAIN, b"v6", seq=6), DOMAIN) == b"v6"


def test_sequences_are_tracked_per_signer_and_domain() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    tracker = SequenceTracker()
    assert tracker.open(SignedEnvelope.seal(alice, DOMAIN, b"a", seq=7), DOMAIN) == b"a"
    assert tracker.open(SignedEnvelope.seal(bob, DOMAIN, b"b", seq=1), DOMAIN) == b"b"
    assert tracker.open(SignedEnvelope.seal(alice, "other", b"c", seq=1), "other") == b"c"


def test_envelope_that_fails_verification_does_not_advance_the_sequence() -> None:
    pair = KeyPair.generate()
    tracker = SequenceTracker()
    forged = dataclasses.replace(SignedEnvelope.seal(pair, DOMAIN, b"x", seq=100), payload=b"y")
    with pytest.raises(EnvelopeError):
        tracker.open(forged, DOMAIN)
    assert tracker.open(SignedEnvelope.seal(pair, DOMAIN, b"ok", seq=1), DOMAIN) == b"ok"


@pytest.mark.parametrize("seq", [-1, 2**64])
def test_sealing_a_sequence_out_of_range_is_refused(seq: int) -> None:
    with pytest.raises(EnvelopeError, match="outside"):
        SignedEnvelope.seal(KeyPair.generate(), DOMAIN, b"x", seq=seq)


def _packed_envelope(**changes: object) -> bytes:
    envelope = SignedEnvelope.seal(KeyPair.generate(), DOMAIN, b"payload", seq=1)
    fields = {
        "signer": envelope.signer.to_bytes(),
        "domain": envelope.domain,
        "payload_type": envelope.payload_type,
        "seq": envelope.seq,
        "payload": envelope.payload,
        "signature": envelope.signature,
    } | changes
    return msgpack.packb(list(fields.values()))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb(5),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"a": 1}),
        _packed_envelope(signer=b"\x00" * 38),
        _packed_envelope(signer="text"),
        _packed_envelope(domain=b"bytes"),
        _packed_envelope(seq="1"),
        _packed_envelope(payload="text"),
        _packed_envelope(signature=None),
        _packed_envelope(payload_type=7),
        b"\x00" * (MAX_ENVELOPE_BYTES + 1),
    ],
)
def test_malformed_envelope_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        SignedEnvelope.from_bytes(data)


@pytest.mark.parametrize("seq", [-1, -(2**63)])
def test_received_envelope_with_a_negative_sequence_is_refused(seq: int) -> None:
    """A remote peer controls every field; a bad one must be an EnvelopeError."""
    with pytest.raises(EnvelopeError, match="sequence number"):
        SequenceTracker().open(SignedEnvelope.from_bytes(_packed_envelope(seq=seq)), DOMAIN)


@given(st.binary(max_size=200))
def test_arbitrary_envelope_bytes_raise_only_envelope_error(data: bytes) -> None:
    try:
        envelope = SignedEnvelope.from_bytes(data)
    except EnvelopeError:
        return
    with pytest.raises(SecurityError):
        envelope.verify(DOMAIN)


# -- identity proof-of-work ---------------------------------------------------------


def test_leading_zero_bits() -> None:
    assert leading_zero_bits(b"\x80" + b"\x00" * 31) == 0
    assert leading_zero_bits(b"\x00\x01" + b"\xff" * 30) == 15
    assert leading_zero_bits(b"\x00" * 32) == 256


def test_proof_of_work_solves_and_verifies() -> None:
    pair = KeyPair.from_seed(b"\x01" * 32)
    proof = solve_pow(pair.public_key, 10)
    assert proof.difficulty(pair.public_key) >= 10
    assert leading_zero_bits(pow_digest(pair.public_key, proof.nonce)) >= 10
    verify_pow(pair.public_key, proof, 10)
    assert solve_pow(pair.public_key, 0) == IdentityProof(bytes(8))


def test_too_weak_proof_is_refused() -> None:
    pair = KeyPair.from_seed(b"\x02" * 32)
    proof = solve_pow(pair.public_key, 4)
    achieved = proof.difficulty(pair.public_key)
    with pytest.raises(ProofOfWorkError, match=f"{achieved} leading zero bits") as caught:
        verify_pow(pair.public_key, proof, achieved + 1)
    assert caught.value.difficulty == achieved
    assert caught.value.required == achieved + 1


def test_proof_does_not_transfer_to_another_key() -> None:
    owner, thief = KeyPair.from_seed(b"\x03" * 32), KeyPair.from_seed(b"\x04" * 32)
    proof = solve_pow(owner.public_key, 12)
    assert proof.difficulty(thief.public_key) < 12
    with pytest.raises(ProofOfWorkError):
        verify_pow(thief.public_key, proof, 12)


@pytest.mark.parametrize("difficulty", [-1, 65])
def test_difficulty_out_of_range_is_refused(difficulty: int) -> None:
    with pytest.raises(ValueError):
        solve_pow(b"\x00" * 32, difficulty)


def test_searching_slices_finds_what_solving_finds() -> None:
    key = KeyPair.from_seed(b"\x05" * 32).public_key
    solved = solve_pow(key, 10)
    first = int.from_bytes(solved.nonce, "big")
    assert search_pow(key, 10, 0, first) is None
    assert search_pow(key, 10, first, 1) == solved
    assert proof_bits(key, solved.nonce) == solved.difficulty(key) >= 10
    assert proof_bits(key, solved.nonce + b"\x00" * MAX_NONCE_BYTES) == 0  # overlong: no proof
