"""The replaying forward (``"steps"``) and the evidence material protocol under hostile
values, on a live in-process shard server (``test_server_fuzz``'s ``live`` fixture, here
``served``).

Seeded cases: forwards that replay 1 to 4 steps of hidden states in any float dtype, each
with or without its mask, valid half of the time, else with a hostile ``steps`` count, damaged
sizes, shapes or bytes. Every answer is a result (one or two tensors covering every
position, signed over the last step's question) or a typed error, never ``internal`` and
never a hang; no cache is left reserved. A ``MaterialDesk`` answers hostile requests with
``not_found`` and held material exactly.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
import torch

from model_shards._evidence_wire import EVIDENCE_PROTOCOL, MaterialDesk, split_step
from model_shards._server_protocol import FORWARD_PROTOCOL, pack_tensors, unpack_tensors
from model_shards._wire import Compression, decode_tensor
from p2p import RpcContext, RpcError
from security import Evidence, KeyPair, SignedAnswer, digest, history_digest
from tests.model_shards import test_server_fuzz as fuzz
from tests.model_shards.test_server_fuzz import (
    ANSWER_S,
    HIDDEN,
    LIMITS,
    Hostile,
    Live,
    check_error,
    sendable,
    wire,
)

served = fuzz.live
"""A live shard server of the tiny Llama, a client and an attacker (``test_server_fuzz``)."""
no_errors_logged = fuzz.no_errors_logged
"""Fails a test during which anything logged an error."""

FLOATS = [torch.float32, torch.float32, torch.float16, torch.bfloat16]


def replay_request(hostile: Hostile) -> tuple[dict[str, Any], bytes | None, list[bytes]]:
    """A forward replaying steps: the request, its payload and the steps' bytes (empty when
    the request is hostile)."""
    r = hostile.rng
    live = hostile.live
    base = {"model": live.model_id, "start": 0, "end": 4, "compression": "none"}
    count = r.randint(1, 4)
    batch = r.choice([1, 1, 2])
    if r.random() < 0.5:
        dtype = r.choice(FLOATS)
        steps = []
        for index in range(count):
            tokens = r.randint(1, 3)
            tensors = [torch.randn(batch, tokens, HIDDEN).to(dtype)]
            if r.random() < 0.3:  # a padded step: its mask follows its hidden states
                mask = torch.ones(batch, tokens, dtype=torch.bool)
                mask[0, : r.randint(0, tokens - 1 if index == 0 else tokens)] = False
                tensors.append(mask)
            steps.append(pack_tensors(tensors)[1])
        sizes = [len(t) for step in steps for t in split_step(step)]
        return {**base, "tensors": sizes, "steps": count}, b"".join(steps), steps
    sizes, payload = hostile.tensors(count + r.choice([0, 1]), batch, states=count)
    roll = r.random()
    steps_value: Any = count
    if roll < 0.3:
        steps_value = r.choice([0, -1, count + 1, count + 2, 2**40, "2", None, 1.5, True])
    elif roll < 0.4:
        steps_value = hostile.value()
    request = {**base, "tensors": sizes, "steps": steps_value}
    if r.random() < 0.2:
        request[r.choice(["model", "start", "end", "compression"])] = hostile.value()
    if r.random() < 0.2:
        request["compression"] = r.choice([c.value for c in Compression])
    return request, payload, []


@pytest.mark.timeout(60)
async def test_hostile_replaying_forwards_get_typed_answers(served: Live) -> None:
    live = served
    hostile = Hostile(random.Random(77), live)
    outcomes: Counter[str] = Counter()
    cases = 0
    while cases < 600:
        request, payload, steps = replay_request(hostile)
        if not sendable(request):
            continue
        cases += 1
        try:
            if cases % 8 == 0:
                reply = await live.client.rpc_call(
                    live.peer, FORWARD_PROTOCOL, request, payload, timeout=ANSWER_S
                )
            else:
                ctx = RpcContext(live.client.peer_id, None, FORWARD_PROTOCOL)
                view = None if payload is None else memoryview(payload)
                async with asyncio.timeout(ANSWER_S):
                    reply = await live.server._serve_forward(ctx, wire(request), view)
        except RpcError as e:
            outcomes[check_error(e)] += 1
            continue
        view = memoryview(reply.payload).cast("B")
        sizes = reply.value["tensors"]
        parts = unpack_tensors(sizes, view, LIMITS.wire, count=range(1, 3))
        positions = sum(p.shape[1] for p in parts)
        answer = SignedAnswer.from_wire(reply.value["answer"])
        answer.verify()
        if steps:  # a valid request: the answer is to its last step's question
            assert positions == sum(decode_tensor(split_step(s)[0]).shape[1] for s in steps)
            assert answer.step == len(steps) - 1
            assert answer.history == history_digest(steps[:-1])
            assert answer.input_digest == digest(steps[-1])
        assert answer.output_digest == digest(view[len(view) - sizes[-1] :])
        outcomes["replayed"] += 1
    assert outcomes["replayed"] > 150, outcomes
    assert min(outcomes[c] for c in ("malformed_tensor", "bad_request")) > 20, outcomes
    assert live.server.open_sessions == 0 and live.server.pool.used_bytes == 0


@pytest.mark.timeout(30)
async def test_a_material_desk_serves_only_what_it_holds(served: Live) -> None:
    live = served
    desk = MaterialDesk()
    hostile = Hostile(random.Random(78), live)
    ctx = RpcContext(live.client.peer_id, None, EVIDENCE_PROTOCOL)
    for _ in range(300):
        request = hostile.value()
        if not sendable(request):
            continue
        with pytest.raises(RpcError) as refused:
            await desk.serve(ctx, wire(request), None)
        assert refused.value.code == "not_found"
    # held material comes back whole, by evidence id, over the wire
    live.server.host.add_rpc_handler(EVIDENCE_PROTOCOL, desk.serve)
    inputs, output = [b"step 0", b"", b"step 2"], b"output"
    accused, w1, w2 = (KeyPair.generate() for _ in range(3))

    def signed(key: KeyPair, out: bytes) -> SignedAnswer:
        return SignedAnswer.sign(
            key,
            session=b"",
            step=2,
            history=history_digest(inputs[:2]),
            input_digest=digest(inputs[2]),
            output_digest=digest(out),
            span=(0, 4),
            model=live.model_id,
        )

    evidence = Evidence.create(
        KeyPair.generate(),
        signed(accused, output),
        [signed(w1, b"a"), signed(w2, b"b")],
        inputs=inputs,
        output=output,
        now=1.0,
    )
    desk.hold(evidence, inputs, output)
    reply = await live.client.rpc_call(
        live.peer, EVIDENCE_PROTOCOL, {"id": evidence.evidence_id}, timeout=ANSWER_S
    )
    assert reply.value == {"inputs": [6, 0, 6], "output": 6}
    assert bytes(reply.payload) == b"".join([*inputs, output])
    live.server.host.remove_handler(EVIDENCE_PROTOCOL)
