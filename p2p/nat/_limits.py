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


@dataclass(frozen=True, slots=True)
class NatLimits:
    """Pacing of ``NatTraversal``: when it checks reachability and looks for a relay."""

    check_interval_s: float = 1.0
    """While reachability is unknown (or a private peer holds no reservation), how often
    it looks for peers to ask (or relays to reserve on)."""
    recheck_interval_s: float = 300.0
    """How often a known reachability is checked again."""
    relay_retry_s: float = 10.0
    """How long a peer that refused a reservation is left alone."""
