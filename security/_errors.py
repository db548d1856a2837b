"""The security package's one exception tree.

SecurityError
├── InvalidPeerId          text or bytes that are not a supported libp2p PeerID
├── InvalidSignature       a signature does not verify under the claimed key
├── InvalidCertificate     a TLS certificate lacks or breaks the libp2p extension
├── KeyFileError           a key file is missing, malformed or readable by others
├── EnvelopeError          a signed envelope is malformed, of the wrong domain, or replayed
├── ProofOfWorkError       an identity's proof-of-work is missing or too weak
├── ReputationFileError    a saved reputation book is damaged or too large
└── EvidenceError          a signed answer or a piece of evidence cannot be used
    ├── MalformedEvidence  it does not parse, or breaks an ``EvidenceLimits`` bound
    └── InvalidEvidence    it parses but does not hold: a signature fails, answers are to
                           different questions, the material does not match its digests
"""

from __future__ import annotations


class SecurityError(Exception):
    """Root of every error raised by :mod:`security`."""


class InvalidPeerId(SecurityError, ValueError):
    """Not a valid (Ed25519, identity-multihash) libp2p PeerID."""


class InvalidSignature(SecurityError):
    """A signature did not verify."""


class InvalidCertificate(SecurityError):
    """A peer's TLS certificate does not prove a libp2p identity."""


class KeyFileError(SecurityError):
    """A private key file cannot be used."""


class EnvelopeError(SecurityError):
    """A signed envelope was rejected."""


class ProofOfWorkError(SecurityError):
    """An identity's proof-of-work does not meet the required difficulty."""

    def __init__(self, message: str, *, difficulty: int, required: int) -> None:
        super().__init__(message)
        self.difficulty = difficulty
        self.required = required


class ReputationFileError(SecurityError):
    """A saved reputation book cannot be read back."""


class EvidenceError(SecurityError):
    """A signed answer or a piece of evidence was rejected."""


class MalformedEvidence(EvidenceError):
    """Evidence that does not parse or breaks a size bound."""


class InvalidEvidence(EvidenceError):
    """Evidence that parses but does not hold."""
