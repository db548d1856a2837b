"""Bounds of discovery, as data (STYLE.md rule 4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MdnsLimits:
    """Bounds and timing of mDNS discovery."""

    query_timeout_s: float = 3.0
    """How long to wait for a found service's TXT record."""
    max_addrs_per_peer: int = 16
    """``dnsaddr`` strings kept from one announcement (and announced by us)."""
    max_txt_bytes: int = 4096
    """Largest TXT record parsed."""
    max_pending_lookups: int = 64
    """Found services being resolved at once; further ones wait for the next announcement."""
