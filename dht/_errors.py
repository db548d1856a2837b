"""The dht package's one exception tree.

    DHTError
    ├── RecordRejected            a record was refused; ``code`` says why (``RefusalCode``)
    │   ├── RecordTooLarge        key, sub-key or value over ``DhtLimits`` byte bounds
    │   ├── RecordExpired         the expiry is already past
    │   ├── ExpiryTooFar          the expiry is further ahead than ``DhtLimits.max_expiry_s``
    │   ├── BadSignature          an owned sub-key's entry is unsigned or its signature fails
    │   ├── StaleRecord           not newer than the entry held (replayed or out of date)
    │   ├── QuotaExceeded         the sending peer's storage quota is spent
    │   ├── StoreFull             the store (or the key) is full of entries that expire later
    │   ├── RateLimited           the peer sent requests faster than its rate limit
    │   ├── MalformedRecord       the record's fields have the wrong types
    │   └── InsufficientProofOfWork  the owner's (or sender's) identity proof-of-work is
    │                             missing or weaker than ``DhtLimits.pow_difficulty``
    ├── DhtProtocolError          a peer sent a malformed DHT message (feeds its reputation)
    ├── StoreFailed               no node accepted a store
    ├── NotBootstrapped           the routing table is empty: nobody to ask
    └── DhtConfigError            ``DhtLimits`` or an argument holds an impossible value

A refusal crosses the wire as its ``RefusalCode``; ``rejection(code, message)`` turns
one back into the matching exception class.
"""

from __future__ import annotations

from enum import IntEnum


class RefusalCode(IntEnum):
    """Why a node refused a record or a request (wire values; 0 means accepted)."""

    OK = 0
    TOO_LARGE = 1
    EXPIRED = 2
    EXPIRY_TOO_FAR = 3
    BAD_SIGNATURE = 4
    STALE = 5
    QUOTA = 6
    STORE_FULL = 7
    RATE_LIMITED = 8
    MALFORMED = 9
    INSUFFICIENT_POW = 10


class DHTError(Exception):
    """Root of every error raised by :mod:`dht`."""


class RecordRejected(DHTError):
    """A record was refused by a store or a validator."""

    code: RefusalCode = RefusalCode.MALFORMED

    def __init__(self, message: str) -> None:
        super().__init__(message)


class RecordTooLarge(RecordRejected):
    code = RefusalCode.TOO_LARGE


class RecordExpired(RecordRejected):
    code = RefusalCode.EXPIRED


class ExpiryTooFar(RecordRejected):
    code = RefusalCode.EXPIRY_TOO_FAR


class BadSignature(RecordRejected):
    code = RefusalCode.BAD_SIGNATURE


class StaleRecord(RecordRejected):
    code = RefusalCode.STALE


class QuotaExceeded(RecordRejected):
    code = RefusalCode.QUOTA


class StoreFull(RecordRejected):
    code = RefusalCode.STORE_FULL


class RateLimited(RecordRejected):
    code = RefusalCode.RATE_LIMITED


class MalformedRecord(RecordRejected):
    code = RefusalCode.MALFORMED


class InsufficientProofOfWork(RecordRejected):
    code = RefusalCode.INSUFFICIENT_POW


_BY_CODE: dict[RefusalCode, type[RecordRejected]] = {
    cls.code: cls
    for cls in (
        RecordTooLarge,
        RecordExpired,
        ExpiryTooFar,
        BadSignature,
        StaleRecord,
        QuotaExceeded,
        StoreFull,
        RateLimited,
        MalformedRecord,
        InsufficientProofOfWork,
    )
}


def rejection(code: RefusalCode, message: str) -> RecordRejected:
    """The exception for a refusal ``code`` (as received from a remote node)."""
    return _BY_CODE.get(code, MalformedRecord)(message)


class DhtProtocolError(DHTError):
    """A peer sent a DHT message that does not parse or breaks a bound."""


class StoreFailed(DHTError):
    """A store reached no node that accepted it."""

    def __init__(self, message: str, *, refusals: dict[RefusalCode, int] | None = None) -> None:
        super().__init__(message)
        self.refusals = dict(refusals or {})


class NotBootstrapped(DHTError):
    """The routing table is empty; call ``DHT.start(bootstrap=[...])`` with a reachable peer."""


class DhtConfigError(DHTError, ValueError):
    """A limit or argument has an impossible value (a bug in the caller)."""
