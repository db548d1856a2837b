"""Trust in the nodes ``python -m swarm`` runs: the kept identity proof, the reputation
book saved at a graceful stop, and ``--pow-bits`` as a swarm setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dht import NotBootstrapped
from security import IdentityProof, KeyPair, ReputationBook, proof_bits, solve_pow
from swarm._peer import REPUTATION_FILE, load_proof, save_proof, start_peer, stop_peer
from swarm._procs import NodeProcess
from tests.swarm.harness import ProcessSwarm

TCP = "/ip4/127.0.0.1/tcp/0"
HIGH = 16
LOW = 4


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[ProcessSwarm]:
    made = ProcessSwarm(tmp_path)
    yield made
    made.close()


def weak_key(path: Path, bits: int, below: int) -> KeyPair:
    """A key file whose first proof of ``bits`` bits (the one a node solves) has fewer than
    ``below`` bits, so that a node asking for ``below`` refuses it for sure."""
    while True:
        path.unlink(missing_ok=True)
        key = KeyPair.load_or_create(path)
        public_key = key.peer_id.public_key()
        if solve_pow(public_key, bits).difficulty(public_key) < below:
            return key


def exit_code(node: NodeProcess, timeout: float = 30) -> int:
    code = node.popen.wait(timeout)
    node.kill()
    return code


def bootstrap_args(key: Path, bits: int, cache: Path, *more: str) -> list[str]:
    args = ["bootstrap", "--listen", TCP, "--identity", str(key), "--pow-bits", str(bits)]
    return [*args, "--cache-dir", str(cache), *more]


@pytest.mark.timeout(60)
def test_a_restart_reuses_the_kept_proof_and_reputation_is_saved_at_stop(
    nodes: ProcessSwarm, tmp_path: Path
) -> None:
    key, cache = tmp_path / "node.key", tmp_path / "cache"
    proof_file, book_file = tmp_path / "node.key.pow", cache / REPUTATION_FILE
    args = bootstrap_args(key, HIGH, cache)

    first = nodes.start("first", args)
    first.addr(30)
    assert proof_file.is_file() and not book_file.exists()
    assert first.stop() == 0 and first.lines[-1] == "offline"
    log = (tmp_path / "first.log").read_text()
    assert f"solving an identity proof-of-work of {HIGH} bits" in log
    assert proof_file.stat().st_mode & 0o777 == 0o600
    public_key = KeyPair.load_or_create(key).peer_id.public_key()
    kept = proof_file.read_bytes()
    assert IdentityProof(bytes.fromhex(kept.decode())).difficulty(public_key) >= HIGH
    assert book_file.is_file() and book_file.stat().st_mode & 0o777 == 0o600
    ReputationBook.load(book_file)
    written = proof_file.stat().st_mtime_ns

    second = nodes.start("second", args)
    second.addr(30)
    assert second.stop() == 0
    log = (tmp_path / "second.log").read_text()
    assert "solving an identity proof-of-work" not in log
    assert f"identity proof-of-work reused from {proof_file}" in log
    assert proof_file.read_bytes() == kept and proof_file.stat().st_mtime_ns == written


@pytest.mark.timeout(60)
def test_nodes_with_different_pow_bits_do_not_form_one_dht(
    nodes: ProcessSwarm, tmp_path: Path
) -> None:
    for name in ("low", "joins-high"):
        weak_key(tmp_path / f"{name}.key", LOW, HIGH)
    high = nodes.start("high", bootstrap_args(tmp_path / "high.key", HIGH, tmp_path / "h"))
    low = nodes.start("low", bootstrap_args(tmp_path / "low.key", LOW, tmp_path / "l"))
    high_addr, low_addr = high.addr(30), low.addr(30)

    weaker = bootstrap_args(
        tmp_path / "joins-high.key", LOW, tmp_path / "w", "--bootstrap", high_addr
    )
    stronger = bootstrap_args(
        tmp_path / "joins-low.key", HIGH, tmp_path / "s", "--bootstrap", low_addr
    )
    joins_high = nodes.start("joins-high", weaker)
    joins_low = nodes.start("joins-low", stronger)
    assert exit_code(joins_high) == 1 and exit_code(joins_low) == 1
    refused = (tmp_path / "joins-high.log").read_text()
    assert (
        "refused (INSUFFICIENT_POW)" in refused
        and f"requires DhtLimits.pow_difficulty={HIGH}" in refused
    )
    assert f"Every node of a swarm must use the same --pow-bits: this node uses {LOW}" in refused
    refusing = (tmp_path / "joins-low.log").read_text()
    assert "refused (INSUFFICIENT_POW)" in refusing and "answered with an identity" in refusing
    assert f"DhtLimits.pow_difficulty={HIGH} is required" in refusing
    assert f"this node uses {HIGH}" in refusing
    assert high.stop() == 0 and low.stop() == 0


@pytest.mark.timeout(20)
def test_a_stale_or_damaged_proof_is_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "node.key.pow"
    key = weak_key(tmp_path / "node.key", 4, 8)
    public_key = key.peer_id.public_key()
    weak = solve_pow(public_key, 4)
    assert load_proof(path, key, 4) is None
    save_proof(path, weak)
    assert load_proof(path, key, 4) == weak
    assert load_proof(path, key, 8) is None

    other = KeyPair.generate()
    while proof_bits(other.peer_id.public_key(), weak.nonce) >= 4:
        other = KeyPair.generate()
    assert load_proof(path, other, 4) is None

    path.write_text("not hex\n")
    assert load_proof(path, key, 4) is None


@pytest.mark.timeout(30)
async def test_start_peer_solves_anew_over_a_weaker_proof_and_keeps_the_book(
    tmp_path: Path,
) -> None:
    key = weak_key(tmp_path / "node.key", 4, 10)
    proof_file, book_file = tmp_path / "node.key.pow", tmp_path / "cache" / REPUTATION_FILE
    save_proof(proof_file, solve_pow(key.peer_id.public_key(), 4))
    host, dht = await start_peer(
        key,
        [TCP],
        [],
        server_mode=True,
        pow_bits=10,
        proof_file=proof_file,
        reputation_file=book_file,
    )
    try:
        proof = dht.identity_proof
        assert proof is not None and proof.difficulty(key.peer_id.public_key()) >= 10
        assert load_proof(proof_file, key, 10) == proof
        assert not book_file.exists()
    finally:
        await stop_peer(host, dht)
    assert ReputationBook.load(book_file).peers() == []


@pytest.mark.timeout(30)
async def test_start_peer_refuses_a_swarm_asking_for_more_bits(tmp_path: Path) -> None:
    strong_host, strong_dht = await start_peer(
        KeyPair.generate(), [TCP], [], server_mode=True, pow_bits=12
    )
    try:
        addr = str(strong_host.addrs[0])
        key = weak_key(tmp_path / "weak.key", 2, 12)
        with pytest.raises(NotBootstrapped, match="same --pow-bits: this node uses 2"):
            await start_peer(key, [TCP], [addr], server_mode=True, pow_bits=2)
    finally:
        await stop_peer(strong_host, strong_dht)
