"""Every bound of the Host, as data (STYLE.md rule 4).

``HostLimits`` groups them with the transport's (``transport.TransportLimits``); change a
value with ``dataclasses.replace``; tests pass tiny limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transport._limits import KIB, MIB, TransportLimits


@dataclass(frozen=True, slots=True)
class RpcLimits:
    """Bounds on RPC calls and frames."""

    max_frame_bytes: int = 128 * MIB
    """Largest frame (msgpack header plus raw payload) sent or accepted."""
    max_concurrent_calls_per_peer: int = 256
    """Calls in flight per peer, each way: callers wait, a server refuses the excess."""
    default_timeout_s: float = 30.0
    """Deadline of a unary call made with ``timeout=None``."""
    default_stream_timeout_s: float | None = None
    """Deadline of a streaming call opened with ``timeout=None`` (None: no deadline)."""
    request_read_timeout_s: float = 60.0
    """How long a server waits for a unary call's request frame."""
    stream_queue_frames: int = 8
    """Frames a streaming handler may leave unread before the server stops reading."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds and policy of the connection manager."""

    max_connections: int = 512
    max_connections_per_peer: int = 4
    """Simultaneous dials can leave two; one is used, the rest idle out."""
    idle_timeout_s: float = 120.0
    """A connection with no stream for this long is closed."""
    transport_preference: tuple[str, ...] = ("tcp", "quic", "memory")
    """Order in which a peer's addresses are tried, by ``Multiaddr.transport_kind``.

    TCP comes first because the QUIC stack (aioquic) is CPU-bound in Python, so TCP
    moves bulk data several times faster; QUIC stays the way through NATs for peers
    that only publish a QUIC address. Kinds left out (relay circuits) are tried last, in
    address order.
    """
    dial_stagger_s: float = 0.25
    """Dialing a peer by PeerID tries its addresses in order, starting the next one when
    the previous failed or after this long (the slow ones still run): an address that
    cannot answer (another LAN's, a NATed one) delays a working one by this much, not by
    the dial timeout. The first connection made wins and the other attempts stop."""
    retire_poll_s: float = 0.1
    """How often a retired connection (``Host.retire``) is checked for its last stream."""


@dataclass(frozen=True, slots=True)
class IdentifyLimits:
    """Bounds on identify and on what the Host learns from it."""

    max_message_bytes: int = 64 * KIB
    timeout_s: float = 10.0
    observed_confirmations: int = 2
    """Distinct peers that must report an observed address before the Host advertises it."""
    max_observed_addrs: int = 32


@dataclass(frozen=True, slots=True)
class PeerStoreLimits:
    """Bounds on what the peer store keeps (its input comes from untrusted peers)."""

    max_peers: int = 10_000
    max_addrs_per_peer: int = 32
    max_protocols_per_peer: int = 256
    max_agent_version_chars: int = 256


@dataclass(frozen=True, slots=True)
class BootstrapLimits:
    """Retry policy of ``Host.bootstrap`` when it is called without arguments for it."""

    retries: int = 4
    backoff_s: float = 0.5
    """First retry delay; each further retry doubles it."""
    max_backoff_s: float = 30.0


@dataclass(frozen=True, slots=True)
class HostLimits:
    """All bounds of a Host, grouped."""

    transport: TransportLimits = field(default_factory=TransportLimits)
    """The Host negotiates with ``multistream`` and dials with ``dial_timeout_s``; the
    transports keep the limits they were constructed with (pass them the same value)."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    rpc: RpcLimits = field(default_factory=RpcLimits)
    identify: IdentifyLimits = field(default_factory=IdentifyLimits)
    peerstore: PeerStoreLimits = field(default_factory=PeerStoreLimits)
    bootstrap: BootstrapLimits = field(default_factory=BootstrapLimits)
    ping_timeout_s: float = 10.0
