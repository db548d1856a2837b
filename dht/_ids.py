"""Kademlia identifiers: 256-bit integers compared by XOR distance.

A node's ID is the SHA-256 of its PeerID bytes, so a node cannot choose where it sits;
a key's ID is the SHA-256 of the key bytes. Both live in one 256-bit space, as Python
ints (XOR and ``bit_length`` on ints are the fastest way to compare them here).
"""

from __future__ import annotations

import hashlib
import random

from security import PeerId

from ._errors import DhtConfigError, DhtProtocolError

ID_BITS = 256
ID_BYTES = ID_BITS // 8


def node_id(peer_id: PeerId) -> int:
    """The DHT ID of a peer: SHA-256 of its PeerID bytes."""
    return int.from_bytes(hashlib.sha256(peer_id.to_bytes()).digest(), "big")


def key_id(key: bytes) -> int:
    """The DHT ID of a record key: SHA-256 of the key bytes."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def distance(a: int, b: int) -> int:
    """The XOR distance between two IDs."""
    return a ^ b


def bucket_index(local: int, other: int) -> int:
    """Index of the k-bucket that holds ``other``: 255 for the far half, -1 for ``local`` itself."""
    return (local ^ other).bit_length() - 1


def id_to_bytes(ident: int) -> bytes:
    return ident.to_bytes(ID_BYTES, "big")


def id_from_bytes(data: bytes) -> int:
    """Parse a 32-byte wire ID; ``DhtProtocolError`` for any other length."""
    if not isinstance(data, bytes) or len(data) != ID_BYTES:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise DhtProtocolError(f"a DHT ID has {ID_BYTES} bytes, got {size}")
    return int.from_bytes(data, "big")


def random_id_in_bucket(local: int, index: int, rng: random.Random) -> int:
    """A uniformly random ID whose distance to ``local`` falls in bucket ``index``."""
    if not 0 <= index < ID_BITS:
        raise DhtConfigError(f"bucket index {index} is outside 0..{ID_BITS - 1}")
    offset = (1 << index) | rng.getrandbits(index) if index else 1
    return local ^ offset
