"""Identities, signatures and proofs for Swarm peers. Imports without torch or numpy."""

import inspect

from ._base58 import b58decode, b58encode
from ._envelope import MAX_ENVELOPE_BYTES, SequenceTracker, SignedEnvelope
from ._errors import (
    EnvelopeError,
    InvalidCertificate,
    InvalidPeerId,
    InvalidSignature,
    KeyFileError,
    ProofOfWorkError,
    SecurityError,
)
from ._keys import KeyPair, verify_signature
from ._peer_id import PeerId
from ._pow import DEFAULT_POW_DIFFICULTY, IdentityProof, solve_pow, verify_pow
from ._tls import (
    LIBP2P_ALPN,
    LIBP2P_EXTENSION_OID,
    TlsCertificate,
    make_tls_certificate,
    peer_id_from_certificate,
)

__all__ = [
    "DEFAULT_POW_DIFFICULTY",
    "LIBP2P_ALPN",
    "LIBP2P_EXTENSION_OID",
    "MAX_ENVELOPE_BYTES",
    "EnvelopeError",
    "IdentityProof",
    "InvalidCertificate",
    "InvalidPeerId",
    "InvalidSignature",
    "KeyFileError",
    "KeyPair",
    "PeerId",
    "ProofOfWorkError",
    "SecurityError",
    "SequenceTracker",
    "SignedEnvelope",
    "TlsCertificate",
    "b58decode",
    "b58encode",
    "make_tls_certificate",
    "peer_id_from_certificate",
    "solve_pow",
    "verify_pow",
    "verify_signature",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
