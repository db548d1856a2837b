"""Which chain of servers a client sends its hidden states through.

A route is a chain of hops ``(server, start, end)`` covering ``[0, num_blocks)`` in
order; a hop may use part of a server's span (a server on ``[0, 12)`` may be asked for
``[4, 12)``). Only online servers with throughput and reputation above 0, not banned
(and, for generation, with room for the session's cache) are routed to.

The caller's own judgement of servers comes in as data (a client's reputation book,
``security.ReputationBook``, supplies it): ``weights`` (a relative preference per server,
1 when absent, 0 never routed to) and ``avoid`` (servers used only for blocks no other
eligible server serves: soft bans, peers on probation past their share of traffic).

* ``route_min_latency`` (generation): the chain of least expected latency per step:
  each hop's compute, ``blocks * num_tokens / throughput``, plus the network, which
  depends on how hidden states travel:

  - ``push=True`` (servers push their outputs to the next server, the default): one
    pass along the chain, ``(rtt(client, first) + sum(rtt(hop, next hop)) +
    rtt(last, client)) / 2``: every link is crossed one way, costing half its round
    trip. Server-to-server round trips are the ones the servers measured and published
    (``ServerInfo.rtts``).
  - ``push=False`` (the client relays every hop): ``sum(rtt(client, hop))``, a client
    round trip per hop; server-to-server round trips do not matter.

  A round trip is the one the sender measured (``ServerInfo.rtts``, ``client_rtts``),
  else the one the receiver measured, else ``SchedulerSettings.default_rtt_s``. Solved
  exactly by dynamic programming over block boundaries: a state is (boundary, server
  that processed the block before it), and from it the chain either keeps that server
  for one more block or hops to another server that serves the next block. The work is
  about the sum of the spans plus the measured round trips per boundary: 800 servers
  route in tens of milliseconds. With ``weights``, what a hop adds (the link into its
  server and its compute) is divided by its server's weight relative to the heaviest
  eligible server, so a distrusted server is used only where it is clearly faster.
* ``route_for_throughput`` (batch forward/backward): at each boundary, starting at 0,
  draw one of the servers serving the next block with probability proportional to
  ``throughput * reputation * weight``, and use it to the end of its span: a server ten
  times as fast as its peers receives ten times their traffic.
* ``replace_span`` (failover): the least-latency sub-route over exactly the blocks of a
  failed hop, between the hops around it; it never uses the failed server.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace

from ._errors import MissingBlocksError, SchedulerConfigError
from ._model import PeerKey, ServerInfo, ServerState, SwarmSnapshot, coverage
from ._settings import DEFAULT_SETTINGS, SchedulerSettings


@dataclass(frozen=True, slots=True)
class Hop:
    """Server ``peer_id`` runs blocks ``[start, end)``."""

    peer_id: PeerKey
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise SchedulerConfigError(
                f"hop of {self.peer_id!r} over [{self.start}, {self.end}) is empty or negative"
            )

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Route:
    """Hops covering ``[start, end)`` in order, each starting where the previous ends."""

    hops: tuple[Hop, ...]
    expected_latency_s: float | None = None
    """Per step, for routes from ``route_min_latency``/``replace_span``; None otherwise."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hops", tuple(self.hops))
        if not self.hops:
            raise SchedulerConfigError("a route needs at least one hop")
        for before, after in zip(self.hops, self.hops[1:], strict=False):
            if before.end != after.start:
                raise SchedulerConfigError(
                    f"route hops [{before.start}, {before.end}) and "
                    f"[{after.start}, {after.end}) do not meet"
                )

    @property
    def start(self) -> int:
        return self.hops[0].start

    @property
    def end(self) -> int:
        return self.hops[-1].end

    @property
    def peer_ids(self) -> tuple[PeerKey, ...]:
        return tuple(hop.peer_id for hop in self.hops)

    def __iter__(self) -> Iterator[Hop]:
        return iter(self.hops)

    def __len__(self) -> int:
        return len(self.hops)

    def splice(self, index: int, replacement: Route) -> Route:
        """This route with hop ``index`` replaced by ``replacement``'s hops (which must
        cover exactly that hop's blocks). The expected latency is no longer known."""
        hop = self.hops[index]
        if (replacement.start, replacement.end) != (hop.start, hop.end):
            raise SchedulerConfigError(
                f"replacement covers [{replacement.start}, {replacement.end}) "
                f"but hop {index} covers [{hop.start}, {hop.end})"
            )
        hops = (*self.hops[:index], *replacement.hops, *self.hops[index + 1 :])
        return Route(hops)


def route_min_latency(
    snapshot: SwarmSnapshot,
    client_rtts: Mapping[PeerKey, float] | None = None,
    *,
    banned: Collection[PeerKey] = (),
    num_tokens: int = 1,
    min_cache_tokens: int = 0,
    push: bool = True,
    settings: SchedulerSettings = DEFAULT_SETTINGS,
    weights: Mapping[PeerKey, float] | None = None,
    avoid: Collection[PeerKey] = (),
) -> Route:
    """The chain over all blocks with the least expected latency per step.

    ``client_rtts``: round trips (s) the client measured to servers. ``num_tokens``:
    tokens per step (1 for a generation step, the prompt length for a prefill).
    ``min_cache_tokens``: skip servers announcing less cache room than the session needs.
    ``push``: whether servers push hidden states to the next hop (latency of one pass
    along the chain, using the servers' published round trips) or the client relays
    them (a client round trip per hop); see the module docstring. ``weights`` and
    ``avoid``: the caller's preferences (module docstring); with ``weights`` the
    route's ``expected_latency_s`` is the weighted cost it minimised.
    Raises ``MissingBlocksError`` if some block has no eligible server.
    """
    if num_tokens < 1:
        raise SchedulerConfigError(f"num_tokens={num_tokens} must be >= 1")
    n = snapshot.num_blocks
    servers = _eligible(snapshot, banned, min_cache_tokens, weights, avoid, 0, n)
    return _least_latency(
        snapshot,
        servers,
        0,
        n,
        _Ends(None, None, dict(client_rtts or {})),
        num_tokens,
        settings.default_rtt_s,
        push,
        _penalties(servers, weights),
    )


def route_for_throughput(
    snapshot: SwarmSnapshot,
    rng: random.Random,
    *,
    banned: Collection[PeerKey] = (),
    weights: Mapping[PeerKey, float] | None = None,
    avoid: Collection[PeerKey] = (),
) -> Route:
    """A chain over all blocks drawn to spread load by throughput (batch work).

    At each boundary one of the servers serving the next block is drawn with
    probability proportional to ``throughput * reputation * weights[peer]`` (weight 1
    when absent) and kept to the end of its span; ``avoid``ed servers only where
    nothing else serves. Raises ``MissingBlocksError`` if some block has no eligible
    server.
    """
    n = snapshot.num_blocks
    servers = _eligible(snapshot, banned, 0, weights, avoid, 0, n)
    _check_covered(snapshot, servers, 0, n)
    weight = _weight_of(weights)
    by_block: list[list[ServerInfo]] = [[] for _ in range(n)]
    for server in servers:
        for block in range(server.start, server.end):
            by_block[block].append(server)
    hops: list[Hop] = []
    block = 0
    while block < n:
        candidates = by_block[block]
        chances = [s.throughput * s.reputation * weight(s) for s in candidates]
        chosen = rng.choices(candidates, weights=chances)[0]
        hops.append(Hop(chosen.peer_id, block, chosen.end))
        block = chosen.end
    return Route(tuple(hops))


def replace_span(
    snapshot: SwarmSnapshot,
    route: Route,
    failed_hop: int,
    banned: Collection[PeerKey] = (),
    *,
    client_rtts: Mapping[PeerKey, float] | None = None,
    num_tokens: int = 1,
    min_cache_tokens: int = 0,
    push: bool = True,
    settings: SchedulerSettings = DEFAULT_SETTINGS,
    weights: Mapping[PeerKey, float] | None = None,
    avoid: Collection[PeerKey] = (),
) -> Route:
    """The least-latency sub-route over exactly the blocks of ``route.hops[failed_hop]``.

    It runs from the hop before (or the client) to the hop after (or the client), and
    never uses the failed server or a ``banned`` one; it may use the servers of the
    neighbouring hops (with ``push``, at no cost between a server and itself; without,
    every hop costs a client round trip, as in ``route_min_latency``). Splice it in
    with ``route.splice(failed_hop, sub_route)``. ``weights`` and ``avoid`` as in
    ``route_min_latency``. Raises ``MissingBlocksError`` if no other server serves some
    of those blocks.
    """
    if not 0 <= failed_hop < len(route.hops):
        raise SchedulerConfigError(
            f"failed_hop={failed_hop} is not a hop of this {len(route.hops)}-hop route"
        )
    if num_tokens < 1:
        raise SchedulerConfigError(f"num_tokens={num_tokens} must be >= 1")
    hop = route.hops[failed_hop]
    excluded = {*banned, hop.peer_id}
    servers = _eligible(snapshot, excluded, min_cache_tokens, weights, avoid, hop.start, hop.end)
    before = route.hops[failed_hop - 1].peer_id if failed_hop > 0 else None
    after = route.hops[failed_hop + 1].peer_id if failed_hop + 1 < len(route.hops) else None
    ends = _Ends(
        _known(snapshot, before),
        _known(snapshot, after),
        dict(client_rtts or {}),
    )
    return _least_latency(
        snapshot,
        servers,
        hop.start,
        hop.end,
        ends,
        num_tokens,
        settings.default_rtt_s,
        push,
        _penalties(servers, weights),
    )


def _known(snapshot: SwarmSnapshot, peer_id: PeerKey | None) -> ServerInfo | None:
    """A neighbouring hop's server as the snapshot knows it (None: the client); one the
    snapshot no longer holds has no measured round trips."""
    if peer_id is None:
        return None
    if peer_id in snapshot:
        return snapshot.server(peer_id)
    return ServerInfo(peer_id, 0, 1, 0.0, ServerState.OFFLINE)


def _weight_of(weights: Mapping[PeerKey, float] | None) -> Callable[[ServerInfo], float]:
    """The caller's weight of a server (1 when not given), checked to be a finite w >= 0."""
    given = weights or {}
    for peer, weight in given.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise SchedulerConfigError(f"weight {weight} of {peer!r} is not a finite w >= 0")
    return lambda server: given.get(server.peer_id, 1.0)


def _eligible(
    snapshot: SwarmSnapshot,
    banned: Collection[PeerKey],
    min_cache_tokens: int,
    weights: Mapping[PeerKey, float] | None,
    avoid: Collection[PeerKey],
    start: int,
    end: int,
) -> list[ServerInfo]:
    """The servers a route over ``[start, end)`` may use: online, with throughput,
    reputation and weight above 0, not banned, with the cache room asked; of those in
    ``avoid``, only the ones serving a block of ``[start, end)`` no other one serves,
    cut down to the least part of their span holding all such blocks."""
    excluded = set(banned)
    weight = _weight_of(weights)
    usable = [
        s
        for s in snapshot.servers
        if s.state is ServerState.ONLINE
        and s.throughput > 0
        and s.reputation > 0
        and weight(s) > 0
        and s.peer_id not in excluded
        and (s.cache_tokens_left is None or s.cache_tokens_left >= min_cache_tokens)
    ]
    shunned = set(avoid)
    if not shunned:
        return usable
    preferred = [s for s in usable if s.peer_id not in shunned]
    counts = coverage(snapshot.num_blocks, preferred)
    uncovered = [b for b in range(start, end) if counts[b] == 0]
    needed = []
    for s in (s for s in usable if s.peer_id in shunned):
        blocks = [b for b in uncovered if s.start <= b < s.end]
        if blocks:
            needed.append(replace(s, start=blocks[0], end=blocks[-1] + 1))
    return preferred + needed


def _penalties(servers: list[ServerInfo], weights: Mapping[PeerKey, float] | None) -> list[float]:
    """Per server, what its hops' costs are multiplied by: the heaviest server's weight
    over its own (1 for all without ``weights``)."""
    if not weights or not servers:
        return [1.0] * len(servers)
    weight = _weight_of(weights)
    heaviest = max(weight(s) for s in servers)
    return [heaviest / weight(s) for s in servers]


def _check_covered(
    snapshot: SwarmSnapshot, servers: list[ServerInfo], start: int, end: int
) -> None:
    counts = coverage(snapshot.num_blocks, servers)
    missing = [b for b in range(start, end) if counts[b] == 0]
    if missing:
        raise MissingBlocksError(
            missing, num_blocks=snapshot.num_blocks, excluded=len(snapshot) - len(servers)
        )


@dataclass(frozen=True, slots=True)
class _Ends:
    """Where a chain comes from and goes back to: a server, or None for the client."""

    source: ServerInfo | None
    sink: ServerInfo | None
    client_rtts: dict[PeerKey, float]


def _rtt(
    sender: ServerInfo | None,
    receiver: ServerInfo | None,
    client_rtts: Mapping[PeerKey, float],
    default: float,
) -> float:
    """Round trip between two parties (None: the client); 0 from a server to itself."""
    if sender is None:
        assert receiver is not None
        return client_rtts.get(receiver.peer_id, default)
    if receiver is None:
        return client_rtts.get(sender.peer_id, default)
    if sender.peer_id == receiver.peer_id:
        return 0.0
    measured = sender.rtts.get(receiver.peer_id)
    if measured is None:
        measured = receiver.rtts.get(sender.peer_id)
    return default if measured is None else measured


_SOURCE = -1


def _least_latency(
    snapshot: SwarmSnapshot,
    servers: list[ServerInfo],
    start: int,
    end: int,
    ends: _Ends,
    num_tokens: int,
    default_rtt: float,
    push: bool,
    penalty: list[float],
) -> Route:
    """Exact least-latency chain over ``[start, end)`` (see the module docstring); what
    a hop adds (the link into its server and its compute) is multiplied by ``penalty``."""
    _check_covered(snapshot, servers, start, end)
    if not push:
        return _least_relayed(servers, start, end, ends, num_tokens, default_rtt, penalty)
    position = {s.peer_id: i for i, s in enumerate(servers)}
    compute = [num_tokens / s.throughput * penalty[i] for i, s in enumerate(servers)]
    # Round trips measured between eligible servers, by receiver then sender.
    known_in: list[dict[int, float]] = [{} for _ in servers]
    for i, server in enumerate(servers):
        for peer, rtt in server.rtts.items():
            j = position.get(peer)
            if j is not None and j != i:
                known_in[j][i] = rtt / 2
    for i, server in enumerate(servers):
        for peer, rtt in server.rtts.items():
            j = position.get(peer)
            if j is not None and j != i:
                known_in[i].setdefault(j, rtt / 2)
    for i, links in enumerate(known_in):
        for j in links:
            links[j] *= penalty[i]
    covering = _covering(servers, start, end)
    # With push, a link is crossed one way: half its round trip.
    from_source = [
        _rtt(ends.source, s, ends.client_rtts, default_rtt) / 2 * penalty[i]
        for i, s in enumerate(servers)
    ]
    # arrived[k][i] = (cost, hop start, previous server) once server i has run block
    # start + k - 1 as the last block so far; the source "arrives" at the start.
    arrived: list[dict[int, tuple[float, int, int]]] = [{_SOURCE: (0.0, start, _SOURCE)}]
    for k, block_servers in enumerate(covering):
        here = arrived[k]
        ranked = sorted((cost, i) for i, (cost, _, _) in here.items())
        step: dict[int, tuple[float, int, int]] = {}
        for i in block_servers:
            best = here.get(i)
            for cost, prev in ranked:
                if prev == i or prev in known_in[i]:
                    continue
                link = from_source[i] if prev == _SOURCE else default_rtt / 2 * penalty[i]
                candidate = (cost + link, start + k, prev)
                if prev != _SOURCE:
                    if best is None or candidate[0] < best[0]:
                        best = candidate
                    break
                if best is None or candidate[0] < best[0]:
                    best = candidate
            for prev, rtt in known_in[i].items():
                entry = here.get(prev)
                if entry is not None and (best is None or entry[0] + rtt < best[0]):
                    best = (entry[0] + rtt, start + k, prev)
            assert best is not None
            step[i] = (best[0] + compute[i], best[1], best[2])
        arrived.append(step)
    final = arrived[-1]
    total, last = min(
        (cost + _rtt(servers[i], ends.sink, ends.client_rtts, default_rtt) / 2, i)
        for i, (cost, _, _) in final.items()
    )
    return _backtrack(servers, arrived, start, end, last, total)


def _least_relayed(
    servers: list[ServerInfo],
    start: int,
    end: int,
    ends: _Ends,
    num_tokens: int,
    default_rtt: float,
    penalty: list[float],
) -> Route:
    """Least-latency chain when the client relays: each hop costs its client round trip
    (both that and its compute multiplied by the server's ``penalty``)."""
    compute = [num_tokens / s.throughput * penalty[i] for i, s in enumerate(servers)]
    enter = [
        _rtt(None, s, ends.client_rtts, default_rtt) * penalty[i] for i, s in enumerate(servers)
    ]
    covering = _covering(servers, start, end)
    arrived: list[dict[int, tuple[float, int, int]]] = [{_SOURCE: (0.0, start, _SOURCE)}]
    for k in range(end - start):
        here = arrived[k]
        ranked = sorted((cost, i) for i, (cost, _, _) in here.items())
        step: dict[int, tuple[float, int, int]] = {}
        for i in covering[k]:
            best = here.get(i)
            other = next(((c, p) for c, p in ranked if p != i), None)
            if other is not None and (best is None or other[0] + enter[i] < best[0]):
                best = (other[0] + enter[i], start + k, other[1])
            assert best is not None
            step[i] = (best[0] + compute[i], best[1], best[2])
        arrived.append(step)
    total, last = min((cost, i) for i, (cost, _, _) in arrived[-1].items())
    return _backtrack(servers, arrived, start, end, last, total)


def _covering(servers: list[ServerInfo], start: int, end: int) -> list[list[int]]:
    """For each block of ``[start, end)``, the indices of the servers serving it."""
    covering: list[list[int]] = [[] for _ in range(end - start)]
    for i, server in enumerate(servers):
        for block in range(max(server.start, start), min(server.end, end)):
            covering[block - start].append(i)
    return covering


def _backtrack(
    servers: list[ServerInfo],
    arrived: list[dict[int, tuple[float, int, int]]],
    start: int,
    end: int,
    last: int,
    total: float,
) -> Route:
    """The route the dynamic programme's states lead back to from ``last`` at ``end``."""
    hops: list[Hop] = []
    boundary, current = end, last
    while current != _SOURCE:
        _, hop_start, prev = arrived[boundary - start][current]
        hops.append(Hop(servers[current].peer_id, hop_start, boundary))
        boundary, current = hop_start, prev
    hops.reverse()
    return Route(tuple(hops), expected_latency_s=total)
