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
    """On a graceful stop: how long open sessions may go on before each is told
    ``server_shutting_down`` and closed (its client then fails over)."""
    leave_grace_s: float = 2.0
    """After the drain: how long a session may take to finish its current step and send
    ``server_shutting_down`` before it is cut off."""
    push_timeout_s: float = 1.0
    """Deadline of one push to the next server (connecting included); past it the output
    is left for the client to relay (``pushed: false``)."""
    session_queue: int = 64
    """Inputs (client messages and pushes) a session may hold waiting to run; a push
    beyond it is refused (``overloaded``), a client waits."""

    def __post_init__(self) -> None:
        if self.session_queue < 1:
            raise ValueError(f"ServerLimits.session_queue={self.session_queue} must be >= 1")
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
    ping_timeout_s: float = 3.0
    """A server that does not answer a ping within this long is not routed to (for now)."""
    step_timeout_base_s: float = 1.0
    """Deadline of one inference step at one server: this, plus ``step_timeout_factor``
    times the compute the step should take at the server's announced throughput. A killed
    server (over QUIC) sends nothing, so this bounds how long a failover waits to start;
    a long prefill still gets the time its size needs."""
    step_timeout_factor: float = 4.0
    """How many times the expected compute a step may take (see ``step_timeout_base_s``)."""
    max_failovers: int = 4
    """Replacement attempts for one failed span before ``FailoverFailed``."""
    failover_backoff_s: float = 0.05
    """Delay before the second replacement attempt; it doubles with each further attempt."""
    failover_backoff_max_s: float = 2.0
    """Longest delay between two replacement attempts."""
    failover_wait_s: float = 30.0
    """How long a failover waits for blocks no server serves any more to be served again
    (read from the DHT every ``route_poll_s``) before ``MissingBlocksError``."""
    ban_s: float = 60.0
    """A server that failed is not routed to for this long."""
    push: bool = True
    """Servers pass hidden states straight to the next server of the chain (the client
    still receives every output, for replays); where a server does not (an older one, or
    a push that failed) the client relays that hop's output itself."""
    push_allowance_s: float = 1.0
    """Added to the deadline of a hop asked to push: a server answers once its push was
    taken or gave up (``ServerLimits.push_timeout_s``)."""
    max_rewinds: int = 8
    """Rewinds one ``generate`` call may take: a server caught cheating at a step whose
    earlier positions it had corrupted unchecked sends the generation back to the first of
    them (each rewind bans one server); one more raises ``RewindsExhausted``."""

    def __post_init__(self) -> None:
        if self.max_failovers < 0:
            raise ValueError(f"ClientLimits.max_failovers={self.max_failovers} must be >= 0")
        if self.max_rewinds < 0:
            raise ValueError(f"ClientLimits.max_rewinds={self.max_rewinds} must be >= 0")
        if self.step_timeout_base_s <= 0 or self.step_timeout_factor < 1:
            raise ValueError(
                f"ClientLimits.step_timeout_base_s={self.step_timeout_base_s} must be positive "
                f"and step_timeout_factor={self.step_timeout_factor} at least 1"
            )
