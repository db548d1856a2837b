"""Errors of the distributed client's failover (part of the package's ``ShardError`` tree).

    ShardError
    ├── FailoverFailed      a chain's server failed and no replacement for its blocks worked
    ├── CaughtCheating      a spot-check outvoted a server's step (why its hop failed over)
    ├── PeerBanned          a one-server call to a server this client banned
    └── RewindsExhausted    servers caught cheating sent one ``generate`` back too often

When no server at all serves some blocks any more (for ``ClientLimits.failover_wait_s``),
the client raises ``scheduler.MissingBlocksError`` instead, naming the blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import ShardError

if TYPE_CHECKING:
    from security import PeerId

    from ._client_session import Rewind
    from ._spotcheck import SpotCheck


class FailoverFailed(ShardError):
    """A server of an inference chain failed and no replacement for its blocks worked,
    after ``ClientLimits.max_failovers`` attempts (``__cause__``: the last failure)."""

    code = "failover_failed"

    def __init__(self, start: int, end: int, attempts: int, last: BaseException) -> None:
        super().__init__(
            f"blocks [{start}, {end}) lost their server and {attempts} replacement attempt(s) "
            f"failed, the last with {type(last).__name__}: {last}; the swarm may be too busy "
            "or too small: retry later, or raise ClientLimits.max_failovers"
        )
        self.start = start
        self.end = end
        self.attempts = attempts


class CaughtCheating(ShardError):
    """Two independent servers agreed against a server's step (a spot-check); the client
    used their output, banned the server and failed its blocks over (the ``cause`` of
    that ``Failover``)."""

    code = "caught_cheating"

    def __init__(self, peer: PeerId, check: SpotCheck) -> None:
        majority = ", ".join(p.short() for p in check.majority)
        super().__init__(
            f"{peer.short()} was caught cheating on blocks: {majority} agree against it "
            f"({check.reason})"
        )
        self.peer = peer
        self.check = check


class PeerBanned(ShardError):
    """``RemoteChain.forward_on`` was asked to use a server the client banned (it failed,
    was slow, or cheated, within ``ClientLimits.ban_s``): nothing was sent; ask another."""

    code = "peer_banned"


class RewindsExhausted(ShardError):
    """Servers caught cheating sent one ``generate`` call back more than
    ``ClientLimits.max_rewinds`` times (``__cause__``: the last rewind)."""

    code = "rewinds_exhausted"

    def __init__(self, limit: int, rewind: Rewind) -> None:
        super().__init__(
            f"generation rewound {limit} time(s) already and {rewind.check.checked.short()} "
            f"was caught cheating again (position {rewind.position}): too many cheating "
            "servers on this route; retry, or raise ClientLimits.max_rewinds"
        )
        self.limit = limit
        self.rewind = rewind
