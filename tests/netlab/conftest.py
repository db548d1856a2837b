"""Fixtures of the network lab: ``lab`` (namespaces, deleted after the test) and ``spawn``
(peer processes run inside them, killed after the test).

Tests marked ``netns`` are skipped, with the reason, where the lab cannot be built.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.netlab._lab import Lab, Node, unavailable_reason
from tests.netlab._peers import PeerProcess, start_peer

_REASON = unavailable_reason()

Spawn = Callable[..., Awaitable[PeerProcess]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=f"network lab unavailable: {_REASON}")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
async def spawn(lab: Lab) -> AsyncIterator[Spawn]:
    """``await spawn(node, *args)``: a peer process in ``node``'s namespace, ready."""
    peers: list[PeerProcess] = []

    async def start(node: Node, *args: str) -> PeerProcess:
        peer = await start_peer(node, *args)
        peers.append(peer)
        return peer

    yield start
    for peer in reversed(peers):
        await peer.kill()
