"""The record model: a key holds a plain value and/or sub-keys, each with its own expiry.

An ``Entry`` is one (key, sub-key, value, expiry) cell; the plain value of a key is the
entry whose sub-key is None. A sub-key that parses as a PeerID is *owned*: its entry
must carry that peer's Ed25519 signature over the domain string, key, sub-key, value
and expiry, so nobody else can write, forge or move it, and the owner's identity
proof-of-work nonce (``security.solve_pow``; bound to the key, so it is carried, not
signed), so that a sub-key costs its owner an identity that cost work. This is how
"block 7 of model M" lists every server hosting it, each server writing only its own
line.

Validators form a chain: every validator must accept an entry, and the first one with
an opinion chooses between two versions of the same cell; without one, the later
expiry wins (a tie keeps the entry already held).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from security import IdentityProof, InvalidPeerId, KeyPair, PeerId, verify_signature

from ._errors import BadSignature

SIGNATURE_DOMAIN = b"swarm-dht-entry/1"


@dataclass(frozen=True, slots=True)
class Record:
    """A value found in the DHT and when it expires (Unix time, seconds)."""

    value: bytes
    expiry: float


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored cell: ``subkey`` None is the key's plain value.

    ``proof`` is the owner's identity proof-of-work nonce for an owned sub-key (empty
    for other cells).
    """

    key: bytes
    subkey: bytes | None
    value: bytes
    expiry: float
    signature: bytes = b""
    proof: bytes = b""

    @property
    def size(self) -> int:
        """Bytes this entry costs in a store (fields plus a fixed overhead)."""
        subkey = len(self.subkey) if self.subkey is not None else 0
        fields = len(self.value) + len(self.signature) + len(self.proof)
        return len(self.key) + subkey + fields + 16

    @property
    def cell(self) -> tuple[bytes, bytes | None]:
        return self.key, self.subkey

    def record(self) -> Record:
        return Record(self.value, self.expiry)


def owner_of(subkey: bytes | None) -> PeerId | None:
    """The peer that owns ``subkey``: the PeerID it encodes, if it encodes one."""
    if subkey is None:
        return None
    try:
        return PeerId.from_bytes(subkey)
    except InvalidPeerId:
        return None


def signing_input(key: bytes, subkey: bytes | None, value: bytes, expiry: float) -> bytes:
    """What an owner signs: domain, key, sub-key and value length-prefixed, then the expiry."""
    parts = [SIGNATURE_DOMAIN, key, subkey if subkey is not None else b"", value]
    body = b"".join(len(p).to_bytes(4, "big") + p for p in parts)
    return body + struct.pack(">d", expiry)


def sign_entry(
    identity: KeyPair,
    key: bytes,
    value: bytes,
    expiry: float,
    *,
    subkey: bytes | None = None,
    proof: IdentityProof | None = None,
) -> Entry:
    """An entry signed by ``identity``, carrying its identity ``proof`` when given; the
    sub-key defaults to the identity's own PeerID."""
    cell = identity.peer_id.to_bytes() if subkey is None else subkey
    signature = identity.sign(signing_input(key, cell, value, expiry))
    return Entry(key, cell, value, expiry, signature, proof.nonce if proof is not None else b"")


class RecordValidator(Protocol):
    """One link of a validator chain."""

    def validate(self, entry: Entry) -> None:
        """Raise a ``RecordRejected`` subclass if ``entry`` may not be stored."""
        ...

    def select(self, current: Entry, incoming: Entry) -> Entry | None:
        """The better of two versions of one cell, or None to leave the choice to the next."""
        ...


class SignatureValidator:
    """Owned sub-keys need their owner's signature; other cells need none."""

    def validate(self, entry: Entry) -> None:
        owner = owner_of(entry.subkey)
        if owner is None:
            return
        data = signing_input(entry.key, entry.subkey, entry.value, entry.expiry)
        if not entry.signature or not verify_signature(owner.public_key(), data, entry.signature):
            raise BadSignature(
                f"entry for sub-key {owner} of key {entry.key[:32]!r} is not signed by {owner}"
            )

    def select(self, current: Entry, incoming: Entry) -> Entry | None:
        return None


class ValidatorChain:
    """Signature checks first, then the caller's validators, then "later expiry wins"."""

    def __init__(self, validators: Iterable[RecordValidator] = ()) -> None:
        self.validators: Sequence[RecordValidator] = (SignatureValidator(), *validators)

    def validate(self, entry: Entry) -> None:
        for validator in self.validators:
            validator.validate(entry)

    def select(self, current: Entry, incoming: Entry) -> Entry:
        for validator in self.validators:
            chosen = validator.select(current, incoming)
            if chosen is not None:
                return chosen
        return incoming if incoming.expiry > current.expiry else current

    def merge(self, entries: Iterable[Entry]) -> list[Entry]:
        """The best version of each cell among ``entries`` (from several nodes)."""
        best: dict[tuple[bytes, bytes | None], Entry] = {}
        for entry in entries:
            held = best.get(entry.cell)
            best[entry.cell] = entry if held is None else self.select(held, entry)
        return list(best.values())
