"""Signed envelopes: a payload signed with domain separation and a sequence number.

Modelled on libp2p's signed envelopes (RFC 0002): the signature covers the domain,
the payload type, the sequence number and the payload, each length-prefixed, so a
signature made for one purpose can never be replayed for another. Receivers keep
the highest sequence number seen per (signer, domain) and refuse anything not newer.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from ._errors import EnvelopeError, InvalidPeerId
from ._keys import KeyPair, verify_signature
from ._peer_id import PeerId

MAX_ENVELOPE_BYTES = 64 * 1024


def _signing_input(domain: str, payload_type: bytes, seq: int, payload: bytes) -> bytes:
    parts = [domain.encode(), payload_type, seq.to_bytes(8, "big"), payload]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    """A payload, who signed it, for which domain, and in what order."""

    signer: PeerId
    domain: str
    payload_type: bytes
    seq: int
    payload: bytes
    signature: bytes

    @classmethod
    def seal(
        cls, identity: KeyPair, domain: str, payload: bytes, *, seq: int, payload_type: bytes = b""
    ) -> SignedEnvelope:
        if not 0 <= seq < 2**64:
            raise EnvelopeError(f"sequence number {seq} is outside 0..2**64-1")
        signature = identity.sign(_signing_input(domain, payload_type, seq, payload))
        return cls(identity.peer_id, domain, payload_type, seq, payload, signature)

    def verify(self, domain: str) -> None:
        """Raise ``EnvelopeError`` unless the envelope is for ``domain`` and its signature holds."""
        if self.domain != domain:
            raise EnvelopeError(f"envelope is for domain {self.domain!r}, expected {domain!r}")
        data = _signing_input(self.domain, self.payload_type, self.seq, self.payload)
        if not verify_signature(self.signer.public_key(), data, self.signature):
            raise EnvelopeError(f"envelope signature does not verify for signer {self.signer}")

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            [
                self.signer.to_bytes(),
                self.domain,
                self.payload_type,
                self.seq,
                self.payload,
                self.signature,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedEnvelope:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise EnvelopeError(
                f"envelope of {len(data)} bytes exceeds MAX_ENVELOPE_BYTES={MAX_ENVELOPE_BYTES}"
            )
        try:
            fields = msgpack.unpackb(data)
            signer, domain, payload_type, seq, payload, signature = fields
            envelope = cls(PeerId.from_bytes(signer), domain, payload_type, seq, payload, signature)
        except (ValueError, TypeError, InvalidPeerId, msgpack.UnpackException) as exc:
            raise EnvelopeError(f"malformed envelope: {exc}") from None
        if not (
            isinstance(domain, str)
            and isinstance(payload_type, bytes)
            and type(seq) is int
            and isinstance(payload, bytes)
            and isinstance(signature, bytes)
        ):
            raise EnvelopeError("malformed envelope: a field has the wrong type")
        if not 0 <= seq < 2**64:
            raise EnvelopeError(f"malformed envelope: sequence number {seq} is outside 0..2**64-1")
        return envelope


class SequenceTracker:
    """Remembers the newest sequence number per (signer, domain); refuses replays."""

    def __init__(self) -> None:
        self._latest: dict[tuple[PeerId, str], int] = {}

    def open(self, envelope: SignedEnvelope, domain: str) -> bytes:
        """Verify ``envelope`` and accept it only if it is newer than any seen before."""
        envelope.verify(domain)
        key = (envelope.signer, domain)
        latest = self._latest.get(key)
        if latest is not None and envelope.seq <= latest:
            raise EnvelopeError(
                f"envelope from {envelope.signer} has sequence {envelope.seq}, not newer than "
                f"{latest} already accepted (replayed or stale)"
            )
        self._latest[key] = envelope.seq
        return envelope.payload
