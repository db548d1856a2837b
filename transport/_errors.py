"""The transport package's one exception tree.

    TransportError
    ├── DialError                 a connection could not be made (carries the address)
    │   └── PeerIdMismatch        the remote proved a different PeerID than expected
    ├── HandshakeError            security or muxer negotiation failed
    ├── ConnectionClosed          the connection is gone (locally or remotely)
    ├── StreamError
    │   ├── StreamReset           the stream was aborted by either side
    │   └── StreamClosed          read past the remote's end, or write after our own close
    ├── RemoteProtocolError       the peer broke the wire protocol (feeds its reputation)
    ├── LimitExceeded             a configured bound (``*Limits``) would be crossed
    └── MultiaddrError            a multiaddr could not be parsed or is not supported

Remote and local faults are kept apart: ``RemoteProtocolError`` is the peer's doing,
any other exception escaping this package is ours.
"""

from __future__ import annotations


class TransportError(Exception):
    """Root of every error raised by :mod:`transport`."""


class DialError(TransportError):
    """A connection to ``addr`` could not be established."""

    def __init__(self, message: str, *, addr: object = None) -> None:
        super().__init__(message)
        self.addr = addr


class PeerIdMismatch(DialError):
    """The remote authenticated as a different PeerID than the dialer expected."""

    def __init__(self, *, expected: object, actual: object, addr: object = None) -> None:
        super().__init__(
            f"dialed {addr} expecting peer {expected} but it authenticated as {actual}; "
            "check the /p2p/ part of the address",
            addr=addr,
        )
        self.expected = expected
        self.actual = actual


class HandshakeError(TransportError):
    """Security or stream-muxer negotiation failed."""


class ConnectionClosed(TransportError):
    """The connection was closed; open a new one to continue."""


class StreamError(TransportError):
    """A single stream failed; the connection and its other streams are unaffected."""


class StreamReset(StreamError):
    """The stream was reset (aborted) by one side."""


class StreamClosed(StreamError):
    """Read past the remote's end of stream, or wrote after closing our side."""


class RemoteProtocolError(TransportError):
    """The remote peer violated the wire protocol."""


class LimitExceeded(TransportError):
    """A configured limit would be exceeded.

    The message names the value, the limit field and its setting.
    """

    def __init__(self, message: str, *, value: int | None = None, limit: int | None = None):
        super().__init__(message)
        self.value = value
        self.limit = limit


class MultiaddrError(TransportError, ValueError):
    """A multiaddr is malformed or uses a protocol this build does not support."""
