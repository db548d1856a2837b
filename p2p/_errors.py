"""The p2p package's one exception tree.

    P2PError
    ├── DialFailed                  one address could not be dialed (carries addr and cause)
    │   └── PeerIdMismatch          the remote proved a different PeerID than expected
    ├── PeerUnreachable             no address of a peer worked (lists each attempt)
    ├── ConnectionLost              the connection to the peer closed while in use
    ├── StreamFailed                a stream was reset or ended early (outside RPC)
    ├── ProtocolNegotiationFailed   multistream-select found no protocol both sides speak
    │   └── ProtocolNotSupported    the peer refused every protocol proposed
    ├── PeerProtocolError           the peer broke a wire protocol (feeds its reputation)
    ├── RpcError                    an RPC failed with a code; handlers raise it to answer one
    │   ├── RemoteError             the remote answered the call with an error
    │   ├── RpcTimeout              the call's deadline passed (also a ``P2PTimeout``)
    │   └── RpcCancelled            the other side reset (cancelled) the call
    ├── P2PTimeout                  an operation took longer than its limit (a ``TimeoutError``)
    ├── LimitExceeded               a configured bound (``*Limits``) would be crossed
    └── BootstrapError              no bootstrap address could be joined (lists each failure)

Remote and local faults are kept apart: ``PeerProtocolError`` and ``RemoteError`` are
the peer's doing; anything else escaping this package is ours or the network's.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from transport._errors import ConnectionClosed, RemoteProtocolError, TransportError
from transport._errors import LimitExceeded as TransportLimitExceeded


class RpcCode(StrEnum):
    """Error codes carried by RPC error frames; handlers may use their own strings too."""

    INTERNAL = "internal"
    """The handler raised an unexpected exception."""
    UNKNOWN_METHOD = "unknown_method"
    """The protocol is served but not as the kind of call made (unary vs streaming)."""
    BAD_FRAME = "bad_frame"
    """A frame was malformed or oversized; the stream is closed."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    """The call's deadline passed on the server."""
    OVERLOADED = "overloaded"
    """The server runs ``RpcLimits.max_concurrent_calls_per_peer`` calls for this peer."""
    CANCELLED = "cancelled"
    """The call was reset by one side."""


class P2PError(Exception):
    """Root of every error raised by :mod:`p2p`."""


class DialFailed(P2PError):
    """Dialing ``addr`` failed; ``cause`` is the underlying error."""

    def __init__(self, message: str, *, addr: object = None, cause: BaseException | None = None):
        super().__init__(message)
        self.addr = addr
        self.cause = cause


class PeerIdMismatch(DialFailed):
    """The remote at ``addr`` authenticated as ``actual`` instead of ``expected``."""

    def __init__(self, *, expected: object, actual: object, addr: object = None) -> None:
        super().__init__(
            f"dialed {addr} expecting peer {expected} but it authenticated as {actual}; "
            "check the /p2p/ part of the address",
            addr=addr,
        )
        self.expected = expected
        self.actual = actual


class PeerUnreachable(P2PError):
    """No address of ``peer`` could be dialed; ``failures`` maps each address to why."""

    def __init__(self, message: str, *, peer: object, failures: Sequence[DialFailed] = ()):
        super().__init__(message)
        self.peer = peer
        self.failures = tuple(failures)


class ConnectionLost(P2PError):
    """The connection to the peer closed while a stream or call was using it."""


class StreamFailed(P2PError):
    """A stream was reset or ended before its exchange completed; the connection may live on."""


class P2PTimeout(P2PError, TimeoutError):
    """An operation took longer than the limit that bounds it."""


class ProtocolNegotiationFailed(P2PError):
    """multistream-select ended without agreeing on a protocol."""


class ProtocolNotSupported(ProtocolNegotiationFailed):
    """The peer refused every protocol proposed to it."""

    def __init__(self, message: str, *, protocols: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.protocols = tuple(protocols)


class PeerProtocolError(P2PError):
    """The remote peer violated a wire protocol (malformed or oversized input)."""


class RpcError(P2PError):
    """An RPC failed with ``code``; raise it in a handler to answer with that code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = str(code)
        self.message = message


class RemoteError(RpcError):
    """The remote answered the call with an error frame."""

    def __init__(self, code: str, message: str, *, peer: object = None) -> None:
        super().__init__(code, message)
        self.peer = peer


class RpcTimeout(RpcError, P2PTimeout):
    """The call's deadline passed before it completed."""

    def __init__(self, message: str) -> None:
        super().__init__(RpcCode.DEADLINE_EXCEEDED, message)


class RpcCancelled(RpcError):
    """The other side reset the call's stream before it completed."""

    def __init__(self, message: str) -> None:
        super().__init__(RpcCode.CANCELLED, message)


class LimitExceeded(P2PError):
    """A configured limit would be exceeded; the message names value, field and setting."""

    def __init__(self, message: str, *, value: int | None = None, limit: int | None = None):
        super().__init__(message)
        self.value = value
        self.limit = limit


class BootstrapError(P2PError):
    """Every bootstrap address failed; ``failures`` holds the last error of each."""

    def __init__(self, failures: Sequence[tuple[object, BaseException]]) -> None:
        lines = "\n".join(f"  {addr}: {exc}" for addr, exc in failures)
        super().__init__(
            f"could not join through any of {len(failures)} bootstrap addresses:\n{lines}\n"
            "check that the addresses are right and reachable from this machine"
        )
        self.failures = tuple(failures)


def from_transport(exc: TransportError, what: str) -> P2PError:
    """The p2p error a transport failure while doing ``what`` amounts to."""
    if isinstance(exc, ConnectionClosed):
        return ConnectionLost(f"{what}: the connection closed ({exc})")
    if isinstance(exc, TransportLimitExceeded):
        return LimitExceeded(f"{what}: {exc}", value=exc.value, limit=exc.limit)
    if isinstance(exc, RemoteProtocolError):
        return PeerProtocolError(f"{what}: {exc}")
    return StreamFailed(f"{what}: {exc}")
