"""Spot-checks against real server processes: cheaters are caught, honest servers never.

One process (``tests/model_shards/cheater.py``) holds ten shard servers of a tiny Llama,
each with its own identity, DHT node and loopback /24: three honest ones, one cheater per
mode of the issue (a)-(f) that lies in its inference steps only (and answers checks
honestly), and one ``liar`` that also lies when it is asked to check. The client (this
process) drives greedy generation hop by hop over the plain inference protocol, calls
``SpotChecker.after_step`` after every hop's step, and keeps a ``ReputationBook``.

Pure parts first: the detection bound, checked against its formula and by simulation, and
the choice of checkers.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from model_shards import Checkpoint, ModelEnds, load_manifest, load_model_ends
from model_shards._announce import ServerRecord
from model_shards._client_chain import Hop, RemoteChain
from model_shards._spotcheck import (
    DEFAULT_RATE,
    SpotChecker,
    SpotCheckSettings,
    Verdict,
    choose_checkers,
    detection_bound,
)
from model_shards._tolerance import Precision
from p2p import Host
from scheduler import ServerState
from security import Event, KeyPair, PeerId, ReputationBook
from swarm._peer import start_peer, stop_peer
from tests.model_shards.cheater import (
    CHEAT_RATES,
    CORRUPTIONS,
    PROMPT,
    TCP,
    cheating_swarm,
    generate,
)
from tests.model_shards.tiny import TinyModel
from tests.swarm.harness import private_copy
from transport import Multiaddr

SETTINGS = SpotCheckSettings(exempt_private_addrs=False)
"""Loopback addresses count as IP groups here: each server sits in its own 127.0.x.0/24."""


# -- the bound ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "cheat_rate", "bound"),
    [(0.05, 1.0, 90), (0.05, 0.1, 919), (1.0, 1.0, 1), (1.0, 0.1, 44), (0.01, 1.0, 459)],
)
def test_detection_bound_values(rate: float, cheat_rate: float, bound: int) -> None:
    assert detection_bound(rate, cheat_rate) == bound
    p = rate * cheat_rate
    assert (1 - p) ** bound <= 0.01
    if bound > 1:
        assert (1 - p) ** (bound - 1) > 0.01


def test_detection_bound_refuses_rates_outside_0_1() -> None:
    for rate, cheat in ((0.0, 1.0), (0.5, 0.0), (1.5, 1.0), (0.5, -1.0)):
        with pytest.raises(ValueError):
            detection_bound(rate, cheat)


@pytest.mark.timeout(30)
def test_simulated_cheaters_are_caught_within_the_bound_99_percent_of_the_time() -> None:
    rng = random.Random(7)
    rate, cheat_rate = DEFAULT_RATE, 0.1
    bound = detection_bound(rate, cheat_rate)
    trials = 2000
    missed = 0
    for _ in range(trials):
        for _step in range(bound):
            if rng.random() < cheat_rate and rng.random() < rate:
                break
        else:
            missed += 1
    # the bound promises at most 1 % misses; 2000 trials put 3 % far out in the tail
    assert missed / trials <= 0.02


# -- choosing checkers -------------------------------------------------------------------


def record(
    ip: str,
    *,
    start: int = 0,
    end: int = 4,
    dtype: str = "float32",
    quantization: str = "none",
    state: ServerState = ServerState.ONLINE,
) -> ServerRecord:
    return ServerRecord(
        peer_id=KeyPair.generate().peer_id,
        state=state,
        start=start,
        end=end,
        throughput=100.0,
        cache_tokens_left=1000,
        quantization=quantization,
        dtype=dtype,
        addrs=(Multiaddr.from_string(f"/ip4/{ip}/tcp/4001"),),
    )


def test_checkers_are_independent_comparable_online_servers_of_the_span() -> None:
    checked = record("203.0.113.5")
    good = record("198.51.100.1")
    records = [
        checked,
        good,
        record("203.0.113.77"),  # the checked server's /24
        record("192.0.2.1", state=ServerState.OFFLINE),
        record("192.0.2.2", start=1),  # does not cover block 0
        record("192.0.2.3", quantization="nf4"),  # too loose a tolerance against none/float32
    ]
    banned = record("192.0.2.4")
    servers = {r.peer_id: r for r in [*records, banned]}
    chosen = choose_checkers(
        servers,
        0,
        2,
        Precision.of("float32", "none"),
        avoid_peers=[checked.peer_id],
        avoid_groups=["203.0.113.0/24"],
        settings=SETTINGS,
        banned=lambda peer: peer == banned.peer_id,
    )
    assert [c.record.peer_id for c in chosen] == [good.peer_id]
    assert chosen[0].group == "198.51.100.0/24"


def test_checkers_are_ranked_strict_tolerance_first_then_by_reputation() -> None:
    low, high = record("198.51.100.1"), record("198.51.101.1")
    half = record("198.51.102.1", dtype="float16")  # a coarse tolerance against float32
    scores = {low.peer_id: -5.0, high.peer_id: 30.0, half.peer_id: 100.0}
    servers = {r.peer_id: r for r in (low, high, half)}
    chosen = choose_checkers(
        servers,
        0,
        4,
        Precision.of("float32", "none"),
        avoid_peers=[],
        avoid_groups=[],
        settings=SETTINGS,
        score=scores.__getitem__,
        rng=random.Random(0),
    )
    assert [c.record.peer_id for c in chosen] == [high.peer_id, low.peer_id, half.peer_id]


# -- real processes ----------------------------------------------------------------------

SERVERS = [
    "honest:0:4",
    "honest:0:4",
    "honest:0:2",
    *(f"{mode}:0:2" for mode in CORRUPTIONS),
    "noise:0:2:liar",
]


@dataclass
class Swarm:
    bootstrap: str
    tm: TinyModel
    model_id: str
    peers: dict[str, PeerId]


@pytest.fixture(scope="module")
def swarm(
    tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path_factory.mktemp("models"))
    work = tmp_path_factory.mktemp("spotcheck")
    with cheating_swarm(tm.path, SERVERS, work) as (bootstrap, peers):
        yield Swarm(bootstrap, tm, load_manifest(Checkpoint.open(tm.path)).model_id, peers)


@dataclass
class Client:
    host: Host
    chain: RemoteChain
    ends: ModelEnds
    book: ReputationBook

    def hop(self, peer: PeerId, start: int, end: int) -> Hop:
        return Hop(peer, start, end, torch.float32)


@pytest.fixture
async def client(swarm: Swarm) -> AsyncIterator[Client]:
    host, dht = await start_peer(KeyPair.generate(), [TCP], [swarm.bootstrap], server_mode=False)
    try:
        chain = RemoteChain(host, dht, swarm.model_id, swarm.tm.num_blocks)
        servers = await chain.servers(refresh=True)
        assert set(swarm.peers.values()) <= set(servers)
        ends = load_model_ends(swarm.tm.path, dtype=torch.float32, device="cpu")
        yield Client(host, chain, ends, ReputationBook())
    finally:
        await stop_peer(host, dht)


def honest_peers(swarm: Swarm) -> set[PeerId]:
    return {peer for role, peer in swarm.peers.items() if role.startswith("honest")}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(CORRUPTIONS))
async def test_a_cheater_is_caught_within_the_bound_and_honest_servers_never_are(
    swarm: Swarm, client: Client, mode: str
) -> None:
    cheater = swarm.peers[f"{mode} 0:2"]
    second = client.hop(swarm.peers["honest 0:4"], 2, 4)
    hops = [client.hop(cheater, 0, 2), second]
    # the bound is stated for the default rate, at which peers that left probation are
    # checked (one on probation is checked at every step): these have passed their checks
    for peer in (cheater, second.peer_id):
        for _ in range(client.book.settings.probation_checks):
            client.book.record(peer, Event.CHECK_PASSED)
        assert not client.book.on_probation(peer)
    checker = SpotChecker(client.chain, settings=SETTINGS, book=client.book, rng=random.Random(1))
    bound = detection_bound(SETTINGS.rate, CHEAT_RATES[mode])
    outcome = await generate(
        client.host,
        client.ends,
        swarm.model_id,
        hops,
        checker,
        max_steps=bound,
        stop_when_caught=cheater,
    )
    caught = [v for v in outcome.verdicts if v[1] is Verdict.CHEATER]
    assert caught and cheater in caught[-1][2], (mode, outcome.steps, bound, outcome.verdicts)
    assert outcome.steps <= bound
    assert client.book.is_banned(cheater)
    for peer in honest_peers(swarm):
        assert client.book.standing(peer).checks_failed == 0
    liar = swarm.peers["noise:liar 0:2"]
    assert all(set(accused) <= {cheater, liar} for _, _, accused in outcome.verdicts)


@pytest.mark.timeout(300)
async def test_honest_servers_checked_at_every_step_are_never_flagged_and_a_lying_checker_is(
    swarm: Swarm, client: Client
) -> None:
    liar = swarm.peers["noise:liar 0:2"]
    hops = [
        client.hop(swarm.peers["honest 0:2"], 0, 2),
        client.hop(swarm.peers["honest 0:4"], 2, 4),
    ]
    for _ in range(5):  # a good name, so that it is asked first
        client.book.record(liar, Event.CHECK_PASSED)
    paranoid = SpotCheckSettings(rate=1.0, exempt_private_addrs=False)
    checker = SpotChecker(client.chain, settings=paranoid, book=client.book, rng=random.Random(2))
    outcome = await generate(client.host, client.ends, swarm.model_id, hops, checker, max_steps=120)
    assert len(outcome.verdicts) == 2 * outcome.steps == 240
    assert all(verdict is Verdict.HONEST for _, verdict, _ in outcome.verdicts), [
        v for v in outcome.verdicts if v[1] is not Verdict.HONEST
    ]
    accused = {peer for _, _, found in outcome.verdicts for peer in found}
    assert accused == {liar}
    assert client.book.is_banned(liar)
    for peer in honest_peers(swarm):
        assert client.book.standing(peer).checks_failed == 0
    assert checker.stats.checks == 240 and checker.stats.caught == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["noise", "skip"])
async def test_paranoid_checks_keep_the_tokens_of_an_honest_run(
    swarm: Swarm, client: Client, mode: str
) -> None:
    honest = [
        client.hop(swarm.peers["honest 0:2"], 0, 2),
        client.hop(swarm.peers["honest 0:4"], 2, 4),
    ]
    cheating = [client.hop(swarm.peers[f"{mode} 0:2"], 0, 2), honest[1]]
    paranoid = SpotCheckSettings(rate=1.0, exempt_private_addrs=False)
    plain = SpotCheckSettings(rate=0.0)
    reference = await generate(
        client.host,
        client.ends,
        swarm.model_id,
        honest,
        SpotChecker(client.chain, settings=plain),
        max_steps=20,
    )
    checked = await generate(
        client.host,
        client.ends,
        swarm.model_id,
        cheating,
        SpotChecker(client.chain, settings=paranoid, rng=random.Random(3)),
        max_steps=20,
    )
    assert sum(v[1] is Verdict.CHEATER for v in checked.verdicts) == 20
    assert checked.tokens == reference.tokens
    # each conviction carries the honest output of the whole prefix the cheater had run
    assert [ran for ran, _ in checked.corrected_lengths] == list(range(PROMPT, PROMPT + 20))
    assert all(ran == corrected for ran, corrected in checked.corrected_lengths)
