"""Signed answers on the wire, and evidence a client publishes and rechecks.

A server's ``out`` message and forward reply carry ``answer``: its ``SignedAnswer``
(``security._evidence``) over what it received and sent. ``answer_of`` checks one on
receipt: signed by the hop's server, for the hop's span and model, over the very output
bytes the client got (and the input bytes it sent, where it sent them). Anything wrong is
a ``ServerError``, which fails the hop over like any answer of the server's making.

A client that caught a server cheating, with two checkers' signed forward answers to the
same question, publishes ``Evidence`` under ``evidence_key(accused)`` (``publish``); any
other client reads it (``read_evidence``), recomputes the accused's question on servers it
trusts (``recheck``) and lets ``security.judge`` decide whom to lower.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dht import DHT
from p2p import Host, P2PError
from security import Evidence, EvidenceError, KeyPair, PeerId, SignedAnswer, digest, evidence_key

from ._server_errors import ServerError

if TYPE_CHECKING:
    from ._client_chain import Hop

_log = logging.getLogger("model_shards.evidence")

ANSWER_FIELD = "answer"
KEPT_ANSWERS = 8
"""Signed answers a client keeps per hop (the latest ones)."""
PUBLISH_TIMEOUT_S = 2.0
"""The longest a generation waits to publish evidence (best effort)."""
EVIDENCE_TTL_S = 24 * 3600.0
"""How long published evidence lives in the DHT."""


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
) -> SignedAnswer | None:
    """The ``SignedAnswer`` an answer carries, checked against what the client knows
    (None when it carries none: an older server); ``ServerError`` when it does not hold."""
    raw = value.get(ANSWER_FIELD)
    if raw is None:
        return None
    peer = hop.peer_id
    try:
        answer = SignedAnswer.from_wire(raw)
        answer.verify()
    except EvidenceError as e:
        raise ServerError(f"{peer} signed its answer badly: {e}", remote_code="bad_answer") from e
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
    ]
    for bad, message in problems:
        if bad:
            raise ServerError(
                f"{peer}'s signed answer does not match: {message}", remote_code="bad_answer"
            )
    return answer


@dataclass(frozen=True, slots=True)
class Exchange:
    """One signed step of a hop: the server's answer and the bytes it answered about."""

    answer: SignedAnswer
    input: bytes | None
    """The hidden states' bytes as sent (None: pushed by the previous server)."""
    output: bytes


def accuse(
    identity: KeyPair,
    accused: Exchange,
    witnesses: Sequence[SignedAnswer],
    *,
    previous: Exchange | None = None,
) -> Evidence | None:
    """Evidence that ``accused`` answered its first step wrongly, or None (logged) when
    the material does not make it: a later step (the checkers answered the whole prefix,
    another question), an input the client did not see, or fewer than two witnesses to
    the very question. ``previous`` is the previous hop's exchange (its output was the
    accused's input when pushed)."""
    answer = accused.answer
    question = [w for w in witnesses if w.question == answer.question]
    data = accused.input
    if data is None and previous is not None and digest(previous.output) == answer.input_digest:
        data = previous.output
    if answer.step != 0 or data is None or len(question) < 2:
        _log.info(
            "no evidence against %s: step %d, input %s, %d witnesses to its question",
            answer.signer.short(),
            answer.step,
            "known" if data is not None else "unknown",
            len(question),
        )
        return None
    try:
        return Evidence.create(
            identity, answer, question[:2], inputs=[data], output=accused.output, now=time.time()
        )
    except EvidenceError as e:
        _log.info("no evidence against %s: %s", answer.signer.short(), e)
        return None


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
