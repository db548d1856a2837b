"""Identities, signatures, proofs and trust for Swarm peers. Imports without torch or numpy.

Trust: ``ReputationBook`` (decaying per-peer scores, bans, probation, IP-group
penalty, persisted), ``SignedAnswer`` (a server's signed step), ``Evidence`` and the
pure ``judge`` (convict a cheater or the false accuser).
"""

import inspect

from ._base58 import b58decode, b58encode
from ._envelope import MAX_ENVELOPE_BYTES, SequenceTracker, SignedEnvelope
from ._errors import (
    EnvelopeError,
    EvidenceError,
    InvalidCertificate,
    InvalidEvidence,
    InvalidPeerId,
    InvalidSignature,
    KeyFileError,
    MalformedEvidence,
    ProofOfWorkError,
    ReputationFileError,
    SecurityError,
)
from ._evidence import (
    EMPTY_HISTORY,
    Evidence,
    EvidenceLimits,
    Judgement,
    Recheck,
    SignedAnswer,
    Verdict,
    chain_history,
    digest,
    evidence_key,
    history_digest,
    judge,
)
from ._ipgroup import ip_group
from ._keys import KeyPair, verify_signature
from ._peer_id import PeerId
from ._pow import (
    DEFAULT_POW_DIFFICULTY,
    MAX_NONCE_BYTES,
    IdentityProof,
    proof_bits,
    search_pow,
    solve_pow,
    verify_pow,
)
from ._reputation import Event, ReputationBook, ReputationSettings, Standing
from ._tls import (
    LIBP2P_ALPN,
    LIBP2P_EXTENSION_OID,
    TlsCertificate,
    make_tls_certificate,
    peer_id_from_certificate,
)

__all__ = [
    "DEFAULT_POW_DIFFICULTY",
    "EMPTY_HISTORY",
    "LIBP2P_ALPN",
    "LIBP2P_EXTENSION_OID",
    "MAX_ENVELOPE_BYTES",
    "MAX_NONCE_BYTES",
    "EnvelopeError",
    "Event",
    "Evidence",
    "EvidenceError",
    "EvidenceLimits",
    "IdentityProof",
    "InvalidCertificate",
    "InvalidEvidence",
    "InvalidPeerId",
    "InvalidSignature",
    "Judgement",
    "KeyFileError",
    "KeyPair",
    "MalformedEvidence",
    "PeerId",
    "ProofOfWorkError",
    "Recheck",
    "ReputationBook",
    "ReputationFileError",
    "ReputationSettings",
    "SecurityError",
    "SequenceTracker",
    "SignedAnswer",
    "SignedEnvelope",
    "Standing",
    "TlsCertificate",
    "Verdict",
    "b58decode",
    "b58encode",
    "chain_history",
    "digest",
    "evidence_key",
    "history_digest",
    "ip_group",
    "judge",
    "make_tls_certificate",
    "peer_id_from_certificate",
    "proof_bits",
    "search_pow",
    "solve_pow",
    "verify_pow",
    "verify_signature",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or inspect.isfunction(_obj):
        _obj.__module__ = __name__
