"""Evidence through the DHT: a client publishes signed accusations under the accused's
evidence key; another client reads them back, judges them with its own rechecks and
lowers whoever the verdict blames."""

from __future__ import annotations

import os
import time

import pytest

from security import (
    Event,
    Evidence,
    KeyPair,
    Recheck,
    ReputationBook,
    SignedAnswer,
    Verdict,
    digest,
    evidence_key,
    history_digest,
    judge,
)
from tests.dht.dht_helpers import Cluster

HOUR = 3600.0


def signed_answer(server: KeyPair, inputs: list[bytes], output: bytes) -> SignedAnswer:
    return SignedAnswer.sign(
        server,
        session=b"s",
        step=len(inputs) - 1,
        history=history_digest(inputs[:-1]),
        input_digest=digest(inputs[-1]),
        output_digest=digest(output),
        span=(0, 4),
        model="ab" * 32,
    )


@pytest.mark.timeout(60)
async def test_published_evidence_is_judged_by_another_client(cluster: Cluster) -> None:
    await cluster.grow(6)
    accuser_key = KeyPair.generate()
    accuser = await cluster.add(identity=accuser_key, server_mode=False)
    verifier = await cluster.add(server_mode=False)
    cheat, honest, witness_1, witness_2 = (KeyPair.generate() for _ in range(4))
    inputs = [os.urandom(256) for _ in range(4)]
    # two honest servers of other dtypes: the same question, other output bytes
    witnesses = [
        signed_answer(witness_1, inputs, b"true+"),
        signed_answer(witness_2, inputs, b"true-"),
    ]

    def accuse(accused: KeyPair, output: bytes) -> Evidence:
        answer = signed_answer(accused, inputs, output)
        now = time.time()
        return Evidence.create(
            accuser_key, answer, witnesses, inputs=inputs, output=output, now=now
        )

    true_case, false_case = accuse(cheat, b"noise"), accuse(honest, b"true")
    expiry = time.time() + HOUR
    for evidence in (true_case, false_case):
        key = evidence_key(evidence.accused.signer)
        await accuser.store(key, evidence.to_bytes(), expiry, subkey=accuser.peer_id)

    book = ReputationBook()
    trusted = [KeyPair.generate().peer_id for _ in range(2)]
    verdicts = {}
    for accused, output_is_true in ((cheat, False), (honest, True)):
        found = await verifier.get(evidence_key(accused.peer_id), latest=True)
        assert isinstance(found, dict)
        evidence = Evidence.from_bytes(found[accuser.peer_id.to_bytes()].value)
        # the verifier's trusted servers recompute: they agree with the accused only
        # where the accused told the truth
        rechecks = [Recheck(server, output_is_true) for server in trusted]
        judgement = judge(evidence, rechecks)
        verdicts[accused.peer_id] = judgement.verdict
        assert judgement.penalised is not None and judgement.event is not None
        book.record_evidence(judgement.evidence_id, judgement.penalised, judgement.event)
    assert verdicts == {cheat.peer_id: Verdict.CONFIRMED, honest.peer_id: Verdict.REJECTED}
    assert book.is_banned(cheat.peer_id)
    assert not book.is_banned(honest.peer_id) and honest.peer_id not in book
    assert book.standing(accuser.peer_id).score == pytest.approx(
        book.settings.weight(Event.FALSE_ACCUSATION)
    )


@pytest.mark.timeout(60)
async def test_evidence_too_large_to_go_inline_names_its_accuser(cluster: Cluster) -> None:
    await cluster.grow(4)
    accuser_key = KeyPair.generate()
    accuser = await cluster.add(identity=accuser_key, server_mode=False)
    verifier = await cluster.add(server_mode=False)
    cheat, witness_1, witness_2 = (KeyPair.generate() for _ in range(3))
    # a long session: 200 steps of 512 bytes, far over what a record carries
    inputs = [os.urandom(512) for _ in range(200)]
    witnesses = [
        signed_answer(witness_1, inputs, b"true+"),
        signed_answer(witness_2, inputs, b"true-"),
    ]
    where = "/ip4/127.0.0.1/tcp/4001/p2p/" + accuser_key.peer_id.to_base58()
    evidence = Evidence.create(
        accuser_key,
        signed_answer(cheat, inputs, b"noise"),
        witnesses,
        inputs=inputs,
        output=b"noise",
        now=time.time(),
        addrs=[where],
    )
    assert not evidence.inline and evidence.addrs == (where,)
    key = evidence_key(cheat.peer_id)
    await accuser.store(key, evidence.to_bytes(), time.time() + HOUR, subkey=accuser.peer_id)

    found = await verifier.get(key, latest=True)
    assert isinstance(found, dict)
    record = Evidence.from_bytes(found[accuser.peer_id.to_bytes()].value)
    assert record == evidence and record.addrs == (where,)
    rechecks = [Recheck(KeyPair.generate().peer_id, False) for _ in range(2)]
    # without the material nobody is blamed; with it (fetched from the accuser) it holds
    assert judge(record, rechecks).verdict is Verdict.UNDECIDED
    fetched = judge(record, rechecks, material=(inputs, b"noise"))
    assert fetched.verdict is Verdict.CONFIRMED and fetched.penalised == cheat.peer_id
    # material that does not chain to the accused's history costs the accuser
    forged = judge(record, rechecks, material=([*inputs[:-2], inputs[-1], inputs[-2]], b"noise"))
    assert forged.verdict is Verdict.REJECTED and forged.penalised == accuser_key.peer_id
