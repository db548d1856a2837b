"""Identity proof-of-work: make new identities cost CPU time, verify with one hash.

A proof is a nonce such that ``sha256(domain || public key || nonce)`` starts with at
least ``difficulty`` zero bits. The default costs about a second of one core in Python.
The proof is bound to the key, not to a message: anyone may carry it (a DHT record
carries its owner's), nobody can move it to another key. ``search_pow`` looks through
one slice of nonces, so an event loop can solve a costly proof without stalling.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from ._errors import ProofOfWorkError

POW_DOMAIN = b"swarm-identity-pow:"
DEFAULT_POW_DIFFICULTY = 20
NONCE_BYTES = 8
MAX_NONCE_BYTES = 32
"""The longest nonce a verifier hashes (solvers make ``NONCE_BYTES``-byte ones)."""


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def pow_digest(public_key: bytes, nonce: bytes) -> bytes:
    return hashlib.sha256(POW_DOMAIN + public_key + nonce).digest()


@dataclass(frozen=True, slots=True)
class IdentityProof:
    """A nonce proving work for one public key."""

    nonce: bytes

    def difficulty(self, public_key: bytes) -> int:
        return leading_zero_bits(pow_digest(public_key, self.nonce))


def _check_difficulty(difficulty: int) -> None:
    if not 0 <= difficulty <= 64:
        raise ValueError(f"difficulty {difficulty} is outside 0..64 bits")


def solve_pow(public_key: bytes, difficulty: int) -> IdentityProof:
    """Search nonces until one meets ``difficulty`` (expected 2**difficulty hashes)."""
    _check_difficulty(difficulty)
    for start in itertools.count(0, 1 << 16):
        proof = search_pow(public_key, difficulty, start, 1 << 16)
        if proof is not None:
            return proof
    raise AssertionError("unreachable")


def search_pow(public_key: bytes, difficulty: int, start: int, count: int) -> IdentityProof | None:
    """The first proof among nonces ``start .. start+count-1``, or None if none of them meets
    ``difficulty``; ``solve_pow`` is this over consecutive slices."""
    _check_difficulty(difficulty)
    prefix = hashlib.sha256(POW_DOMAIN + public_key)
    threshold = 1 << (256 - difficulty)
    for counter in range(start, start + count):
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        h = prefix.copy()
        h.update(nonce)
        if int.from_bytes(h.digest(), "big") < threshold:
            return IdentityProof(nonce)
    return None


def proof_bits(public_key: bytes, nonce: bytes) -> int:
    """The difficulty a received ``nonce`` achieves for ``public_key`` (0 for an overlong one)."""
    if len(nonce) > MAX_NONCE_BYTES:
        return 0
    return leading_zero_bits(pow_digest(public_key, nonce))


def verify_pow(public_key: bytes, proof: IdentityProof, required: int) -> None:
    """Raise ``ProofOfWorkError`` unless ``proof`` meets ``required`` bits for ``public_key``."""
    got = proof.difficulty(public_key)
    if got < required:
        raise ProofOfWorkError(
            f"identity proof-of-work has {got} leading zero bits, the swarm requires {required}; "
            "solve a new one with security.solve_pow",
            difficulty=got,
            required=required,
        )
