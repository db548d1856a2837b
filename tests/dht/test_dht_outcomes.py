"""The DHT's ``on_outcome`` hook hears how each request to a peer ends, on real Hosts
(memory transport): answers, silences past ``rpc_timeout_s``, malformed answers,
unreachable peers; wired to a ``ReputationBook``, the failures bring the peer's
``contact_score`` down until the routing table refuses it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from dht import DHT, PROTOCOL_ID, Contact, DhtLimits, NotBootstrapped
from dht._routing import Admission
from p2p import Host, RpcContext
from security import KeyPair, PeerId, ReputationBook
from tests.dht.dht_helpers import Cluster
from transport import MemoryTransport, Multiaddr

LIMITS = dataclasses.replace(DhtLimits(), rpc_timeout_s=0.3)


class Heard:
    """Records every ``on_outcome`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[PeerId, bool, bool]] = []

    def __call__(self, peer: PeerId, ok: bool, timed_out: bool) -> None:
        self.calls.append((peer, ok, timed_out))

    def of(self, peer: PeerId) -> list[tuple[bool, bool]]:
        return [(ok, timed_out) for who, ok, timed_out in self.calls if who == peer]


async def listening(cluster: Cluster, identity: KeyPair | None = None) -> Host:
    identity = identity or KeyPair.generate()
    host = Host(identity, [MemoryTransport(identity, hub=cluster.hub)])
    await host.start([Multiaddr.for_memory("0")])
    return host


async def hearing_node(cluster: Cluster, on_outcome: Any, **kwargs: Any) -> DHT:
    """A DHT node on the cluster's hub whose outcomes go to ``on_outcome`` (not started)."""
    host = await listening(cluster)
    node = DHT(host, LIMITS, on_outcome=on_outcome, **kwargs)
    cluster.nodes.append(node)
    return node


async def rogue(cluster: Cluster, answer: Any) -> Host:
    """A Host answering every DHT request with ``answer()`` (awaited)."""
    host = await listening(cluster)

    async def handler(ctx: RpcContext, request: Any, payload: memoryview | None) -> Any:
        return await answer()

    host.add_rpc_handler(PROTOCOL_ID, handler)
    return host


@pytest.mark.timeout(30)
async def test_answers_are_heard_as_successes(cluster: Cluster) -> None:
    first = await cluster.add()
    heard = Heard()
    node = await hearing_node(cluster, heard)
    await node.start([first.host.addrs[0]])
    assert heard.of(first.peer_id)
    assert all(outcome == (True, False) for outcome in heard.of(first.peer_id))


@pytest.mark.timeout(30)
async def test_a_silent_peer_is_heard_as_a_timeout(cluster: Cluster) -> None:
    async def never() -> Any:
        await asyncio.sleep(30)

    silent = await rogue(cluster, never)
    heard = Heard()
    node = await hearing_node(cluster, heard)
    try:
        with pytest.raises(NotBootstrapped):
            await node.start([silent.addrs[0]])
        assert heard.of(silent.peer_id) == [(False, True)]
    finally:
        await silent.stop()


@pytest.mark.timeout(30)
async def test_a_malformed_answer_and_an_unreachable_peer_are_failures(cluster: Cluster) -> None:
    async def garbage() -> Any:
        return {"nonsense": 1}

    liar = await rogue(cluster, garbage)
    gone = await listening(cluster)
    gone_addr = gone.addrs[0]
    await gone.stop()
    heard = Heard()
    node = await hearing_node(cluster, heard)
    try:
        with pytest.raises(NotBootstrapped):
            await node.start([liar.addrs[0]])
        assert heard.of(liar.peer_id) == [(False, False)]
        with pytest.raises(NotBootstrapped):
            await node.bootstrap([gone_addr])
        # bootstrap dials first: a dial that fails sends no request, and judges nobody
        assert heard.of(gone.peer_id) == []
    finally:
        await liar.stop()


@pytest.mark.timeout(60)
async def test_a_book_fed_by_the_hook_scores_the_peer_the_table_keeps(cluster: Cluster) -> None:
    """Wired as ``swarm.start_peer`` wires it: answers raise the peer's contact score,
    requests to a vanished peer are failures that lower it, and once the book bans the
    peer the routing table refuses it."""
    first = await cluster.add()
    book = ReputationBook()
    heard = Heard()

    def outcome(peer: PeerId, ok: bool, timed_out: bool) -> None:
        heard(peer, ok, timed_out)
        book.record_outcome(peer, ok, timed_out)

    node = await hearing_node(cluster, outcome, score=book.contact_score)
    await node.start([first.host.addrs[0]])
    assert first.peer_id in node.routing_table
    answered = book.score(first.peer_id)
    assert answered == pytest.approx(len(heard.of(first.peer_id)))  # one success each
    assert answered > 0
    assert book.contact_score(first.peer_id) > 0.5

    await cluster.kill(first)
    await node.get(b"anything")
    failures = heard.of(first.peer_id)[-1:]
    assert failures == [(False, False)]  # not reachable: a failure, not a timeout
    assert book.score(first.peer_id) < answered

    book.ban(first.peer_id, 60.0)
    contact = Contact(first.peer_id, (), None)
    assert node.routing_table.update(contact, 0.0).admission is Admission.REJECTED
    assert first.peer_id not in node.routing_table
