"""Every bound and tuning knob of the DHT, as data (STYLE.md rule 4).

Change a value with ``dataclasses.replace``; tests pass tiny limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import DhtConfigError

KIB = 1024
MIB = 1024 * KIB
HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class DhtLimits:
    """Kademlia parameters, record bounds, abuse limits and timers of one DHT node."""

    # Kademlia
    k: int = 20
    alpha: int = 3
    disjoint_paths: int = 1
    replacement_cache_size: int = 20
    max_failures: int = 1

    # IP diversity (IPv4 /24, IPv6 /48 groups)
    max_per_ip_group_per_bucket: int = 2
    max_per_ip_group_in_table: int = 10
    max_per_ip_group_in_lookup: int = 2
    exempt_private_addrs: bool = True

    # identity proof-of-work (security.solve_pow)
    pow_difficulty: int = 12
    """Leading zero bits a peer's identity proof must have for it to enter our routing
    table, answer our lookups, or own a sub-key we store. 12 bits cost about 5 ms of one
    core; a public swarm should ask for ``security.DEFAULT_POW_DIFFICULTY`` (20, ~1 s)."""

    # records
    max_key_bytes: int = 512
    max_subkey_bytes: int = 512
    max_record_bytes: int = 64 * KIB
    max_key_total_bytes: int = 1 * MIB
    max_expiry_s: float = 48 * HOUR

    # storage and abuse
    per_peer_quota_bytes: int = 4 * MIB
    store_cap_bytes: int = 64 * MIB
    request_rate_per_s: float = 200.0
    request_burst: int = 2000
    store_rate_per_s: float = 50.0
    store_burst: int = 500
    max_tracked_peers: int = 10_000
    max_message_bytes: int = 4 * MIB
    max_entries_per_message: int = 4096
    max_addrs_per_peer: int = 8
    contact_cache_size: int = 4096

    # timers
    rpc_timeout_s: float = 5.0
    lookup_stall_s: float = 1.0
    refresh_interval_s: float = 15 * 60.0
    refresh_min_contacts: int = 5
    """A bucket refresh looks up random IDs of the bucket until it holds this many."""
    republish_interval_s: float = HOUR
    maintenance_interval_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("k", "alpha", "disjoint_paths", "max_failures"):
            if getattr(self, name) < 1:
                value = getattr(self, name)
                raise DhtConfigError(f"DhtLimits.{name} must be at least 1, got {value}")
        if not 0 <= self.pow_difficulty <= 64:
            raise DhtConfigError(
                f"DhtLimits.pow_difficulty must be within 0..64 bits, got {self.pow_difficulty}"
            )
        if self.disjoint_paths > self.k:
            raise DhtConfigError(
                f"DhtLimits.disjoint_paths={self.disjoint_paths} cannot exceed k={self.k}"
            )
