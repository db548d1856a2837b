"""Evidence for a cheat at a later step, end to end, with real shard servers on loopback.

One in-process swarm of a tiny Llama: a ``late`` cheater of blocks [0, 2) (honest for its
first ``cheater.LATE_AFTER`` inference steps, noisy after), four honest servers of [0, 2)
and one of [2, 4). A paranoid client routed through the cheater passes its first steps,
catches step k = ``LATE_AFTER``: its checkers replay the session's steps and sign the
accused's very question (step k, the history of k inputs), so the client publishes
evidence on its own; a second client reads it, replays it on two servers it trusts and
confirms it. The tokens are those of an honest run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._evidence_wire import read_evidence
from model_shards._spotcheck import recheck
from security import Event, PeerId, ReputationBook, Verdict, judge
from tests.model_shards.cheater import LATE_AFTER, install
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import LocalSwarm, private_copy

NEW_TOKENS = LATE_AFTER + 2
PROMPT = prompts(1, 4, seed=41)
FAR_S = 5.0


@dataclass
class Swarm:
    local: LocalSwarm
    tm: TinyModel
    cheater: PeerId
    honest: list[PeerId]


@pytest.fixture(scope="module")
def swarm(
    tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path_factory.mktemp("late-model"))
    local = LocalSwarm(tmp_path_factory.mktemp("late-cache"))
    try:
        cheater = local.serve(tm.path, 0, 2, rebalance=False)
        install(cheater.server, "late", seed=2, liar=False)
        honest = [local.serve(tm.path, 0, 2, rebalance=False) for _ in range(4)]
        local.serve(tm.path, 2, 4, rebalance=False)
        yield Swarm(local, tm, cheater.server.host.peer_id, [n.server.host.peer_id for n in honest])
    finally:
        local.close()


@pytest.mark.timeout(90)
def test_a_cheat_at_a_later_step_is_published_and_confirmed(swarm: Swarm) -> None:
    expected = swarm.tm.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
    with DistributedModelForCausalLM.from_pretrained(
        swarm.tm.path, initial_peers=[swarm.local.addr], spot_check_rate=1.0
    ) as accuser:
        accuser.client.run(accuser.chain.servers(refresh=True))
        for other in swarm.honest:
            accuser.chain._rtts[other] = FAR_S  # the route takes the cheater
        with accuser.inference_session(max_length=32) as session:
            got = accuser.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
            chain = session.chain
            assert chain is not None
            caught = list(chain.caught)
            published = list(chain.evidence)
    assert torch.equal(got, expected)
    assert [c.checked for c in caught] == [swarm.cheater]
    (evidence,) = published
    accused = evidence.accused
    assert accused.signer == swarm.cheater and accused.step == LATE_AFTER
    assert evidence.inline and len(evidence.inputs) == LATE_AFTER + 1
    witnesses = {w.signer for w in evidence.witnesses}
    assert witnesses <= set(swarm.honest) and len(witnesses) == 2

    with DistributedModelForCausalLM.from_pretrained(
        swarm.tm.path, initial_peers=[swarm.local.addr]
    ) as verifier:
        found = verifier.client.run(read_evidence(verifier.chain.dht, swarm.cheater))
        (piece,) = [e for e in found if e.evidence_id == evidence.evidence_id]
        trusted = [p for p in swarm.honest if p not in witnesses]
        rechecks = verifier.client.run(recheck(verifier.chain, piece, trusted))
        assert [r.agrees_with_accused for r in rechecks] == [False, False]
    judgement = judge(piece, rechecks)
    assert judgement.verdict is Verdict.CONFIRMED and judgement.penalised == swarm.cheater
    book = ReputationBook()
    assert book.record_evidence(judgement.evidence_id, swarm.cheater, Event.EVIDENCE_AGAINST)
    assert book.is_banned(swarm.cheater)
