"""The scheduler's model of the world: servers and a snapshot of one model's swarm.

Units, once and for all:

* Blocks are numbered ``0 .. num_blocks - 1``; a span is half-open, ``[start, end)``.
* ``throughput`` is in **block-tokens per second**: how many tokens per second the
  server pushes through *one* of its blocks (compute measured on one block, capped by
  what its network can carry). A hop of ``k`` blocks over ``T`` tokens therefore takes
  ``k * T / throughput`` seconds, and the server adds its whole ``throughput`` to the
  per-block throughput of every block it serves.
* Round-trip times are in seconds.

A snapshot keeps its servers sorted by peer id, so that two servers that see the same
announcements compute bit-identical sums and take identical decisions.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from ._errors import InvalidSnapshot, UnknownServer

PeerKey = str | bytes
"""A server's identity: opaque to the scheduler (``str(peer_id)`` or ``peer_id.to_bytes()``)."""


def peer_order(peer_id: PeerKey) -> tuple[bytes, int]:
    """The total order of peer ids used for every deterministic tie-break."""
    if isinstance(peer_id, str):
        return peer_id.encode(), 0
    return bytes(peer_id), 1


class _FrozenMap(Mapping[PeerKey, float]):
    """A read-only copy of a mapping (picklable, unlike ``MappingProxyType``)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[PeerKey, float]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: PeerKey) -> float:
        return self._data[key]

    def __iter__(self) -> Iterator[PeerKey]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def _server_order(server: ServerInfo) -> tuple[bytes, int]:
    return peer_order(server.peer_id)


class ServerState(StrEnum):
    """Where a server is in its life, as it announces it."""

    JOINING = "joining"
    """Loading its span: counted by placement (the blocks are taken), not routed to."""
    ONLINE = "online"
    """Serving its span."""
    OFFLINE = "offline"
    """Announced leaving: ignored by every decision."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One server of a model's swarm, as announced (and, for ``rtts``, as measured)."""

    peer_id: PeerKey
    start: int
    """First block served."""
    end: int
    """One past the last block served."""
    throughput: float
    """Block-tokens per second (see the module docstring); 0 means unknown or unusable."""
    state: ServerState = ServerState.ONLINE
    cache_tokens_left: int | None = None
    """Tokens of attention cache the server can still give one new session over its
    whole span; None when not announced (routing then assumes room)."""
    quantization: str = "none"
    """How the span stores its weights: ``none``, ``int8``, ``nf4``."""
    dtype: str = "bfloat16"
    """Compute dtype of the span."""
    rtts: Mapping[PeerKey, float] = field(default_factory=dict, hash=False)
    """Round trips (s) this server measured to other servers, by peer id."""
    reputation: float = 1.0
    """Trust in [0, 1]; scales the traffic batch routing sends here; 0 is never routed to."""

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str | bytes) or not self.peer_id:
            raise InvalidSnapshot(f"server peer_id {self.peer_id!r} must be a non-empty str/bytes")
        if not (0 <= self.start < self.end):
            raise InvalidSnapshot(
                f"server {self.peer_id!r} has span [{self.start}, {self.end}): "
                "need 0 <= start < end"
            )
        if not (math.isfinite(self.throughput) and self.throughput >= 0):
            raise InvalidSnapshot(
                f"server {self.peer_id!r} has throughput {self.throughput}: need finite >= 0"
            )
        if not 0.0 <= self.reputation <= 1.0:
            raise InvalidSnapshot(
                f"server {self.peer_id!r} has reputation {self.reputation}: need 0 <= r <= 1"
            )
        if self.cache_tokens_left is not None and self.cache_tokens_left < 0:
            raise InvalidSnapshot(
                f"server {self.peer_id!r} has cache_tokens_left {self.cache_tokens_left} < 0"
            )
        object.__setattr__(self, "state", ServerState(self.state))
        rtts = dict(self.rtts)
        for peer, rtt in rtts.items():
            if not (math.isfinite(rtt) and rtt >= 0):
                raise InvalidSnapshot(
                    f"server {self.peer_id!r} reports RTT {rtt} to {peer!r}: need finite >= 0"
                )
        object.__setattr__(self, "rtts", _FrozenMap(rtts))

    @property
    def length(self) -> int:
        """Number of blocks served."""
        return self.end - self.start

    def covers(self, block: int) -> bool:
        """Whether ``block`` is in this server's span."""
        return self.start <= block < self.end

    def with_span(self, start: int, end: int) -> ServerInfo:
        """This server serving ``[start, end)`` instead."""
        return replace(self, start=start, end=end)


def _check_num_blocks(num_blocks: int) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise InvalidSnapshot(f"num_blocks={num_blocks!r} must be an int >= 1")


@dataclass(frozen=True, slots=True)
class SwarmSnapshot:
    """The servers of one model's swarm at one moment; servers kept sorted by peer id."""

    num_blocks: int
    servers: tuple[ServerInfo, ...] = ()
    _index: Mapping[PeerKey, ServerInfo] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        _check_num_blocks(self.num_blocks)
        for server in self.servers:
            if not isinstance(server, ServerInfo):
                raise InvalidSnapshot(f"{server!r} is not a ServerInfo")
        ordered = tuple(sorted(self.servers, key=_server_order))
        index: dict[PeerKey, ServerInfo] = {}
        for server in ordered:
            if server.peer_id in index:
                raise InvalidSnapshot(f"server {server.peer_id!r} appears twice in the snapshot")
            if server.end > self.num_blocks:
                raise InvalidSnapshot(
                    f"server {server.peer_id!r} serves [{server.start}, {server.end}) "
                    f"but the model has {self.num_blocks} blocks"
                )
            index[server.peer_id] = server
        object.__setattr__(self, "servers", ordered)
        object.__setattr__(self, "_index", index)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._index

    def __iter__(self) -> Iterator[ServerInfo]:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def server(self, peer_id: PeerKey) -> ServerInfo:
        """The server with this peer id; ``UnknownServer`` if absent."""
        try:
            return self._index[peer_id]
        except KeyError:
            raise UnknownServer(peer_id) from None

    def with_server(self, server: ServerInfo) -> SwarmSnapshot:
        """This snapshot with ``server`` added, or replacing the one of the same peer id."""
        if server.end > self.num_blocks:
            raise InvalidSnapshot(
                f"server {server.peer_id!r} serves [{server.start}, {server.end}) "
                f"but the model has {self.num_blocks} blocks"
            )
        servers = list(self.servers)
        position = self._position(server.peer_id)
        if server.peer_id in self._index:
            servers[position] = server
        else:
            servers.insert(position, server)
        return self._edited(servers)

    def without(self, peer_id: PeerKey) -> SwarmSnapshot:
        """This snapshot without that server (unchanged if absent)."""
        if peer_id not in self._index:
            return self
        servers = list(self.servers)
        del servers[self._position(peer_id)]
        return self._edited(servers)

    def _position(self, peer_id: PeerKey) -> int:
        return bisect.bisect_left(self.servers, peer_order(peer_id), key=_server_order)

    def _edited(self, servers: list[ServerInfo]) -> SwarmSnapshot:
        """A snapshot of already sorted, validated servers, built without re-checking."""
        edited = object.__new__(SwarmSnapshot)
        object.__setattr__(edited, "num_blocks", self.num_blocks)
        object.__setattr__(edited, "servers", tuple(servers))
        object.__setattr__(edited, "_index", {s.peer_id: s for s in servers})
        return edited

    def where(self, keep: Callable[[ServerInfo], bool]) -> SwarmSnapshot:
        """The servers ``keep`` accepts (e.g. one quantization or dtype)."""
        return SwarmSnapshot(self.num_blocks, tuple(s for s in self.servers if keep(s)))

    def block_throughputs(self, *, include_joining: bool = False) -> tuple[float, ...]:
        """Per-block throughput: the summed throughput of the online servers on each block.

        ``include_joining=True`` adds the servers still loading their span: placement and
        rebalancing count them (their blocks are taken), routing does not.
        """
        states = _CAPACITY_STATES if include_joining else _ONLINE
        return tuple(capacity(self.num_blocks, (s for s in self.servers if s.state in states)))

    def min_throughput(self, *, include_joining: bool = False) -> float:
        """The swarm's weakest per-block throughput (0 while a block is uncovered)."""
        return min(self.block_throughputs(include_joining=include_joining))

    def uncovered_blocks(self, *, include_joining: bool = False) -> tuple[int, ...]:
        """Blocks no online (optionally: or joining) server serves."""
        states = _CAPACITY_STATES if include_joining else _ONLINE
        counts = coverage(self.num_blocks, (s for s in self.servers if s.state in states))
        return tuple(b for b, count in enumerate(counts) if count == 0)

    def upper_bound(self) -> float:
        """A ceiling on the minimum per-block throughput of any placement of the online and
        joining servers (each keeping its span length).

        If every block gets at least ``z``, each block holds at least ``z`` of *useful*
        throughput, and a server adds at most ``min(throughput, z)`` useful throughput to
        each of its ``length`` blocks: ``num_blocks * z <= sum(length * min(t, z))``. The
        bound is the largest such ``z``. It is the mean per-block throughput,
        ``sum(t * length) / num_blocks``, unless some server alone exceeds it (a server
        far faster than the rest cannot spread its surplus beyond its span), and 0 when
        the spans together are too short to cover every block.
        """
        return max_level(
            self.num_blocks,
            ((s.throughput, s.length) for s in self.servers if s.state in _CAPACITY_STATES),
        )


def max_level(num_blocks: int, servers: Iterable[tuple[float, int]]) -> float:
    """The largest ``z`` with ``num_blocks * z <= sum(length * min(t, z))`` over
    ``(t, length)`` pairs (see ``SwarmSnapshot.upper_bound``)."""
    ordered = sorted(servers)
    above = sum(length for _, length in ordered)
    below = 0.0
    floor = 0.0
    for t, length in [*ordered, (math.inf, 0)]:
        if above < num_blocks:
            level = below / (num_blocks - above)
            if level <= t:
                return max(level, floor)
        below += t * length
        above -= length
        floor = t
    return floor


_ONLINE = frozenset({ServerState.ONLINE})
_CAPACITY_STATES = frozenset({ServerState.ONLINE, ServerState.JOINING})


def is_active(server: ServerInfo) -> bool:
    """Online or joining: the server holds (or is loading) its span."""
    return server.state in _CAPACITY_STATES


THROUGHPUT_UNITS = 1 << 16
"""Sums of throughputs are exact integers of 1/65536 block-token per second: the same
servers give the same per-block sums in any order, and an uncovered block exactly 0."""


def to_units(throughput: float) -> int:
    """A throughput in whole ``1 / THROUGHPUT_UNITS`` steps."""
    return round(throughput * THROUGHPUT_UNITS)


def capacity_units(num_blocks: int, servers: Iterable[ServerInfo]) -> list[int]:
    """Summed throughput per block of ``servers``, in ``THROUGHPUT_UNITS``."""
    delta = [0] * (num_blocks + 1)
    for server in servers:
        t = to_units(server.throughput)
        delta[server.start] += t
        delta[server.end] -= t
    return list(itertools.accumulate(delta[:-1]))


def capacity(num_blocks: int, servers: Iterable[ServerInfo]) -> list[float]:
    """Summed throughput per block of ``servers``."""
    return [u / THROUGHPUT_UNITS for u in capacity_units(num_blocks, servers)]


def coverage(num_blocks: int, servers: Iterable[ServerInfo]) -> list[int]:
    """How many of ``servers`` serve each block."""
    delta = [0] * (num_blocks + 1)
    for server in servers:
        delta[server.start] += 1
        delta[server.end] -= 1
    return list(itertools.accumulate(delta[:-1]))
