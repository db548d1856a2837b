"""Bounds of reachability checks, relaying and hole punching, as data (STYLE.md rule 4)."""

from __future__ import annotations

from dataclasses import dataclass

from transport._limits import KIB


@dataclass(frozen=True, slots=True)
class AutonatLimits:
    """Bounds of the reachability check, on both sides."""

    max_message_bytes: int = 4 * KIB
    max_addrs: int = 8
    """Addresses a client may ask to be dialed at; the server dials at most this many."""
    dial_timeout_s: float = 3.0
    """How long the server tries each dial-back."""
    request_timeout_s: float = 10.0
    """How long a client waits for a server's answer."""
    max_concurrent_requests: int = 8
    """Requests a server serves at once; further ones are refused."""
    servers_per_check: int = 3
    """Peers a client asks in one check."""
