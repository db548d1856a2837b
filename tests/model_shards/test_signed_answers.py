"""Signed answers and published evidence, with real shard servers on loopback.

One in-process swarm of a tiny Llama: a ``noise`` cheater of blocks [0, 2)
(``cheater.install``), five honest servers of [0, 2) and one of [2, 4). Every step's
``out`` carries a valid signature of its server; a server whose signatures are tampered
with is failed over; a paranoid client that catches the cheater publishes evidence, and a
second client reads it from the DHT, rechecks it on servers it trusts and confirms it; an
accusation fabricated against an honest server (witnesses signed by the accuser's own
keys) is rejected and costs the accuser.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._client_chain import Hop
from model_shards._evidence_wire import answer_of, host_identity, publish, read_evidence
from model_shards._server import ShardServer
from model_shards._server_protocol import FORWARD_PROTOCOL, pack_tensors
from model_shards._spotcheck import recheck
from security import (
    Event,
    Evidence,
    KeyPair,
    PeerId,
    ReputationBook,
    SignedAnswer,
    Verdict,
    judge,
)
from tests.model_shards.cheater import install
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import LocalSwarm, private_copy

NEW_TOKENS = 4
PROMPT = prompts(1, 5, seed=33)
FAR_S = 5.0
HONEST_LOWER = 5


@dataclass
class Swarm:
    local: LocalSwarm
    tm: TinyModel
    cheater: PeerId
    honest: list[PeerId]
    """The honest servers of [0, 2)."""
    servers: dict[PeerId, ShardServer]


@pytest.fixture(scope="module")
def swarm(
    tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path_factory.mktemp("signed-model"))
    local = LocalSwarm(tmp_path_factory.mktemp("signed-cache"))
    try:
        cheater = local.serve(tm.path, 0, 2, rebalance=False)
        install(cheater.server, "noise", seed=1, liar=False)
        honest = [local.serve(tm.path, 0, 2, rebalance=False) for _ in range(HONEST_LOWER)]
        upper = local.serve(tm.path, 2, 4, rebalance=False)
        servers = {n.server.host.peer_id: n.server for n in [cheater, *honest, upper]}
        yield Swarm(
            local,
            tm,
            cheater.server.host.peer_id,
            [n.server.host.peer_id for n in honest],
            servers,
        )
    finally:
        local.close()


@pytest.fixture(scope="module")
def expected(swarm: Swarm) -> torch.Tensor:
    return swarm.tm.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)


def client(swarm: Swarm, *, rate: float = 0.0) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        swarm.tm.path, initial_peers=[swarm.local.addr], spot_check_rate=rate
    )


def route_through(model: DistributedModelForCausalLM, swarm: Swarm, peer: PeerId) -> None:
    """Make least-latency routes over [0, 2) take ``peer`` while it is there."""
    model.client.run(model.chain.servers(refresh=True))
    for other in [swarm.cheater, *swarm.honest]:
        if other != peer:
            model.chain._rtts[other] = FAR_S


def generate(model: DistributedModelForCausalLM) -> torch.Tensor:
    return model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)


class TamperedKey:
    """A server's key pair whose signatures come out with one bit flipped."""

    def __init__(self, identity: KeyPair) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id

    def sign(self, data: bytes) -> bytes:
        signature = bytearray(self.identity.sign(data))
        signature[0] ^= 1
        return bytes(signature)


@pytest.mark.timeout(60)
def test_every_step_answer_is_signed_by_its_server(swarm: Swarm, expected: torch.Tensor) -> None:
    with client(swarm) as model:
        route_through(model, swarm, swarm.honest[0])
        with model.inference_session(max_length=32) as session:
            got = generate(model)
            chain = session.chain
            assert chain is not None and chain.failovers == []
            for hop in chain.hops:
                assert hop.signs and len(hop.exchanges) >= 2
                for exchange in hop.exchanges:
                    answer = exchange.answer
                    answer.verify()
                    assert answer.signer == hop.hop.peer_id
                    assert answer.span == (hop.hop.start, hop.hop.end)
                    assert answer.session == hop.session_id
                first = hop.exchanges[0].answer
                assert first.step == 0 and first.history == bytes(32)
                assert [e.answer.step for e in hop.exchanges] == list(range(len(hop.exchanges)))
    assert torch.equal(got, expected)


@pytest.mark.timeout(60)
def test_a_tampered_signature_fails_the_hop_over(swarm: Swarm, expected: torch.Tensor) -> None:
    victim = swarm.servers[swarm.honest[0]]
    honest_key = victim.identity
    victim.identity = TamperedKey(honest_key)  # type: ignore[assignment]
    try:
        with client(swarm) as model:
            route_through(model, swarm, swarm.honest[0])
            model.chain.ban(swarm.cheater)  # the replacement must be honest: tokens compare
            with model.inference_session(max_length=32) as session:
                got = generate(model)
                failovers = session.failovers
                hops = session.hops
    finally:
        victim.identity = honest_key
    (failover,) = failovers
    assert failover.failed == swarm.honest[0]
    assert "signed its answer badly" in failover.cause
    assert hops[0].peer_id != swarm.honest[0]
    assert torch.equal(got, expected)


@pytest.mark.timeout(60)
def test_a_caught_cheater_is_convicted_by_a_second_client(
    swarm: Swarm, expected: torch.Tensor
) -> None:
    with client(swarm, rate=1.0) as accuser:
        route_through(accuser, swarm, swarm.cheater)
        with accuser.inference_session(max_length=32) as session:
            got = generate(accuser)
            chain = session.chain
            assert chain is not None
            (evidence,) = chain.evidence
        assert torch.equal(got, expected)
        assert evidence.accused.signer == swarm.cheater
        assert evidence.accuser == accuser.chain.host.peer_id and evidence.inline
        witnesses = {w.signer for w in evidence.witnesses}
        assert witnesses <= set(swarm.honest) and len(witnesses) == 2

        with client(swarm) as verifier:
            found = verifier.client.run(read_evidence(verifier.chain.dht, swarm.cheater))
            assert [e.evidence_id for e in found] == [evidence.evidence_id]
            trusted = [p for p in swarm.honest if p not in witnesses]
            rechecks = verifier.client.run(recheck(verifier.chain, found[0], trusted))
            assert len(rechecks) == len(trusted) >= 2
            judgement = judge(found[0], rechecks)
            assert judgement.verdict is Verdict.CONFIRMED
            assert judgement.penalised == swarm.cheater
            assert judgement.event is Event.EVIDENCE_AGAINST


@pytest.mark.timeout(60)
def test_a_fabricated_accusation_is_rejected_and_costs_the_accuser(swarm: Swarm) -> None:
    target = swarm.honest[1]
    hidden = torch.randn(1, 3, swarm.tm.model.config.hidden_size)
    with client(swarm) as liar, client(swarm) as verifier:
        identity = host_identity(liar.chain.host)
        # the accused's genuine signed answer, and the output bytes it signed
        hop = Hop(target, 0, 2, torch.float32)
        sizes, payload, output = liar.client.run(_raw_forward(liar, hop, hidden))
        accused = output[1]
        # witnesses the accuser made up: two keys of its own signing other outputs
        sybils = [KeyPair.generate() for _ in range(2)]
        witnesses = [
            SignedAnswer.sign(
                key,
                session=b"",
                step=0,
                history=accused.history,
                input_digest=accused.input_digest,
                output_digest=bytes([n]) * 32,
                span=accused.span,
                model=accused.model,
            )
            for n, key in enumerate(sybils, 1)
        ]
        evidence = Evidence.create(
            identity,
            accused,
            witnesses,
            inputs=[payload[: sizes[0]]],
            output=output[0],
            now=time.time(),
        )
        assert liar.client.run(publish(liar.chain.dht, evidence))

        (found,) = verifier.client.run(read_evidence(verifier.chain.dht, target))
        trusted = [p for p in swarm.honest if p != target][:2]
        rechecks = verifier.client.run(recheck(verifier.chain, found, trusted))
        assert [r.agrees_with_accused for r in rechecks] == [True, True]
        judgement = judge(found, rechecks)
        assert judgement.verdict is Verdict.REJECTED
        assert judgement.penalised == identity.peer_id
        assert judgement.event is Event.FALSE_ACCUSATION
        book = ReputationBook()
        assert book.record_evidence(judgement.evidence_id, identity.peer_id, judgement.event)
        assert book.standing(identity.peer_id).score == pytest.approx(
            book.settings.weight(Event.FALSE_ACCUSATION)
        )
        assert target not in book


async def _raw_forward(
    model: DistributedModelForCausalLM, hop: Hop, hidden: torch.Tensor
) -> tuple[list[int], bytes, tuple[bytes, SignedAnswer]]:
    """A forward on ``hop`` as the wire carries it: the sizes and payload sent, and the
    output bytes received with their signed answer."""
    chain = model.chain
    sizes, payload = pack_tensors([hidden])
    reply = await chain._call(FORWARD_PROTOCOL, hop, sizes, payload)
    answer = answer_of(reply.value, hop, chain.model_id, reply.payload)
    assert answer is not None
    return sizes, payload, (bytes(reply.payload), answer)
