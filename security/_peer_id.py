"""libp2p PeerIDs for Ed25519 keys (libp2p specs, peer-ids/peer-ids.md).

A PeerID is the identity multihash of the protobuf-encoded public key:
``0x00 <len> [0x08 0x01 0x12 0x20 <32-byte key>]``; its text form is base58btc and
starts with ``12D3KooW``. Because the key is inside the ID, a PeerID alone is enough to
verify a signature by that peer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._base58 import b58decode, b58encode
from ._errors import InvalidPeerId

ED25519_KEY_TYPE = 1
ED25519_KEY_BYTES = 32
_IDENTITY_MULTIHASH = 0x00
_PROTOBUF_PREFIX = bytes([0x08, ED25519_KEY_TYPE, 0x12, ED25519_KEY_BYTES])
_PUBKEY_PROTO_LEN = len(_PROTOBUF_PREFIX) + ED25519_KEY_BYTES
_MULTIHASH_PREFIX = bytes([_IDENTITY_MULTIHASH, _PUBKEY_PROTO_LEN])
PEER_ID_BYTES = len(_MULTIHASH_PREFIX) + _PUBKEY_PROTO_LEN


def encode_public_key(public_key: bytes) -> bytes:
    """The protobuf ``PublicKey`` message for a raw Ed25519 public key."""
    if len(public_key) != ED25519_KEY_BYTES:
        raise InvalidPeerId(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return _PROTOBUF_PREFIX + public_key


def decode_public_key(message: bytes) -> bytes:
    """The raw Ed25519 key inside a protobuf ``PublicKey`` message."""
    if len(message) != _PUBKEY_PROTO_LEN or not message.startswith(_PROTOBUF_PREFIX):
        raise InvalidPeerId(
            f"expected a {_PUBKEY_PROTO_LEN}-byte protobuf Ed25519 PublicKey, got {len(message)} "
            f"bytes starting {message[:4].hex()}"
        )
    return message[len(_PROTOBUF_PREFIX) :]


@dataclass(frozen=True, slots=True, order=True)
class PeerId:
    """An Ed25519 libp2p PeerID; construct with ``from_public_key``/``from_base58``."""

    multihash: bytes

    def __post_init__(self) -> None:
        if len(self.multihash) != PEER_ID_BYTES or not self.multihash.startswith(
            _MULTIHASH_PREFIX + _PROTOBUF_PREFIX
        ):
            raise InvalidPeerId(
                f"not an Ed25519 identity-multihash PeerID ({len(self.multihash)} bytes, "
                f"prefix {self.multihash[:6].hex()}); only Ed25519 identities are supported"
            )

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        return cls(_MULTIHASH_PREFIX + encode_public_key(public_key))

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidPeerId(f"a PeerID is bytes, got {type(data).__name__}")
        return cls(bytes(data))

    @classmethod
    def from_base58(cls, text: str) -> PeerId:
        try:
            raw = b58decode(text)
        except ValueError as exc:
            raise InvalidPeerId(f"PeerID {text!r} is not base58btc: {exc}") from None
        return cls(raw)

    def to_bytes(self) -> bytes:
        return self.multihash

    def to_base58(self) -> str:
        return b58encode(self.multihash)

    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key this ID embeds."""
        return self.multihash[-ED25519_KEY_BYTES:]

    def short(self) -> str:
        """A display form: the last 6 characters, as logs and tables show peers."""
        return "…" + self.to_base58()[-6:]

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()})"
