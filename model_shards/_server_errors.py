"""Errors of the shard server and the distributed client, and their wire codes.

They extend the package's tree (``_errors.py``)::

    ShardError
    ├── SessionTimeout          an inference session idled past ServerLimits.session_idle_timeout_s
    ├── ServerShuttingDown      the server is leaving and opens no new session
    ├── ServerError             a server answered with an error this client does not know
    ├── PushNotAllowed          a push from a peer that is not the session's previous server
    └── BadRequest
        ├── UnknownSession      a step or rollback on a session the server does not hold
        └── BlockNotServed      a request for a model or blocks the server does not hold

A server answers a failed request with the error's ``code`` and message; the client
raises the same class again (``remote_error``), with the server's PeerID in ``peer``, so a
caller catches ``TooLong`` or ``CacheFull`` whether it ran locally or across the swarm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _errors
from ._errors import BadRequest, CacheFull, ShardError


class SessionTimeout(ShardError):
    """The inference session sent nothing for longer than the server waits; it was closed."""

    code = "session_timeout"


class ServerShuttingDown(ShardError):
    """The server is shutting down gracefully and opens no new session; route elsewhere."""

    code = "server_shutting_down"


class ServerError(ShardError):
    """A server answered with an error code this client does not know (``remote_code``)."""

    code = "server_error"

    def __init__(self, message: str, *, remote_code: str) -> None:
        super().__init__(message)
        self.remote_code = remote_code


class PushNotAllowed(ShardError):
    """A push into a session from a peer other than the one its client named as ``prev``."""

    code = "not_allowed"


class UnknownSession(BadRequest):
    """A step or rollback named no session the server holds (closed, timed out, never opened)."""

    code = "unknown_session"


class BlockNotServed(BadRequest):
    """The request names a model or blocks outside what this server holds."""

    code = "block_not_served"


def _plain_errors() -> dict[str, type[ShardError]]:
    """Errors a server may send back, by code: those built from a message alone."""
    classes = [
        value
        for value in (*vars(_errors).values(), *globals().values())
        if isinstance(value, type) and issubclass(value, ShardError)
    ]
    special = {CacheFull, ServerError, _errors.ManifestMismatch, _errors.UnknownModelFamily}
    return {cls.code: cls for cls in classes if cls not in special}


_BY_CODE = _plain_errors()


def error_details(error: ShardError) -> dict[str, Any]:
    """What a server sends about ``error``: its code, message and any structured fields."""
    details: dict[str, Any] = {"error": error.code, "message": str(error)}
    if isinstance(error, CacheFull):
        details["requested"] = error.requested
        details["available"] = error.available
    return details


def remote_error(details: Mapping[str, Any], peer: object) -> ShardError:
    """The error a server described (``error_details``), raised again on the client's side."""
    code = str(details.get("error", ""))
    message = f"{peer}: {details.get('message', '')}"
    error: ShardError
    if code == CacheFull.code:
        error = CacheFull(
            message,
            requested=_int(details.get("requested")),
            available=_int(details.get("available")),
        )
    elif code in _BY_CODE:
        error = _BY_CODE[code](message)
    else:
        error = ServerError(f"{message} [{code}]", remote_code=code)
    error.peer = peer  # type: ignore[attr-defined]
    return error


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0
