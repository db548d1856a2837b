"""Spot-checks inside ``DistributedModelForCausalLM.generate``, against real cheating servers.

One process (``tests/model_shards/cheater.py``) holds four shard servers of a tiny Llama:
a ``noise`` cheater of blocks [0, 2), two honest servers of [0, 2) and an honest one of
[2, 4). The client routes through the cheater (its round trips to the honest servers of
that span are set high before routing, so that least-latency routes avoid them while the
cheater is there; they still check it and can take over), checks every step (paranoid),
and must give exactly the local model's
tokens, with the cheater caught at the first step, banned and failed over. With push on,
the honest next server already ran the cheater's output: the client rolls it back and
runs the corrected output there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._server_limits import ClientLimits
from security import PeerId
from tests.model_shards.cheater import cheating_swarm
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import private_copy

SERVERS = ["noise:0:2", "honest:0:2", "honest:0:2", "honest:2:4"]
NEW_TOKENS = 10
PROMPT = prompts(1, 5, seed=21)
FAR_S = 5.0
"""The round trip the client is made to believe it has to the honest servers of [0, 2)."""


@dataclass
class Swarm:
    bootstrap: str
    tm: TinyModel
    peers: dict[str, PeerId]


@pytest.fixture(scope="module")
def swarm(
    tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path_factory.mktemp("checks-model"))
    work = tmp_path_factory.mktemp("checks")
    with cheating_swarm(tm.path, SERVERS, work, timeout=120) as (bootstrap, peers):
        yield Swarm(bootstrap, tm, peers)


@dataclass
class Run:
    tokens: torch.Tensor
    logits: torch.Tensor
    """Every generated position's logits, ``[steps, vocab]``."""


def run(model: object, **kwargs: object) -> Run:
    out = model.generate(  # type: ignore[attr-defined]
        PROMPT,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return Run(out.sequences, torch.cat([step[:1] for step in out.logits]))


@pytest.fixture(scope="module")
def expected(swarm: Swarm) -> Run:
    return run(swarm.tm.model)


def close_to(got: Run, expected: Run) -> bool:
    return torch.allclose(got.logits, expected.logits, rtol=0, atol=1e-4)


def avoid(model: DistributedModelForCausalLM, peers: list[PeerId]) -> None:
    """Make least-latency routes avoid ``peers`` while any other server will do."""
    model.client.run(model.chain.servers(refresh=True))
    for peer in peers:
        model.chain._rtts[peer] = FAR_S


@pytest.mark.timeout(120)
@pytest.mark.parametrize("push", [True, False])
def test_paranoid_generate_catches_a_noise_cheater_and_keeps_the_honest_tokens(
    swarm: Swarm, expected: Run, push: bool
) -> None:
    cheater = swarm.peers["noise 0:2"]
    honest = [swarm.peers["honest 0:2"], swarm.peers["honest 0:2 #2"]]
    limits = ClientLimits(push=push)
    with DistributedModelForCausalLM.from_pretrained(
        swarm.tm.path, initial_peers=[swarm.bootstrap], limits=limits, spot_check_rate=1.0
    ) as model:
        assert set(model.servers()) >= {cheater, *honest}
        avoid(model, honest)
        with model.inference_session(max_length=32) as session:
            got = run(model)
            caught = session.caught
            failovers = session.failovers
            route = session.hops
        assert [c.checked for c in caught] == [cheater]
        assert set(caught[0].majority) == set(honest)
        (failover,) = failovers
        assert failover.failed == cheater and "CaughtCheating" in failover.cause
        assert route[0].peer_id in honest
        assert model.book.is_banned(cheater)
        assert str(cheater) in model.chain.banned(soft=False)
        for peer in [*honest, swarm.peers["honest 2:4"]]:
            assert model.book.standing(peer).checks_failed == 0
        assert model.checker is not None and model.checker.stats.caught == 1
    assert torch.equal(got.tokens, expected.tokens)
    assert close_to(got, expected)


@pytest.mark.timeout(120)
def test_without_checks_the_cheater_changes_the_tokens(swarm: Swarm, expected: Run) -> None:
    """The same route with checks off: the noise shows in the logits (the check matters)."""
    honest = [swarm.peers["honest 0:2"], swarm.peers["honest 0:2 #2"]]
    with DistributedModelForCausalLM.from_pretrained(
        swarm.tm.path, initial_peers=[swarm.bootstrap], spot_check_rate=0.0
    ) as model:
        assert model.checker is None
        avoid(model, honest)
        with model.inference_session(max_length=32) as session:
            got = run(model)
            assert session.hops[0].peer_id == swarm.peers["noise 0:2"]
            assert session.caught == []
    assert not close_to(got, expected)
