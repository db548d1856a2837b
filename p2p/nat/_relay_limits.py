"""Bounds of relaying, on the relay and on the peers that use it (STYLE.md rule 4)."""

from __future__ import annotations

from dataclasses import dataclass

from transport._limits import KIB, MIB


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """What a relay grants and what its clients wait for."""

    max_message_bytes: int = 4 * KIB
    reservation_ttl_s: float = 600.0
    """A reservation lasts this long unless its holder renews it (clients renew at half)."""
    max_reservations: int = 128
    """Reservations a relay holds at once, over all peers."""
    max_reservations_per_ip: int = 4
    """Reservations held by peers connected from one IP address."""
    max_circuits: int = 64
    """Circuits a relay carries at once."""
    max_circuits_per_peer: int = 8
    """Circuits to or from one peer at once."""
    circuit_max_bytes: int = 16 * MIB
    """Bytes a circuit carries (both directions together) before the relay cuts it."""
    circuit_max_duration_s: float = 600.0
    """Seconds a circuit lives before the relay cuts it."""
    request_timeout_s: float = 10.0
    """How long a reservation, a connect request or the relay's call to the target may take."""
    pipe_chunk_bytes: int = 64 * KIB
