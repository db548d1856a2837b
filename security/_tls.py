"""The libp2p TLS certificate scheme (libp2p specs, tls/tls.md).

Each connection side presents one self-signed certificate for a fresh P-256 key. The
certificate carries the libp2p Public Key Extension (OID 1.3.6.1.4.1.53594.1.1): a DER
``SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }`` where ``publicKey`` is
the protobuf host key and ``signature`` is the host key's signature over
``"libp2p-tls-handshake:" + SubjectPublicKeyInfo``. Verifying that signature binds the
TLS session to a PeerID; no certificate authority is involved.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._errors import InvalidCertificate, InvalidPeerId
from ._keys import KeyPair, verify_signature
from ._peer_id import PeerId, decode_public_key, encode_public_key

LIBP2P_ALPN = "libp2p"
LIBP2P_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
_SIGNATURE_PREFIX = b"libp2p-tls-handshake:"
_VALIDITY = datetime.timedelta(days=365)
_CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """A host's TLS credentials: the certificate and the key that signs the handshake."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    cert_der: bytes
    cert_pem: bytes
    key_pem: bytes


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_octets(data: bytes) -> bytes:
    return b"\x04" + _der_length(len(data)) + data


def _encode_signed_key(public_key: bytes, signature: bytes) -> bytes:
    body = _der_octets(public_key) + _der_octets(signature)
    return b"\x30" + _der_length(len(body)) + body


def _read_tlv(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos >= len(data) or data[pos] != tag:
        raise InvalidCertificate(f"libp2p extension: expected DER tag {tag:#x} at byte {pos}")
    pos += 1
    if pos >= len(data):
        raise InvalidCertificate("libp2p extension: truncated DER length")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise InvalidCertificate("libp2p extension: bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise InvalidCertificate("libp2p extension: DER value runs past its end")
    return data[pos:end], end


def _decode_signed_key(value: bytes) -> tuple[bytes, bytes]:
    body, end = _read_tlv(value, 0, 0x30)
    if end != len(value):
        raise InvalidCertificate("libp2p extension: trailing bytes after SignedKey")
    public_key, pos = _read_tlv(body, 0, 0x04)
    signature, pos = _read_tlv(body, pos, 0x04)
    if pos != len(body):
        raise InvalidCertificate("libp2p extension: trailing bytes inside SignedKey")
    return public_key, signature


def make_tls_certificate(identity: KeyPair) -> TlsCertificate:
    """A fresh self-signed certificate proving ``identity`` (libp2p TLS spec)."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    extension = _encode_signed_key(
        encode_public_key(identity.public_key), identity.sign(_SIGNATURE_PREFIX + spki)
    )
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, os.urandom(8).hex())])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(8), "big") >> 1)
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, extension), False)
        .sign(key, hashes.SHA256())
    )
    return TlsCertificate(
        certificate=certificate,
        private_key=key,
        cert_der=certificate.public_bytes(serialization.Encoding.DER),
        cert_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def peer_id_from_certificate(cert: x509.Certificate | bytes) -> PeerId:
    """Verify a peer's certificate per the libp2p TLS spec and return the PeerID it proves."""
    if isinstance(cert, bytes | bytearray | memoryview):
        try:
            cert = x509.load_der_x509_certificate(bytes(cert))
        except ValueError as exc:
            raise InvalidCertificate(f"peer certificate is not valid DER: {exc}") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidCertificate(
            f"peer certificate is valid {cert.not_valid_before_utc}..{cert.not_valid_after_utc}, "
            f"not now ({now}); check the peer's clock"
        )
    try:
        extension = cert.extensions.get_extension_for_oid(LIBP2P_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise InvalidCertificate(
            "peer certificate has no libp2p public-key extension (1.3.6.1.4.1.53594.1.1)"
        ) from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise InvalidCertificate("libp2p extension could not be read")
    host_key_message, signature = _decode_signed_key(value.value)
    try:
        host_key = decode_public_key(host_key_message)
    except InvalidPeerId as exc:
        raise InvalidCertificate(f"libp2p extension: {exc}") from None
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not verify_signature(host_key, _SIGNATURE_PREFIX + spki, signature):
        raise InvalidCertificate("libp2p extension signature does not match the certificate key")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidCertificate(f"certificate self-signature does not verify: {exc}") from None
    return PeerId.from_public_key(host_key)
