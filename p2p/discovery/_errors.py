"""Errors of discovery; rooted in ``p2p.P2PError``."""

from __future__ import annotations

from .._errors import P2PError


class DiscoveryError(P2PError):
    """A discoverer could not start (no usable interface, socket refused...)."""
