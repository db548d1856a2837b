"""Every bound of the transport layer, as data (STYLE.md rule 4).

Change a value with ``dataclasses.replace``; tests pass tiny limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class MultistreamLimits:
    """Bounds on multistream-select negotiation."""

    max_message_bytes: int = 1024
    max_proposals: int = 32
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class YamuxLimits:
    """Bounds on one yamux session (TCP connections)."""

    initial_window_bytes: int = 256 * KIB
    max_window_bytes: int = 16 * MIB
    max_frame_bytes: int = 16 * MIB
    max_streams: int = 1024
    max_pending_accept: int = 256
    keepalive_s: float = 20.0
    read_chunk_bytes: int = 1 * MIB
    """Largest receive buffer: it starts at 64 KiB and doubles while reads fill it."""
    close_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class QuicLimits:
    """Bounds and tuning of QUIC connections (aioquic).

    Receive windows start at ``max_stream_data_bytes`` / ``max_data_bytes`` and aioquic
    doubles them as data arrives (not as the application reads it): a reader that stops
    reading is not back-pressured by QUIC flow control.
    """

    max_stream_data_bytes: int = 16 * MIB
    """Initial receive window granted per stream."""
    max_data_bytes: int = 64 * MIB
    """Initial receive window granted per connection."""
    max_streams: int = 1024
    """Concurrent streams the peer may open on one connection."""
    stream_send_buffer_bytes: int = 4 * MIB
    """Written but unacknowledged bytes per stream at which ``write`` waits (resumes at half)."""
    udp_buffer_bytes: int = 8 * MIB
    """SO_RCVBUF / SO_SNDBUF of the UDP socket (forced past net.core.*mem_max when root)."""
    max_datagram_bytes: int = 1350
    """Largest UDP payload sent (aioquic does no path-MTU discovery; 1200 is always safe)."""
    datagrams_per_read: int = 64
    """Datagrams read from the socket per event-loop turn before replying."""
    max_pending_handshakes: int = 256
    """Inbound handshakes in progress per socket; further Initial packets are dropped."""
    congestion_control: str = "reno"
    """aioquic congestion controller: ``"reno"`` or ``"cubic"``."""
    idle_timeout_s: float = 60.0
    keepalive_s: float = 15.0
    """PING interval on an established connection; below ``idle_timeout_s`` and NAT timeouts."""
    handshake_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """Bounds on TCP connection set-up (TLS and muxer negotiation)."""

    handshake_timeout_s: float = 10.0
    read_chunk_bytes: int = 256 * KIB
    """Unread bytes the handshake buffers at most before it stops reading the socket."""
    max_pending_handshakes: int = 256
    """Inbound handshakes in progress per listener; clients beyond it are dropped."""


@dataclass(frozen=True, slots=True)
class MemoryLimits:
    """Bounds of the in-process transport."""

    window_bytes: int = 1 * MIB
    max_streams: int = 1024


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """All transport bounds, grouped; part of ``p2p.HostLimits``."""

    multistream: MultistreamLimits = field(default_factory=MultistreamLimits)
    yamux: YamuxLimits = field(default_factory=YamuxLimits)
    quic: QuicLimits = field(default_factory=QuicLimits)
    tcp: TcpLimits = field(default_factory=TcpLimits)
    memory: MemoryLimits = field(default_factory=MemoryLimits)
    dial_timeout_s: float = 10.0
