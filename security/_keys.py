"""Ed25519 identities: generate, sign, verify, and keep on disk safely.

Key files hold the libp2p ``PrivateKey`` protobuf (type Ed25519, data = 32-byte seed
followed by the 32-byte public key), the format other libp2p implementations store,
written with mode 0600. A key file that group or others can read is refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._errors import KeyFileError
from ._peer_id import ED25519_KEY_BYTES, ED25519_KEY_TYPE, PeerId

_PRIVATE_PROTO_PREFIX = bytes([0x08, ED25519_KEY_TYPE, 0x12, 2 * ED25519_KEY_BYTES])


class KeyPair:
    """An Ed25519 private key with its public half and PeerID."""

    __slots__ = ("_private", "peer_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: PeerId = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """A key pair from a 32-byte seed (deterministic identities in tests)."""
        if len(seed) != ED25519_KEY_BYTES:
            raise KeyFileError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._private

    def to_protobuf(self) -> bytes:
        """The libp2p ``PrivateKey`` message (what key files hold)."""
        return _PRIVATE_PROTO_PREFIX + self.seed() + self.public_key

    @classmethod
    def from_protobuf(cls, data: bytes) -> KeyPair:
        if len(data) != len(_PRIVATE_PROTO_PREFIX) + 2 * ED25519_KEY_BYTES or not data.startswith(
            _PRIVATE_PROTO_PREFIX
        ):
            raise KeyFileError(
                f"not a libp2p Ed25519 PrivateKey message ({len(data)} bytes, "
                f"prefix {data[:4].hex()})"
            )
        body = data[len(_PRIVATE_PROTO_PREFIX) :]
        pair = cls.from_seed(body[:ED25519_KEY_BYTES])
        if pair.public_key != body[ED25519_KEY_BYTES:]:
            raise KeyFileError("the key file's public key does not match its private key")
        return pair

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key with mode 0600; an existing file is replaced atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.to_protobuf())
        finally:
            os.close(fd)
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read a key file; refuse one that group or others may read or write."""
        target = Path(path)
        try:
            mode = target.stat().st_mode
        except FileNotFoundError:
            raise KeyFileError(f"no key file at {target}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {target} has mode {stat.S_IMODE(mode):04o}: others can read it; "
                f"run `chmod 600 {target}` (or delete it to make a new identity)"
            )
        return cls.from_protobuf(target.read_bytes())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Load the identity at ``path``, creating and saving a new one if it is absent."""
        if Path(path).exists():
            return cls.load(path)
        pair = cls.generate()
        pair.save(path)
        return pair

    def __repr__(self) -> str:
        return f"KeyPair({self.peer_id})"


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (_CryptoInvalidSignature, ValueError):
        return False
    return True
