"""The scheduler package's one exception tree.

    SchedulerError
    ├── MissingBlocksError    no chain of eligible servers covers the requested blocks
    ├── UnknownServer         a peer id the snapshot does not hold
    ├── InvalidSnapshot       a ServerInfo or SwarmSnapshot holds impossible data
    └── SchedulerConfigError  a setting or an argument holds an impossible value

Every error here is local: the scheduler never talks to a peer. A peer that announces
nonsense is caught by ``InvalidSnapshot`` when its record is turned into a ``ServerInfo``.
"""

from __future__ import annotations

from collections.abc import Iterable


class SchedulerError(Exception):
    """Root of every error raised by :mod:`scheduler`."""


def _ranges(blocks: Iterable[int]) -> str:
    """``[0, 1, 2, 7, 9, 10]`` as ``"0-2, 7, 9-10"``."""
    parts: list[str] = []
    run: list[int] = []
    for block in sorted(blocks):
        if run and block == run[-1] + 1:
            run.append(block)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [block]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts)


class MissingBlocksError(SchedulerError):
    """No online, unbanned server with throughput serves some of the requested blocks.

    ``blocks`` lists them in order; the route cannot exist until a server serves them
    (wait for servers to join, or unban some).
    """

    def __init__(self, blocks: Iterable[int], *, num_blocks: int, excluded: int = 0) -> None:
        self.blocks = tuple(sorted(set(blocks)))
        self.num_blocks = num_blocks
        self.excluded = excluded
        detail = f" ({excluded} server(s) excluded as banned or ineligible)" if excluded else ""
        super().__init__(
            f"no eligible server serves block(s) {_ranges(self.blocks)} "
            f"of {num_blocks}{detail}: wait for servers to join or unban some"
        )


class UnknownServer(SchedulerError, KeyError):
    """The snapshot holds no server with this peer id."""

    def __init__(self, peer_id: str | bytes) -> None:
        self.peer_id = peer_id
        super().__init__(peer_id)

    def __str__(self) -> str:
        return f"the snapshot holds no server {self.peer_id!r}"


class InvalidSnapshot(SchedulerError, ValueError):
    """A ``ServerInfo`` or ``SwarmSnapshot`` field is out of range (a bad announcement)."""


class SchedulerConfigError(SchedulerError, ValueError):
    """``SchedulerSettings`` or an argument holds an impossible value (a bug in the caller)."""
