"""A node's reputation book (``swarm._peer.start_peer(reputation_file=...)``) hears its
DHT's request outcomes, ranks its routing table, and is kept across restarts (real
Hosts on loopback TCP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dht import DHT
from p2p import Host
from security import KeyPair, ReputationBook
from swarm._peer import reputation_book, start_peer, stop_peer

TCP_LOOPBACK = "/ip4/127.0.0.1/tcp/0"
POW_BITS = 4


async def node(bootstrap: list[str], book_file: Path | None = None) -> tuple[Host, DHT]:
    return await start_peer(
        KeyPair.generate(),
        [TCP_LOOPBACK],
        bootstrap,
        server_mode=True,
        pow_bits=POW_BITS,
        reputation_file=book_file,
    )


@pytest.mark.timeout(60)
async def test_the_node_book_scores_dht_answers_and_is_kept_across_restarts(
    tmp_path: Path,
) -> None:
    book_file = tmp_path / "cache" / "reputation.msgpack"
    first_host, first_dht = await node([])
    try:
        host, dht = await node([str(first_host.addrs[0])], book_file)
        book = reputation_book(host)
        assert book is not None
        assert dht.routing_table.score == book.contact_score
        answered = book.score(first_host.peer_id)
        assert answered > 0  # every DHT answer of the bootstrap peer was a success
        assert book.contact_score(first_host.peer_id) > 0.5

        await stop_peer(host, dht)
        assert reputation_book(host) is None
        kept = ReputationBook.load(book_file)
        assert kept.score(first_host.peer_id) == pytest.approx(answered, rel=1e-3)

        host, dht = await node([str(first_host.addrs[0])], book_file)
        again = reputation_book(host)
        assert again is not None
        assert again.score(first_host.peer_id) > answered  # loaded, then more answers
        await stop_peer(host, dht)
    finally:
        await stop_peer(first_host, first_dht)
