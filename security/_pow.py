"""Identity proof-of-work: make new identities cost CPU time, verify with one hash.

A proof is a nonce such that ``sha256(domain || public key || nonce)`` starts with at
least ``difficulty`` zero bits. The default costs about a second of one core in Python.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from ._errors import ProofOfWorkError

POW_DOMAIN = b"swarm-identity-pow:"
DEFAULT_POW_DIFFICULTY = 20
NONCE_BYTES = 8


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


def solve_pow(public_key: bytes, difficulty: int) -> IdentityProof:
    """Search nonces until one meets ``difficulty`` (expected 2**difficulty hashes)."""
    if not 0 <= difficulty <= 64:
        raise ValueError(f"difficulty {difficulty} is outside 0..64 bits")
    prefix = hashlib.sha256(POW_DOMAIN + public_key)
    for counter in itertools.count():
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        h = prefix.copy()
        h.update(nonce)
        if leading_zero_bits(h.digest()) >= difficulty:
            return IdentityProof(nonce)
    raise AssertionError("unreachable")


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
