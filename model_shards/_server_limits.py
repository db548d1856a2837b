"""Bounds and timers of the shard server and the distributed client, as data (STYLE.md rule 4).

Change a value with ``dataclasses.replace``; tests pass tiny limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._limits import CacheLimits, RequestLimits, WireLimits


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Everything one shard server bounds: requests, tensors, caches, sessions, announcements."""

    request: RequestLimits = field(default_factory=RequestLimits)
    wire: WireLimits = field(default_factory=WireLimits)
    cache: CacheLimits = field(default_factory=CacheLimits)
    session_idle_timeout_s: float = 300.0
    """An inference session that sends nothing for this long is closed (``SessionTimeout``)."""
    inline_step_s: float = 0.005
    """An inference step expected (from the measured throughput) to take at most this long
    runs on the event loop itself rather than on the compute thread: two thread hand-offs
    fewer per generated token, at the price of holding the loop that long."""
    max_spans: int = 64
    """Distinct sub-spans kept ready to run (a client may use part of the server's span)."""
    announce_interval_s: float = 30.0
    """How often the server refreshes its DHT records (well before they expire)."""
    record_ttl_s: float = 120.0
    """Lifetime of each DHT record; refreshed every ``announce_interval_s``."""
    drain_timeout_s: float = 10.0
    """On a graceful stop: how long open sessions may go on before they are closed."""

    def __post_init__(self) -> None:
        if not 0 < self.announce_interval_s < self.record_ttl_s:
            raise ValueError(
                f"ServerLimits.announce_interval_s={self.announce_interval_s} must be positive "
                f"and below record_ttl_s={self.record_ttl_s}, or records expire between refreshes"
            )


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Timers and bounds of the distributed client."""

    wire: WireLimits = field(default_factory=WireLimits)
    call_timeout_s: float = 120.0
    """Deadline of one forward or backward call, or of one inference step."""
    connect_timeout_s: float = 30.0
    """Bootstrap, and opening the sessions of a chain."""
    route_ttl_s: float = 10.0
    """How long a view of the swarm (read from the DHT) is reused before it is read again."""
    route_wait_s: float = 0.0
    """How long to wait for missing blocks to be served before ``MissingBlocksError``."""
    route_poll_s: float = 0.5
    """While waiting for blocks: how often the DHT is read again."""
