"""Which blocks a joining server takes (``join --blocks auto``).

The swarm is as fast as its weakest block, so a new server goes where it raises the
weakest per-block throughput the most. Ties are frequent (every window that misses the
weakest block leaves the minimum where it is), so the choice is *leximin*: among the
windows, take the one whose resulting per-block throughputs, sorted ascending, are the
largest lexicographically: first the minimum, then the second-weakest block, and so on.
A server of unknown throughput (0) changes nothing that way; it takes the neediest
window (smallest sorted throughputs inside it). Remaining ties go to the lowest start.
Online and joining servers count: a joining server's blocks are taken.

Two servers that choose at the same moment see the same swarm and would take the same
blocks. Each announces its choice as joining, waits a little, reads the swarm again and
judges its choice in ``concurrent_view``: of the servers whose span changed meanwhile
(they chose at the same moment), those ranking after it by ``peer_order`` are shown as
they were, the others as they are now. The server of the lowest peer id thus keeps its
choice, and every other one, seeing it, chooses again: no two take a gap blindly, and
no two both give it up.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from ._errors import SchedulerConfigError
from ._model import PeerKey, SwarmSnapshot, capacity_units, is_active, peer_order, to_units

_INF = math.inf


def choose_span(
    snapshot: SwarmSnapshot, num_blocks_to_serve: int, throughput: float
) -> tuple[int, int]:
    """The span ``(start, end)`` of ``num_blocks_to_serve`` blocks a new server should take.

    ``throughput`` is the new server's, in block-tokens per second. The snapshot should
    not hold the new server itself (``snapshot.without(me)`` if it may). A server that can
    hold every block gets ``(0, num_blocks)``.
    """
    if isinstance(num_blocks_to_serve, bool) or num_blocks_to_serve < 1:
        raise SchedulerConfigError(f"num_blocks_to_serve={num_blocks_to_serve!r} must be >= 1")
    if not throughput >= 0:
        raise SchedulerConfigError(f"throughput={throughput!r} must be >= 0")
    n = snapshot.num_blocks
    length = min(num_blocks_to_serve, n)
    caps = capacity_units(n, (s for s in snapshot.servers if is_active(s)))
    start = best_start(caps, length, to_units(throughput))
    return start, start + length


def best_start(caps: Sequence[int], length: int, throughput: int) -> int:
    """The leximin-best start of a ``length``-block window adding ``throughput``.

    The resulting minimum of every window comes from prefix and suffix minima; only the
    windows that reach the best minimum are compared in full.
    """
    n = len(caps)
    prefix = [*itertools.accumulate(caps, min, initial=_INF)]
    suffix = [*reversed([*itertools.accumulate(reversed(caps), min, initial=_INF)])]
    lows = [
        min(prefix[s], suffix[s + length], min(caps[s : s + length]) + throughput)
        for s in range(n - length + 1)
    ]
    top = max(lows)
    best = -1
    best_key: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    for start, low in enumerate(lows):
        if low != top:
            continue
        inside = caps[start : start + length]
        after = [*caps[:start], *(c + throughput for c in inside), *caps[start + length :]]
        key = (tuple(sorted(after)), tuple(-c for c in sorted(inside)))
        if best < 0 or key > best_key:
            best, best_key = start, key
    return best


def concurrent_view(snapshot: SwarmSnapshot, earlier: SwarmSnapshot, me: PeerKey) -> SwarmSnapshot:
    """``snapshot`` as server ``me`` judges a choice it made from ``earlier``.

    A server (other than ``me``) whose span in ``snapshot`` differs from its span in
    ``earlier``, or that ``earlier`` did not hold, chose at the same moment as ``me``. If
    it ranks after ``me`` (``peer_order``) it yields: the view shows it as ``earlier`` did
    (or not at all). Every other server is shown as in ``snapshot``, ``me`` included.
    """
    mine = peer_order(me)
    servers = []
    for server in snapshot.servers:
        before = earlier.server(server.peer_id) if server.peer_id in earlier else None
        moved = before is None or (before.start, before.end) != (server.start, server.end)
        if server.peer_id == me or not moved or peer_order(server.peer_id) < mine:
            servers.append(server)
        elif before is not None:
            servers.append(before)
    return SwarmSnapshot(snapshot.num_blocks, tuple(servers))
