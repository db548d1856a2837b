"""Joining the swarm through a list of known addresses, retrying with exponential backoff.

Every address is dialed at once; an address that fails is retried after
``backoff_s``, then twice that, and so on up to ``max_backoff_s``, ``retries`` times.
Joining succeeds when at least one address works; the result says which failed and why.
``sleep`` is an argument so that tests run the schedule without waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from security import PeerId
from transport._multiaddr import Multiaddr

from ._errors import BootstrapError, P2PError


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    """Who was joined, and each address that failed with its last error."""

    joined: tuple[tuple[Multiaddr, PeerId], ...]
    failures: tuple[tuple[Multiaddr, P2PError], ...]


def backoff_delays(retries: int, backoff_s: float, max_backoff_s: float) -> list[float]:
    """The waits before each retry: ``backoff_s`` doubling, capped at ``max_backoff_s``."""
    return [min(backoff_s * 2**attempt, max_backoff_s) for attempt in range(retries)]


async def bootstrap(
    connect: Callable[[Multiaddr], Awaitable[PeerId]],
    addrs: Sequence[Multiaddr],
    *,
    delays: Sequence[float],
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> BootstrapResult:
    """Connect to every address, retrying after each of ``delays``.

    Raises ``BootstrapError`` (listing every address with its last error) when none
    could be joined.
    """

    if not addrs:
        raise ValueError("bootstrap needs at least one address")

    async def join(addr: Multiaddr) -> PeerId | P2PError:
        for delay in delays:
            try:
                return await connect(addr)
            except P2PError:
                await sleep(delay)
        try:
            return await connect(addr)
        except P2PError as exc:
            return exc

    outcomes = await asyncio.gather(*(join(addr) for addr in addrs))
    joined = tuple(
        (addr, outcome)
        for addr, outcome in zip(addrs, outcomes, strict=True)
        if isinstance(outcome, PeerId)
    )
    failures = tuple(
        (addr, outcome)
        for addr, outcome in zip(addrs, outcomes, strict=True)
        if isinstance(outcome, P2PError)
    )
    if not joined:
        raise BootstrapError(failures)
    return BootstrapResult(joined, failures)
