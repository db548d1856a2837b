"""Signed answers on the wire, and evidence a client publishes, serves and rechecks.

A server's ``out`` message, forward reply and backward reply carry ``answer``: its
``SignedAnswer`` (``security._evidence``) over what it received and sent. ``answer_of``
checks one on receipt: present, signed by the hop's server, for the hop's span and model,
over the very output bytes the client got (and the input bytes it sent, where it sent
them). A missing one is ``UnsignedAnswer``, anything else wrong ``BadAnswer``: both are
``ServerError``, which fails the hop over (and bans its server) like any answer of the
server's making.

Checkers answer a session step's very question: ``forward_steps`` replays the session's
steps on another server (each step's input bytes as the session received them, encoded by
``encode_steps``), which signs the same (span, step, history digest, input digest) as the
session's server did, over the output bytes of the last step.

A client that caught a server cheating at step k, with two checkers' signed answers to the
same question, makes ``Evidence`` (``accuse``: the inputs of steps 0..k, the accused's
signed answer, the witnesses') and publishes it under ``evidence_key(accused)``
(``publish``). Material too large for the record stays with the accuser, which serves it
on ``EVIDENCE_PROTOCOL`` by evidence id (``MaterialDesk``); a verifier fetches it
(``fetch_material``: the call authenticates the accuser, the digests the material), then
recomputes the accused's question on servers it trusts (``_spotcheck.recheck``) and lets
``security.judge`` decide whom to lower.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dht import DHT
from p2p import Host, P2PError, RemoteError, RpcContext, RpcError, RpcReply
from security import (
    Evidence,
    EvidenceError,
    EvidenceLimits,
    KeyPair,
    PeerId,
    SignedAnswer,
    digest,
    evidence_key,
    history_digest,
)
from transport import Multiaddr, MultiaddrError

from ._errors import MalformedTensor, ShardError
from ._limits import WireLimits
from ._server_errors import ServerError, remote_error
from ._server_protocol import FORWARD_PROTOCOL, pack_tensors, unpack_tensors
from ._wire import Compression, _parse_header, _payload_bytes

if TYPE_CHECKING:
    from ._client_chain import Hop, RemoteChain

_log = logging.getLogger("model_shards.evidence")

ANSWER_FIELD = "answer"
BACKWARD_SESSION = b"backward"
"""The session a backward answer signs: neither a session id (16 bytes) nor a forward's."""
EVIDENCE_PROTOCOL = "/swarm/evidence/1.0.0"
"""An accuser serves the material of its evidence: ``{"id": evidence_id}`` ->
``{"inputs": [sizes], "output": size}`` with the bytes as the payload."""
KEPT_ANSWERS = 8
"""Signed answers a client keeps per hop (the latest ones)."""
PUBLISH_TIMEOUT_S = 2.0
"""The longest a generation waits to publish evidence (best effort)."""
FETCH_TIMEOUT_S = 10.0
"""The longest a verifier waits for an accuser's material."""
EVIDENCE_TTL_S = 24 * 3600.0
"""How long published evidence lives in the DHT."""
HELD_MATERIAL = 16
"""Pieces of material an accuser serves (the latest ones)."""


class UnsignedAnswer(ServerError):
    """A server's answer carries no signed answer (every server signs each one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, remote_code="unsigned_answer")


class BadAnswer(ServerError):
    """A server's signed answer does not verify, or signs something else than it sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, remote_code="bad_answer")


def host_identity(host: Host) -> KeyPair:
    """The key pair ``host`` runs as (it signs answers and evidence)."""
    return host.identity


def answer_of(
    value: dict[str, Any],
    hop: Hop,
    model_id: str,
    output: bytes | memoryview | None,
    *,
    session: bytes | None = None,
    input_digest: bytes | None = None,
    step: int | None = None,
    history: bytes | None = None,
) -> SignedAnswer:
    """The ``SignedAnswer`` an answer carries, checked against what the client knows;
    ``UnsignedAnswer`` when it carries none, ``BadAnswer`` when it does not hold."""
    raw = value.get(ANSWER_FIELD)
    peer = hop.peer_id
    if raw is None:
        raise UnsignedAnswer(f"{peer} sent an answer without its signature; it is failed over")
    try:
        answer = SignedAnswer.from_wire(raw)
        answer.verify()
    except EvidenceError as e:
        raise BadAnswer(f"{peer} signed its answer badly: {e}") from e
    problems = [
        (answer.signer != peer, f"it is signed by {answer.signer}"),
        (answer.span != (hop.start, hop.end), f"it is for blocks {answer.span}"),
        (answer.model != model_id, "it is for another model"),
        (answer.output_digest != digest(output or b""), "it signs other output bytes"),
        (session is not None and answer.session != session, "it names another session"),
        (
            input_digest is not None and answer.input_digest != input_digest,
            "it signs other input bytes than were sent",
        ),
        (step is not None and answer.step != step, f"it names step {answer.step}"),
        (history is not None and answer.history != history, "it chains another history"),
    ]
    for bad, message in problems:
        if bad:
            raise BadAnswer(f"{peer}'s signed answer does not match: {message}")
    return answer


@dataclass(frozen=True, slots=True)
class Exchange:
    """One signed step of a hop: the server's answer and the bytes it answered about."""

    answer: SignedAnswer
    input: bytes | None
    """The step's bytes as sent, hidden states [, mask] (None: pushed by the previous
    server)."""
    output: bytes


def encode_steps(
    prefix: torch.Tensor,
    steps: Sequence[int],
    dtype: torch.dtype,
    compression: Compression,
    mask: torch.Tensor | None = None,
) -> list[bytes]:
    """Each step of ``prefix`` ``[batch, sum(steps), hidden]`` as a client sends it to a
    server computing in ``dtype``: the hidden states' wire form, then the step's mask's
    when ``mask`` (``[batch, sum(steps)]``) pads any of its positions (what the server's
    answer digests)."""
    encoded = []
    offset = 0
    for length in steps:
        tensors = [prefix[:, offset : offset + length].to(dtype)]
        if mask is not None:
            step_mask = mask[:, offset : offset + length] != 0
            if not bool(step_mask.all()):
                tensors.append(step_mask)
        encoded.append(pack_tensors(tensors, compression)[1])
        offset += length
    return encoded


def split_step(data: bytes, limits: WireLimits | None = None) -> list[bytes]:
    """The wire forms one step's bytes hold, in order (hidden states [, mask]);
    ``MalformedTensor`` unless they are one or two whole tensors."""
    limits = limits or WireLimits()
    view = memoryview(data)
    parts = []
    offset = 0
    while offset < len(view) and len(parts) < 2:
        size = _wire_size(view[offset:], limits)
        parts.append(bytes(view[offset : offset + size]))
        offset += size
    if not parts or offset != len(view):
        raise MalformedTensor(f"a step of {len(view)} bytes is not one or two wire tensors")
    return parts


def _wire_size(view: memoryview, limits: WireLimits) -> int:
    """The length of the wire tensor ``view`` starts with (``_wire``'s layout)."""
    if len(view) < 4:
        raise MalformedTensor(f"{len(view)} bytes are shorter than a tensor's length prefix")
    header_len = int.from_bytes(view[:4], "big")
    if header_len > limits.max_header_bytes or 4 + header_len > len(view):
        raise MalformedTensor(f"a tensor header of {header_len} bytes does not fit")
    dtype, shape, compression, block = _parse_header(view[4 : 4 + header_len], limits)
    return 4 + header_len + _payload_bytes(dtype, math.prod(shape), compression, block)


async def forward_steps(
    chain: RemoteChain, hop: Hop, inputs: Sequence[bytes]
) -> tuple[torch.Tensor, SignedAnswer]:
    """Replay a session's steps (``inputs``: each step's bytes as the session received
    them, hidden states [, mask]) on ``hop``'s server: its output of every position, and
    its signed answer to the question of the last step (checked: ``UnsignedAnswer``,
    ``BadAnswer``)."""
    sizes = [len(t) for step in inputs for t in split_step(step, chain.limits.wire)]
    request = {
        "model": chain.model_id,
        "start": hop.start,
        "end": hop.end,
        "tensors": sizes,
        "compression": chain.compression.value,
        "steps": len(inputs),
    }
    payload = b"".join(inputs)
    try:
        reply = await chain.host.rpc_call(
            hop.peer_id,
            FORWARD_PROTOCOL,
            request,
            payload,
            timeout=chain.limits.call_timeout_s,
        )
    except RemoteError as e:
        raise remote_error({"error": e.code, "message": e.message}, hop.peer_id) from None
    value = reply.value
    view = None if reply.payload is None else memoryview(reply.payload).cast("B")
    try:
        if not isinstance(value, dict):
            raise ShardError(f"answer is a {type(value).__name__}, not a map")
        parts = unpack_tensors(value.get("tensors"), view, chain.limits.wire, count=range(1, 3))
    except ShardError as e:
        raise BadAnswer(f"{hop.peer_id} answered badly: {e}") from e
    last = value["tensors"][-1]
    signed = b"" if view is None else view[len(view) - last :]
    answer = answer_of(
        value,
        hop,
        chain.model_id,
        signed,
        session=b"",
        input_digest=digest(inputs[-1]),
        step=len(inputs) - 1,
        history=history_digest(inputs[:-1]),
    )
    return torch.cat([p.to(torch.float32) for p in parts], dim=1), answer


def accuse(
    identity: KeyPair,
    accused: Exchange,
    witnesses: Sequence[SignedAnswer],
    *,
    inputs: Sequence[bytes],
    addrs: Sequence[str] = (),
) -> Evidence | None:
    """Evidence that ``accused`` answered its step wrongly, or None (logged) when the
    material does not make it: ``inputs`` (steps 0..step, as the accused received them)
    that do not chain to its signed answer, or fewer than two witnesses to its very
    question. ``addrs``: where this client serves material too large to go inline."""
    answer = accused.answer
    question = [w for w in witnesses if w.question == answer.question]
    if len(question) < 2:
        _log.info(
            "no evidence against %s: %d witnesses to its step %d",
            answer.signer.short(),
            len(question),
            answer.step,
        )
        return None
    try:
        return Evidence.create(
            identity,
            answer,
            question[:2],
            inputs=inputs,
            output=accused.output,
            now=time.time(),
            addrs=addrs,
        )
    except EvidenceError as e:
        _log.info("no evidence against %s at step %d: %s", answer.signer.short(), answer.step, e)
        return None


class MaterialDesk:
    """The material of the evidence this Host published that does not go inline, served
    on ``EVIDENCE_PROTOCOL`` (the latest ``HELD_MATERIAL`` pieces); ``desk_of``."""

    def __init__(self) -> None:
        self._held: OrderedDict[bytes, tuple[tuple[bytes, ...], bytes]] = OrderedDict()

    def hold(self, evidence: Evidence, inputs: Sequence[bytes], output: bytes) -> None:
        self._held[evidence.evidence_id] = (tuple(inputs), output)
        while len(self._held) > HELD_MATERIAL:
            self._held.popitem(last=False)

    async def serve(self, ctx: RpcContext, request: Any, payload: memoryview | None) -> RpcReply:
        ident = request.get("id") if isinstance(request, dict) else None
        held = self._held.get(ident) if isinstance(ident, bytes) else None
        if held is None:
            raise RpcError("not_found", "no material for this evidence id is held here")
        inputs, output = held
        return RpcReply(
            {"inputs": [len(i) for i in inputs], "output": len(output)},
            b"".join([*inputs, output]),
        )


_DESKS: weakref.WeakKeyDictionary[Host, MaterialDesk] = weakref.WeakKeyDictionary()


def desk_of(host: Host) -> MaterialDesk:
    """``host``'s material desk, serving ``EVIDENCE_PROTOCOL`` from its first use."""
    desk = _DESKS.get(host)
    if desk is None:
        desk = _DESKS[host] = MaterialDesk()
        host.add_rpc_handler(EVIDENCE_PROTOCOL, desk.serve)
    return desk


async def fetch_material(
    host: Host,
    evidence: Evidence,
    *,
    limits: EvidenceLimits | None = None,
    timeout: float = FETCH_TIMEOUT_S,
) -> tuple[list[bytes], bytes] | None:
    """The material of ``evidence`` that is not inline, fetched from its accuser (dialled
    at its ``addrs``, the connection authenticating the accuser); None (logged) when it
    cannot be had. It is not checked here: ``judge`` checks it against the accused's
    digests, and blames the accuser for material of its own serving that does not hold."""
    limits = limits or EvidenceLimits()
    accuser = evidence.accuser
    targets: list[PeerId | Multiaddr] = []
    for text in evidence.addrs:
        try:
            addr = Multiaddr.from_string(text)
        except MultiaddrError:
            continue
        if addr.peer_id in (None, accuser):
            targets.append(addr.with_p2p(accuser))
    targets.append(accuser)
    for target in targets:
        try:
            async with asyncio.timeout(timeout):
                reply = await host.rpc_call(target, EVIDENCE_PROTOCOL, {"id": evidence.evidence_id})
        except (P2PError, TimeoutError, OSError) as e:
            _log.info("no material for evidence from %s at %s: %s", accuser.short(), target, e)
            continue
        return _material_of(reply, limits)
    return None


def _material_of(reply: RpcReply, limits: EvidenceLimits) -> tuple[list[bytes], bytes] | None:
    value = reply.value
    data = bytes(reply.payload or b"")
    sizes = value.get("inputs") if isinstance(value, dict) else None
    out = value.get("output") if isinstance(value, dict) else None
    if (
        not isinstance(sizes, list)
        or not all(type(s) is int and s >= 0 for s in sizes)
        or type(out) is not int
        or out < 0
        or sum(sizes) + out != len(data)
        or len(data) > limits.max_material_bytes
    ):
        _log.info("the accuser's material is malformed (%d bytes)", len(data))
        return None
    inputs = []
    offset = 0
    for size in sizes:
        inputs.append(data[offset : offset + size])
        offset += size
    return inputs, data[offset:]


async def publish(dht: DHT, evidence: Evidence, *, timeout: float = PUBLISH_TIMEOUT_S) -> bool:
    """Store ``evidence`` under the accused's evidence key, sub-keyed by the accuser (the
    DHT's own identity); whether a node took it. Best effort: failures are logged."""
    key = evidence_key(evidence.accused.signer)
    try:
        async with asyncio.timeout(timeout):
            stored = await dht.store(
                key,
                evidence.to_bytes(),
                time.time() + EVIDENCE_TTL_S,
                subkey=evidence.accuser.to_bytes(),
            )
    except (P2PError, TimeoutError, OSError, ValueError) as e:
        _log.info("could not publish evidence against %s: %s", evidence.accused.signer, e)
        return False
    _log.info("published evidence against %s (%d nodes)", evidence.accused.signer.short(), stored)
    return stored > 0


async def read_evidence(dht: DHT, accused: PeerId) -> list[Evidence]:
    """Every well-formed piece of evidence published against ``accused``."""
    found = await dht.get(evidence_key(accused), latest=True)
    if not isinstance(found, dict):
        return []
    pieces = []
    for subkey, record in found.items():
        try:
            pieces.append(Evidence.from_bytes(record.value))
        except EvidenceError as e:
            _log.info("malformed evidence under %s: %s", subkey.hex()[:16], e)
    return pieces
