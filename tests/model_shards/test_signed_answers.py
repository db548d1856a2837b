"""Signed answers and published evidence, with real shard servers on loopback.

One in-process swarm of a tiny Llama: a ``noise`` cheater of blocks [0, 2)
(``cheater.install``), five honest servers of [0, 2) and one of [2, 4). Every step's
``out``, every forward and every backward reply carries a valid signature of its server;
a server whose signatures are tampered with, or missing, is failed over; a paranoid
client that catches the cheater publishes evidence, and a second client reads it from the
DHT, rechecks it on servers it trusts and confirms it; an accusation fabricated against
an honest server (witnesses signed by the accuser's own keys) is rejected and costs the
accuser. The same holds at a later step k > 0 (checkers replay the session's steps and
sign the accused's very question), with the material inline or fetched from the accuser.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch

from model_shards._cache import CachePool
from model_shards._client import DistributedModelForCausalLM
from model_shards._client_chain import Hop
from model_shards._client_session import ChainSession, HopSession
from model_shards._errors import InvalidShape
from model_shards._evidence_wire import (
    BACKWARD_SESSION,
    BadAnswer,
    UnsignedAnswer,
    answer_of,
    desk_of,
    encode_steps,
    fetch_material,
    host_identity,
    publish,
    read_evidence,
)
from model_shards._server import ShardServer
from model_shards._server_protocol import BACKWARD_PROTOCOL, FORWARD_PROTOCOL, pack_tensors
from model_shards._spotcheck import SpotCheck, SpotChecker, precision_of, recheck
from model_shards._spotcheck import Verdict as SpotVerdict
from security import (
    Event,
    Evidence,
    EvidenceLimits,
    Judgement,
    KeyPair,
    PeerId,
    Recheck,
    ReputationBook,
    SignedAnswer,
    Verdict,
    digest,
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
                assert len(hop.exchanges) >= 2
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


# -- evidence at a later step, missing signatures, backward ------------------------------


async def _witnesses(
    model: DistributedModelForCausalLM,
    session: ChainSession,
    hop: HopSession,
    lengths: tuple[int, ...],
    peers: list[PeerId],
) -> list[SignedAnswer]:
    """Each of ``peers`` replays ``hop``'s session steps as a spot-check does."""
    chain = model.chain
    servers = await chain.servers()
    checked = precision_of(servers[hop.hop.peer_id])
    assert checked is not None
    prefix = session._inputs[hop.hop.start][:, : sum(lengths)].to(torch.float32)
    checker = SpotChecker(chain)
    found = []
    for peer in peers:
        got, asked = await checker._run_elsewhere(
            servers,
            hop.hop,
            checked,
            prefix,
            None,
            avoid_peers=[p for p in servers if p != peer],
            avoid_groups=[],
            against=[],
            tries=1,
            steps=lengths,
        )
        assert got is not None and asked == 1
        candidate, full, signed = got
        assert candidate.record.peer_id == peer and full.shape == prefix.shape
        assert signed is not None
        found.append(signed)
    return found


def _held_material(
    swarm: Swarm, evidence: Evidence, inputs: list[bytes], output: bytes
) -> Evidence:
    """``evidence`` signed again by a listening node of the swarm (a client only dialled
    through its addresses) with its material held back (a record under a small inline
    limit), served from its Host and published through its DHT."""
    host, dht = swarm.local.peers[0]

    async def held() -> Evidence:
        piece = Evidence.create(
            host_identity(host),
            evidence.accused,
            evidence.witnesses,
            inputs=inputs,
            output=output,
            now=time.time(),
            addrs=[str(a) for a in host.addrs],
            limits=EvidenceLimits(max_inline_bytes=64),
        )
        assert not piece.inline and piece.inputs == () and piece.addrs
        desk_of(host).hold(piece, inputs, output)
        assert await publish(dht, piece)
        return piece

    return swarm.local.thread.run(held())


def _verify(
    verifier: DistributedModelForCausalLM,
    accused: PeerId,
    evidence_id: bytes,
    trusted: list[PeerId],
) -> tuple[Judgement, list[Recheck]]:
    """What ``verifier`` concludes from the evidence ``evidence_id`` against ``accused``
    it reads from the DHT: material fetched from the accuser when not inline."""
    run = verifier.client.run
    found = run(read_evidence(verifier.chain.dht, accused))
    (piece,) = [e for e in found if e.evidence_id == evidence_id]
    material = None
    if not piece.inline:
        assert judge(piece, []).verdict is Verdict.UNDECIDED  # not yet fetched
        material = run(fetch_material(verifier.chain.host, piece))
        assert material is not None
        piece.check_material(*material)
    rechecks = run(recheck(verifier.chain, piece, trusted, material=material))
    return judge(piece, rechecks, material=material), rechecks


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fetched", [False, True], ids=["inline", "fetched"])
def test_a_cheat_at_a_later_step_is_convicted_by_a_second_client(
    swarm: Swarm, fetched: bool
) -> None:
    with client(swarm) as accuser, client(swarm) as verifier:
        route_through(accuser, swarm, swarm.cheater)
        with accuser.inference_session(max_length=32) as session:
            generate(accuser)
            chain = session.chain
            assert chain is not None
            hop = chain.hops[0]
            assert hop.hop.peer_id == swarm.cheater
            lengths = hop.step_lengths()
            assert lengths == (PROMPT.shape[1], *[1] * (NEW_TOKENS - 1))
            accused = hop.exchanges[-1]
            assert accused.answer.step == NEW_TOKENS - 1
            witnesses = accuser.client.run(
                _witnesses(accuser, chain, hop, lengths, swarm.honest[:2])
            )
            # the checkers signed the accused's very question at step k, other outputs
            for witness in witnesses:
                assert witness.question == accused.answer.question
                assert witness.output_digest != accused.answer.output_digest
            check = SpotCheck(
                SpotVerdict.CHEATER,
                swarm.cheater,
                tuple(swarm.honest[:2]),
                tuple(swarm.honest[:2]),
                (swarm.cheater,),
                None,
                signed=tuple(witnesses),
            )
            accuser.client.run(chain._accuse(hop, check))
            (evidence,) = chain.evidence
        assert evidence.accused == accused.answer and evidence.inline
        assert len(evidence.inputs) == NEW_TOKENS
        if fetched:
            evidence = _held_material(swarm, evidence, list(evidence.inputs), evidence.output)
        trusted = swarm.honest[2:4]
        judgement, rechecks = _verify(verifier, swarm.cheater, evidence.evidence_id, trusted)
        assert [r.agrees_with_accused for r in rechecks] == [False, False]
        assert judgement.verdict is Verdict.CONFIRMED
        assert judgement.penalised == swarm.cheater
        assert judgement.event is Event.EVIDENCE_AGAINST


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fetched", [False, True], ids=["inline", "fetched"])
def test_a_forged_accusation_at_a_later_step_costs_the_accuser(swarm: Swarm, fetched: bool) -> None:
    target = swarm.honest[1]
    with client(swarm) as liar, client(swarm) as verifier:
        route_through(liar, swarm, target)
        with liar.inference_session(max_length=32) as session:
            generate(liar)
            chain = session.chain
            assert chain is not None
            hop = chain.hops[0]
            assert hop.hop.peer_id == target
            lengths = hop.step_lengths()
            assert lengths is not None and len(lengths) == NEW_TOKENS
            exchange = hop.exchanges[-1]
            assert exchange.input is not None
            held = sum(lengths[:-1])
            inputs = [
                *encode_steps(
                    chain._inputs[0][:, :held], lengths[:-1], hop.hop.dtype, liar.chain.compression
                ),
                exchange.input,
            ]
        accused = exchange.answer
        assert accused.step == NEW_TOKENS - 1 and accused.history != bytes(32)
        sybils = [KeyPair.generate() for _ in range(2)]
        witnesses = [
            SignedAnswer.sign(
                key,
                session=b"",
                step=accused.step,
                history=accused.history,
                input_digest=accused.input_digest,
                output_digest=bytes([n]) * 32,
                span=accused.span,
                model=accused.model,
            )
            for n, key in enumerate(sybils, 1)
        ]
        identity = host_identity(liar.chain.host)
        evidence = Evidence.create(
            identity, accused, witnesses, inputs=inputs, output=exchange.output, now=time.time()
        )
        if fetched:
            evidence = _held_material(swarm, evidence, inputs, exchange.output)
            identity = host_identity(swarm.local.peers[0][0])
        else:
            assert liar.client.run(publish(liar.chain.dht, evidence))

        trusted = swarm.honest[2:4]
        judgement, rechecks = _verify(verifier, target, evidence.evidence_id, trusted)
        assert [r.agrees_with_accused for r in rechecks] == [True, True]
        assert judgement.verdict is Verdict.REJECTED
        assert judgement.penalised == identity.peer_id
        assert judgement.event is Event.FALSE_ACCUSATION
        book = ReputationBook()
        assert book.record_evidence(judgement.evidence_id, identity.peer_id, judgement.event)
        assert target not in book
        if fetched:
            # material the accuser serves that does not match its evidence costs it too
            other = judge(evidence, rechecks, material=(inputs, exchange.output + b"\x00"))
            assert other.verdict is Verdict.REJECTED
            assert other.penalised == identity.peer_id


class _Unsigned:
    """What a server that signs nothing puts in its answers' ``answer`` field."""

    def to_wire(self) -> None:
        return None


@pytest.mark.timeout(60)
def test_an_unsigned_answer_fails_the_hop_over(swarm: Swarm, expected: torch.Tensor) -> None:
    victim = swarm.servers[swarm.honest[0]]
    victim._sign = lambda *args: _Unsigned()  # type: ignore[method-assign]
    hidden = torch.randn(1, 3, swarm.tm.model.config.hidden_size)
    try:
        with client(swarm) as model:
            hop = Hop(swarm.honest[0], 0, 2, torch.float32)
            with pytest.raises(UnsignedAnswer, match="without its signature"):
                model.client.run(model.chain.forward_signed(hop, hidden))
        with client(swarm) as model:
            route_through(model, swarm, swarm.honest[0])
            model.chain.ban(swarm.cheater)
            with model.inference_session(max_length=32) as session:
                got = generate(model)
                failovers = session.failovers
                hops = session.hops
    finally:
        del victim._sign
    (failover,) = failovers
    assert failover.failed == swarm.honest[0]
    assert "without its signature" in failover.cause
    assert hops[0].peer_id != swarm.honest[0]
    assert torch.equal(got, expected)


@pytest.mark.timeout(60)
def test_backward_replies_are_signed(swarm: Swarm) -> None:
    size = swarm.tm.model.config.hidden_size
    hidden, grad = torch.randn(1, 3, size), torch.randn(1, 3, size)
    peer = swarm.honest[2]
    hop = Hop(peer, 0, 2, torch.float32)
    with client(swarm) as model:
        chain = model.chain
        sizes, payload = pack_tensors([hidden, grad])
        reply = model.client.run(chain._call(BACKWARD_PROTOCOL, hop, sizes, payload))
        answer = answer_of(
            reply.value,
            hop,
            chain.model_id,
            reply.payload,
            session=BACKWARD_SESSION,
            input_digest=digest(payload),
        )
        assert answer.signer == peer and answer.step == 0
        # the client's own backward checks every hop's signature on receipt
        model.chain.ban(swarm.cheater)
        trace = model.client.run(chain.trace(hidden))
        assert model.client.run(chain.backward(trace, grad)).shape == hidden.shape
        victim = swarm.servers[peer]
        honest_key = victim.identity
        victim.identity = TamperedKey(honest_key)  # type: ignore[assignment]
        try:
            with pytest.raises(BadAnswer, match="signed its answer badly"):
                model.client.run(chain._unary(BACKWARD_PROTOCOL, hop, [hidden, grad]))
            with pytest.raises(BadAnswer, match="signed its answer badly"):
                model.client.run(chain.forward_signed(hop, hidden))
        finally:
            victim.identity = honest_key


@pytest.mark.timeout(30)
def test_a_replay_of_steps_runs_the_last_one_as_its_session_did(swarm: Swarm) -> None:
    span = swarm.servers[swarm.honest[4]].span
    pool = CachePool()
    hidden = torch.randn(2, 7, span.hidden_size, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False  # left padding in the first step
    lengths = [4, 1, 2]
    with span.open_session(pool, batch_size=2, max_length=7) as session:
        outs = [
            session.step(hidden[:, a:b], attention_mask=mask[:, a:b])
            for a, b in pairwise([0, 4, 5, 7])
        ]
    replayed = span.forward_steps(pool, hidden, lengths, attention_mask=mask)
    torch.testing.assert_close(replayed[:, 4:], torch.cat(outs, dim=1)[:, 4:])
    # a whole stateless forward agrees too (the first row has no padding)
    torch.testing.assert_close(
        replayed[0], span.forward(hidden, attention_mask=mask)[0], atol=1e-5, rtol=0
    )
    with pytest.raises(InvalidShape, match="do not split"):
        span.forward_steps(pool, hidden, [3, 3])
    assert pool.sessions == 0 and pool.used_bytes == 0
