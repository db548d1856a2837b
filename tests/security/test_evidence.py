"""Signed answers and evidence: canonical bytes, signatures, bounds, and the verdicts of
``judge`` for true accusations, false ones and everything in between."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security import (
    EMPTY_HISTORY,
    Event,
    Evidence,
    EvidenceError,
    EvidenceLimits,
    InvalidEvidence,
    KeyPair,
    MalformedEvidence,
    Recheck,
    ReputationBook,
    SignedAnswer,
    Verdict,
    chain_history,
    digest,
    evidence_key,
    history_digest,
    judge,
)

MODEL = "ab" * 32
SPAN = (4, 8)
NOW = 1_700_000_000.0

cheat, honest_1, honest_2, client, trusted_1, trusted_2, trusted_3 = (
    KeyPair.from_seed(bytes([n]) * 32) for n in range(1, 8)
)
INPUTS = [os.urandom(64) for _ in range(3)]  # steps 0, 1, 2
TRUE_OUTPUT = b"true output of step 2"
WRONG_OUTPUT = b"noise"


def answer(signer: KeyPair, output: bytes, **change: object) -> SignedAnswer:
    fields: dict[str, object] = {
        "session": b"session-" + signer.peer_id.to_bytes()[-4:],
        "step": 2,
        "history": history_digest(INPUTS[:2]),
        "input_digest": digest(INPUTS[2]),
        "output_digest": digest(output),
        "span": SPAN,
        "model": MODEL,
    }
    fields.update(change)
    return SignedAnswer.sign(signer, **fields)  # type: ignore[arg-type]


def honest_witnesses() -> list[SignedAnswer]:
    # honest servers of other dtypes: same question, outputs differing in their bytes
    return [answer(honest_1, TRUE_OUTPUT + b"\x01"), answer(honest_2, TRUE_OUTPUT + b"\x02")]


def accusation(accused: SignedAnswer, output: bytes, **create: object) -> Evidence:
    return Evidence.create(
        client,
        accused,
        honest_witnesses(),
        inputs=INPUTS,
        output=output,
        now=NOW,
        **create,  # type: ignore[arg-type]
    )


def rechecks(*agree: bool) -> list[Recheck]:
    servers = [trusted_1, trusted_2, trusted_3]
    return [Recheck(s.peer_id, a) for s, a in zip(servers, agree, strict=False)]


# -- signed answers ----------------------------------------------------------------------


def test_a_signed_answer_verifies_and_round_trips() -> None:
    signed = answer(cheat, WRONG_OUTPUT)
    signed.verify()
    assert signed.signer == cheat.peer_id
    again = SignedAnswer.from_wire(msgpack.unpackb(msgpack.packb(signed.to_wire())))
    assert again == signed


@pytest.mark.parametrize(
    "change",
    [
        {"step": 3},
        {"span": (4, 9)},
        {"model": "cd" * 32},
        {"output_digest": digest(b"other")},
        {"input_digest": digest(b"other")},
        {"history": EMPTY_HISTORY},
        {"session": b"other"},
    ],
)
def test_the_signature_covers_every_field(change: dict[str, object]) -> None:
    signed = answer(cheat, WRONG_OUTPUT)
    with pytest.raises(InvalidEvidence, match="not signed by"):
        dataclasses.replace(signed, **change).verify()


def test_an_answer_cannot_be_moved_to_another_signer() -> None:
    signed = answer(cheat, WRONG_OUTPUT)
    with pytest.raises(InvalidEvidence):
        dataclasses.replace(signed, signer=honest_1.peer_id).verify()


def test_history_digests_chain_the_inputs() -> None:
    assert history_digest([]) == EMPTY_HISTORY
    one = chain_history(EMPTY_HISTORY, digest(INPUTS[0]))
    assert history_digest(INPUTS[:2]) == chain_history(one, digest(INPUTS[1]))
    assert history_digest(INPUTS[:2]) != history_digest(INPUTS[1::-1])


@pytest.mark.parametrize(
    "change",
    [
        {"session": b"s" * 65},
        {"step": -1},
        {"span": (5, 5)},
        {"span": (0, 2**16 + 1)},
        {"model": "m" * 129},
        {"output_digest": b"short"},
    ],
)
def test_answers_out_of_bounds_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(MalformedEvidence):
        answer(cheat, WRONG_OUTPUT, **change)


# -- creating and parsing evidence ---------------------------------------------------


def test_evidence_round_trips_through_a_dht_record() -> None:
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT)
    assert evidence.inline and evidence.inputs == tuple(INPUTS)
    data = evidence.to_bytes()
    assert len(data) <= EvidenceLimits().max_record_bytes
    again = Evidence.from_bytes(data)
    assert again == evidence and again.evidence_id == evidence.evidence_id
    again.check()
    assert evidence_key(cheat.peer_id) == b"swarm/evidence/" + cheat.peer_id.to_bytes()


def test_large_material_stays_with_the_accuser() -> None:
    limits = EvidenceLimits(max_inline_bytes=100)
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT, limits=limits)
    assert not evidence.inline and evidence.output == b""
    assert judge(evidence, rechecks(False, False), limits=limits).verdict is Verdict.UNDECIDED
    fetched = judge(evidence, rechecks(False, False), material=(INPUTS, WRONG_OUTPUT))
    assert fetched.verdict is Verdict.CONFIRMED
    # the id does not depend on where the material is
    inline = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT)
    assert evidence.evidence_id == inline.evidence_id


@pytest.mark.timeout(10)
def test_evidence_held_by_its_accuser_names_where_to_fetch_it() -> None:
    limits = EvidenceLimits(max_inline_bytes=100)
    addrs = ["/ip4/127.0.0.1/tcp/4001/p2p/" + client.peer_id.to_base58()]
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT, limits=limits, addrs=addrs)
    assert not evidence.inline and evidence.addrs == tuple(addrs)
    again = Evidence.from_bytes(evidence.to_bytes())
    assert again == evidence
    again.check(limits)
    # addresses are hints, not signed: the id names the accusation wherever it is served
    moved = dataclasses.replace(again, addrs=("/ip4/10.0.0.1/tcp/1",))
    assert moved.evidence_id == evidence.evidence_id
    moved.check(limits)
    # inline evidence needs no address
    inline = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT, addrs=addrs)
    assert inline.inline and inline.addrs == ()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "addrs", [["/ip4/127.0.0.1/tcp/1"] * 9, ["/ip4/127.0.0.1/tcp/1" + "0" * 300]]
)
def test_too_many_or_too_long_accuser_addresses_are_refused(addrs: list[str]) -> None:
    limits = EvidenceLimits(max_inline_bytes=100)
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT, limits=limits)
    content = msgpack.unpackb(evidence.to_bytes(), raw=False)
    content["addrs"] = addrs
    with pytest.raises(MalformedEvidence, match="address"):
        Evidence.from_bytes(msgpack.packb(content, use_bin_type=True))
    with pytest.raises(MalformedEvidence, match="address"):
        dataclasses.replace(evidence, addrs=tuple(addrs)).check(limits)


@pytest.mark.parametrize(
    ("witnesses", "match"),
    [
        (lambda: honest_witnesses()[:1], "witnesses"),
        (lambda: [honest_witnesses()[0]] * 2, "distinct"),
        (lambda: [*honest_witnesses()[:1], answer(cheat, b"x")], "distinct"),
        (lambda: [honest_witnesses()[0], answer(honest_2, b"y", step=1)], "another question"),
        (lambda: [honest_witnesses()[0], answer(honest_2, WRONG_OUTPUT)], "very output"),
    ],
)
def test_evidence_that_would_not_hold_is_not_signed(witnesses, match: str) -> None:
    with pytest.raises(InvalidEvidence, match=match):
        Evidence.create(
            client,
            answer(cheat, WRONG_OUTPUT),
            witnesses(),
            inputs=INPUTS,
            output=WRONG_OUTPUT,
            now=NOW,
        )


def test_material_must_match_the_accused_digests() -> None:
    accused = answer(cheat, WRONG_OUTPUT)
    with pytest.raises(InvalidEvidence, match="output"):
        accusation(accused, TRUE_OUTPUT)
    evidence = accusation(accused, WRONG_OUTPUT)
    for inputs, output, match in [
        (INPUTS[:2], WRONG_OUTPUT, "needs 3 inputs"),
        ([INPUTS[1], INPUTS[0], INPUTS[2]], WRONG_OUTPUT, "history"),
        ([*INPUTS[:2], b"other"], WRONG_OUTPUT, "last input"),
    ]:
        with pytest.raises(InvalidEvidence, match=match):
            evidence.check_material(inputs, output)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_malformed_evidence(data: bytes) -> None:
    try:
        Evidence.from_bytes(data)
    except MalformedEvidence:
        pass


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=11) | st.dictionaries(st.text(max_size=9), inner),
    max_leaves=12,
)


GOOD_EVIDENCE = msgpack.unpackb(accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT).to_bytes())


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["accused", "witnesses", "accuser", "created", "inputs", "output", "signature"]
        ),
        wire_values,
    )
)
def test_hostile_evidence_maps_raise_only_evidence_errors(content: dict[str, object]) -> None:
    base = dict(GOOD_EVIDENCE)
    base.update(content)
    try:
        evidence = Evidence.from_bytes(msgpack.packb(base))
    except MalformedEvidence:
        return
    try:
        evidence.check()
    except EvidenceError:
        pass
    assert judge(evidence, rechecks(True, True)).verdict in Verdict


def test_oversized_evidence_is_refused_unparsed() -> None:
    with pytest.raises(MalformedEvidence, match="max_record_bytes=10"):
        Evidence.from_bytes(b"x" * 11, EvidenceLimits(max_record_bytes=10))


# -- verdicts ----------------------------------------------------------------------------


def test_a_true_accusation_is_confirmed_and_lowers_the_accused() -> None:
    evidence = Evidence.from_bytes(accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT).to_bytes())
    judgement = judge(evidence, rechecks(False, False))
    assert judgement.verdict is Verdict.CONFIRMED
    assert judgement.penalised == cheat.peer_id and judgement.event is Event.EVIDENCE_AGAINST
    book = ReputationBook(clock=lambda: NOW)
    assert judgement.penalised is not None and judgement.event is not None
    assert book.record_evidence(judgement.evidence_id, judgement.penalised, judgement.event)
    assert book.is_banned(cheat.peer_id)


def test_a_false_accusation_is_rejected_and_lowers_the_accuser() -> None:
    """A client accuses an honest server whose true answer it claims is wrong."""
    evidence = accusation(answer(cheat, TRUE_OUTPUT), TRUE_OUTPUT)
    judgement = judge(evidence, rechecks(True, True, True))
    assert judgement.verdict is Verdict.REJECTED
    assert judgement.penalised == client.peer_id and judgement.event is Event.FALSE_ACCUSATION


@pytest.mark.parametrize(
    ("checks", "verdict"),
    [
        ([], Verdict.UNDECIDED),
        ([Recheck(trusted_1.peer_id, False)], Verdict.UNDECIDED),
        ([Recheck(trusted_1.peer_id, False)] * 2, Verdict.UNDECIDED),  # one server twice
        ([Recheck(trusted_1.peer_id, False), Recheck(honest_1.peer_id, False)], Verdict.UNDECIDED),
        ([Recheck(trusted_1.peer_id, False), Recheck(cheat.peer_id, True)], Verdict.UNDECIDED),
        ([Recheck(trusted_1.peer_id, False), Recheck(client.peer_id, False)], Verdict.UNDECIDED),
        (rechecks(False, True), Verdict.UNDECIDED),
        (rechecks(False, False, True), Verdict.UNDECIDED),
        (rechecks(False, False, False), Verdict.CONFIRMED),
    ],
)
def test_only_unanimous_independent_rechecks_decide(checks, verdict: Verdict) -> None:
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT)
    judgement = judge(evidence, checks)
    assert judgement.verdict is verdict
    if verdict is Verdict.UNDECIDED:
        assert judgement.penalised is None and judgement.event is None


def test_tampered_evidence_costs_its_accuser() -> None:
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT)
    witness = evidence.witnesses[0]
    forged_witness = dataclasses.replace(witness, output_digest=digest(b"made up"))
    # the accuser re-signs evidence around a witness answer it forged
    tampered = dataclasses.replace(evidence, witnesses=(forged_witness, evidence.witnesses[1]))
    resigned = dataclasses.replace(tampered, signature=client.sign(tampered.signed()))
    judgement = judge(resigned, rechecks(False, False))
    assert judgement.verdict is Verdict.REJECTED and judgement.penalised == client.peer_id
    # wrong material from the accuser
    wrong = judge(evidence, rechecks(False, False), material=(INPUTS, TRUE_OUTPUT))
    assert wrong.verdict is Verdict.REJECTED and wrong.penalised == client.peer_id


def test_evidence_with_a_broken_accuser_signature_blames_nobody() -> None:
    """Anyone could have made it: framing the named accuser must not work either."""
    evidence = accusation(answer(cheat, WRONG_OUTPUT), WRONG_OUTPUT)
    forged = dataclasses.replace(evidence, created=NOW + 1)
    with pytest.raises(InvalidEvidence, match="accuser"):
        forged.check()
    judgement = judge(forged, rechecks(True, True))
    assert judgement.verdict is Verdict.UNDECIDED and judgement.penalised is None
