"""Routing consults the client's reputation book (``RemoteChain(book=...)``), on real
in-process servers over loopback TCP.

Blocks [0, 2) and [2, 4) of a tiny Llama are served by in-process servers, all
announcing one throughput. The book decides: a peer it bans gets no call; a peer on
probation gets at most ``probation_share`` of the client's traffic (block-units) while
established peers can take it, yet carries every call for a span it alone serves; a
low-score peer gets fewer calls than a high-score one (and no least-latency route);
and what ``RemoteChain`` sees of servers (answers, failures, bans) moves their scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._client_chain import Hop, RemoteChain
from model_shards._dtypes import DTYPES
from model_shards._errors import ShardError
from model_shards._server_node import ServerNode
from p2p import P2PError
from scheduler import MissingBlocksError
from security import Event, PeerId, ReputationBook
from tests.model_shards.test_batch_routing import count_forwards
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import LocalSwarm, private_copy

THROUGHPUT = 1000.0


@pytest.fixture
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    made = LocalSwarm(tmp_path_factory.mktemp("reputation-routing"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def model_path(swarm: LocalSwarm, tiny: Callable[[str], TinyModel]) -> TinyModel:
    return private_copy(tiny("llama"), swarm.cache_dir)


def serve(swarm: LocalSwarm, tm: TinyModel, start: int, end: int) -> ServerNode:
    node = swarm.serve(tm.path, start, end, rebalance=False)
    swarm.announce_throughput(node, THROUGHPUT)
    return node


def peer_of(node: ServerNode) -> PeerId:
    return node.host.peer_id


def established(book: ReputationBook, *nodes: ServerNode) -> None:
    for node in nodes:
        for _ in range(book.settings.probation_checks):
            book.record(peer_of(node), Event.CHECK_PASSED)


def client(tm: TinyModel, swarm: LocalSwarm, book: ReputationBook) -> DistributedModelForCausalLM:
    """A client whose chain consults ``book`` (spot-checks off: only routing is judged)."""
    model = DistributedModelForCausalLM.from_pretrained(
        tm.path, initial_peers=[swarm.addr], spot_check_rate=0
    )
    chain = model.chain
    model.chain = RemoteChain(
        chain.host, chain.dht, chain.model_id, chain.num_blocks, rng=random.Random(7), book=book
    )
    return model


def run_forwards(model: DistributedModelForCausalLM, tm: TinyModel, count: int) -> None:
    ids = prompts(1, 5, seed=3)
    expected = tm.model(ids).logits
    for _ in range(count):
        with torch.no_grad():
            logits = model(ids).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(90)
def test_a_peer_the_book_bans_is_never_routed(swarm: LocalSwarm, model_path: TinyModel) -> None:
    tm = model_path
    serve(swarm, tm, 0, 2)
    shunned, kept = serve(swarm, tm, 2, 4), serve(swarm, tm, 2, 4)
    counts = {node: count_forwards(swarm, node) for node in (shunned, kept)}
    book = ReputationBook()
    book.ban(peer_of(shunned), 3600.0)
    with client(tm, swarm, book) as model:
        run_forwards(model, tm, 30)
        route = model.client.run(model.chain.route())
        assert peer_of(shunned) not in {hop.peer_id for hop in route}
        assert model.chain.is_banned(peer_of(shunned))
    assert counts[shunned][0] == 0
    assert counts[kept][0] == 30


@pytest.mark.timeout(120)
def test_a_peer_on_probation_gets_at_most_its_share_of_batch_traffic(
    swarm: LocalSwarm, model_path: TinyModel
) -> None:
    tm = model_path
    first = serve(swarm, tm, 0, 2)
    veteran, newcomer = serve(swarm, tm, 2, 4), serve(swarm, tm, 2, 4)
    counts = {node: count_forwards(swarm, node) for node in (veteran, newcomer)}
    book = ReputationBook()
    established(book, first, veteran)
    forwards = 120
    with client(tm, swarm, book) as model:
        run_forwards(model, tm, forwards)
    # a forward is 4 blocks of traffic; the newcomer's calls are 2 blocks each
    share = counts[newcomer][0] * 2 / (forwards * 4)
    cap = book.settings.probation_share
    print(f"newcomer: {counts[newcomer][0]} of {forwards} calls, {share:.3f} of the traffic")
    assert counts[veteran][0] + counts[newcomer][0] == forwards
    assert share <= cap + 0.02
    assert counts[newcomer][0] > 0  # capped, not shut out
    assert book.probation_traffic_share() <= cap + 0.02


@pytest.mark.timeout(90)
def test_a_peer_on_probation_carries_a_span_it_alone_serves(
    swarm: LocalSwarm, model_path: TinyModel
) -> None:
    tm = model_path
    alone = serve(swarm, tm, 0, 2)
    veteran = serve(swarm, tm, 2, 4)
    counts = {node: count_forwards(swarm, node) for node in (alone, veteran)}
    book = ReputationBook()
    established(book, veteran)
    with client(tm, swarm, book) as model:
        run_forwards(model, tm, 20)
        route = model.client.run(model.chain.route())
        assert [hop.peer_id for hop in route] == [peer_of(alone), peer_of(veteran)]
    assert book.on_probation(peer_of(alone))
    assert book.probation_traffic_share() > book.settings.probation_share
    assert counts[alone][0] == counts[veteran][0] == 20


@pytest.mark.timeout(90)
def test_a_low_score_peer_is_routed_less_than_a_high_score_one(
    swarm: LocalSwarm, model_path: TinyModel
) -> None:
    tm = model_path
    serve(swarm, tm, 0, 2)
    trusted, doubted = serve(swarm, tm, 2, 4), serve(swarm, tm, 2, 4)
    counts = {node: count_forwards(swarm, node) for node in (trusted, doubted)}
    book = ReputationBook()
    for _ in range(20):
        book.record(peer_of(trusted), Event.SUCCESS)
    for _ in range(9):  # -18: not banned (ban_below is -20), but hardly trusted
        book.record(peer_of(doubted), Event.FAILURE)
    forwards = 60
    with client(tm, swarm, book) as model:
        for _ in range(3):
            route = model.client.run(model.chain.route())
            assert route[-1].peer_id == peer_of(trusted)
        run_forwards(model, tm, forwards)
    print(f"calls: trusted {counts[trusted][0]}, doubted {counts[doubted][0]}")
    assert counts[trusted][0] + counts[doubted][0] == forwards
    assert counts[doubted][0] < counts[trusted][0] / 4


@pytest.mark.timeout(90)
def test_what_the_chain_sees_of_a_server_moves_its_score(
    swarm: LocalSwarm, model_path: TinyModel
) -> None:
    tm = model_path
    serve(swarm, tm, 0, 2)
    steady, leaving = serve(swarm, tm, 2, 4), serve(swarm, tm, 2, 4)
    book = ReputationBook()
    with client(tm, swarm, book) as model:
        chain = model.chain
        run_forwards(model, tm, 10)
        # every call answered is a success: ten forwards, two hops each
        scores = {node: book.score(peer_of(node)) for node in (steady, leaving)}
        assert sum(scores.values()) + book.score(chain_first(model)) == pytest.approx(20, abs=0.01)

        hidden = torch.randn(1, 3, tm.model.config.hidden_size)
        record = chain.record(peer_of(leaving))
        assert record is not None
        target = Hop(peer_of(leaving), 2, 4, DTYPES[record.dtype])
        swarm.stop(leaving)
        with pytest.raises((P2PError, ShardError)):
            model.client.run(chain.forward_on(target, hidden))
        after_failure = book.score(peer_of(leaving))
        assert after_failure == pytest.approx(scores[leaving] - 2, abs=0.01)  # a FAILURE

        chain.ban(peer_of(steady), soft=True)  # it only missed a deadline: a TIMEOUT
        assert book.score(peer_of(steady)) == pytest.approx(scores[steady] - 1, abs=0.01)
        chain.ban(peer_of(leaving))  # a hard ban: a FAILURE
        assert book.score(peer_of(leaving)) == pytest.approx(after_failure - 2, abs=0.01)


def chain_first(model: DistributedModelForCausalLM) -> PeerId:
    """The server of blocks [0, 2) (the only one)."""
    servers = model.client.run(model.chain.servers())
    (first,) = [peer for peer, record in servers.items() if record.start == 0]
    return first


@pytest.mark.timeout(90)
def test_a_peer_banned_for_failures_alone_still_serves_blocks_nobody_else_does(
    swarm: LocalSwarm, model_path: TinyModel
) -> None:
    """Unreliable is not dishonest: a loaded server the book banned for its failures stays
    the last resort for its blocks; one caught computing wrong is never routed."""
    tm = model_path
    flaky = serve(swarm, tm, 0, 2)
    serve(swarm, tm, 2, 4)
    book = ReputationBook()
    for _ in range(12):  # -24: below ban_below (-20)
        book.record(peer_of(flaky), Event.FAILURE)
    assert book.is_banned(peer_of(flaky))
    with client(tm, swarm, book) as model:
        run_forwards(model, tm, 3)
        assert peer_of(flaky) in {hop.peer_id for hop in model.client.run(model.chain.route())}
        book.record(peer_of(flaky), Event.CHECK_FAILED)
        with pytest.raises(MissingBlocksError, match="0"):
            model.client.run(model.chain.route())
