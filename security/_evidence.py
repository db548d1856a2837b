"""Signed answers, and evidence that convicts a server of a wrong one.

A server signs every step it computes: a ``SignedAnswer`` names the model, the span of
blocks, the step, the digest of the session's history (the inputs of every earlier
step, chained: ``history_digest``), and the sha256 of the step's input and output
bytes exactly as they travelled. A wrong answer so signed is evidence against its
signer: nobody else could have made it.

A client whose spot-checks found a server's answer wrong, against the answers of at
least two other servers (the *witnesses*), packs ``Evidence``: the accused's signed
answer, the witnesses' signed answers to the same question, and the material needed
to recompute (the inputs of steps 0..step and the accused's output) inline when it
fits a DHT record, otherwise held by the accuser for whoever asks (``addrs``: where it
serves it, unsigned hints). The accuser signs it: evidence that does not hold costs its
accuser. It is published in the DHT under
``evidence_key(accused)``, sub-keyed by the accuser's PeerID.

Anyone can check it. ``Evidence.check`` verifies every signature and that all answers
are to one question; ``Evidence.check_material`` that the material matches the
accused's digests; then the verifier recomputes the span on servers it trusts and
``judge`` decides, purely: every trusted recheck disagrees with the accused →
``CONFIRMED`` (the accused is lowered); every one agrees → ``REJECTED`` (the accuser is
lowered); too few or split → ``UNDECIDED`` (nobody is). Evidence that fails its checks
is ``REJECTED`` too, except when the accuser's own signature fails: then nobody can be
blamed and it is ``UNDECIDED``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from ._errors import EvidenceError, InvalidEvidence, InvalidPeerId, MalformedEvidence
from ._keys import KeyPair, verify_signature
from ._peer_id import PeerId
from ._reputation import Event

ANSWER_DOMAIN = b"swarm-signed-answer/1"
EVIDENCE_DOMAIN = b"swarm-evidence/1"
HISTORY_DOMAIN = b"swarm-history/1"
EVIDENCE_KEY_PREFIX = b"swarm/evidence/"
DIGEST_BYTES = 32
EMPTY_HISTORY = bytes(DIGEST_BYTES)
"""The history digest of step 0: nothing came before it."""


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The sha256 of ``data`` (what answers carry for inputs and outputs)."""
    return hashlib.sha256(data).digest()


def chain_history(history: bytes, input_digest: bytes) -> bytes:
    """The history digest after a step whose input had ``input_digest``."""
    return hashlib.sha256(HISTORY_DOMAIN + history + input_digest).digest()


def history_digest(inputs: Iterable[bytes]) -> bytes:
    """The history digest after the steps whose inputs were ``inputs``, in order."""
    history = EMPTY_HISTORY
    for data in inputs:
        history = chain_history(history, digest(data))
    return history


def evidence_key(accused: PeerId) -> bytes:
    """The DHT key under which evidence against ``accused`` is published."""
    return EVIDENCE_KEY_PREFIX + accused.to_bytes()


@dataclass(frozen=True, slots=True)
class EvidenceLimits:
    """Bounds on answers and evidence, and what a verdict needs."""

    max_record_bytes: int = 60 * 1024
    """A serialised piece of evidence (fits ``dht.DhtLimits.max_record_bytes``)."""
    max_inline_bytes: int = 48 * 1024
    """Inputs and output travel inside the evidence only when together under this."""
    max_session_bytes: int = 64
    max_model_chars: int = 128
    max_step: int = 2**32 - 1
    max_block: int = 2**16
    min_witnesses: int = 2
    max_witnesses: int = 4
    min_rechecks: int = 2
    """Trusted recomputations that must all agree before a verdict."""
    max_addrs: int = 8
    max_addr_chars: int = 256
    """Where the accuser serves material that is not inline: so many multiaddrs, so long."""
    max_material_bytes: int = 64 * 1024 * 1024
    """The most material a verifier fetches from an accuser."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_witnesses <= self.max_witnesses:
            raise ValueError("EvidenceLimits needs 1 <= min_witnesses <= max_witnesses")
        if self.min_rechecks < 1:
            raise ValueError("EvidenceLimits.min_rechecks must be at least 1")


_DEFAULT_LIMITS = EvidenceLimits()


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@dataclass(frozen=True, slots=True)
class SignedAnswer:
    """A server's signed statement: "for this question, my output had this digest".

    The question is (``model``, ``span``, ``step``, ``history``, ``input_digest``);
    ``session`` is the signer's own session id (servers asked the same question in a
    spot-check run their own sessions). ``span`` is ``(start, end)``, end exclusive.
    """

    session: bytes
    step: int
    history: bytes
    input_digest: bytes
    output_digest: bytes
    span: tuple[int, int]
    model: str
    signer: PeerId
    signature: bytes

    @classmethod
    def sign(
        cls,
        identity: KeyPair,
        *,
        session: bytes,
        step: int,
        history: bytes,
        input_digest: bytes,
        output_digest: bytes,
        span: tuple[int, int],
        model: str,
        limits: EvidenceLimits = _DEFAULT_LIMITS,
    ) -> SignedAnswer:
        """``identity``'s signed answer (bounds are checked first: ``MalformedEvidence``)."""
        unsigned = cls(
            bytes(session),
            step,
            bytes(history),
            bytes(input_digest),
            bytes(output_digest),
            (span[0], span[1]),
            model,
            identity.peer_id,
            b"",
        )
        unsigned.check_bounds(limits)
        return cls(*unsigned.question_fields(), identity.peer_id, identity.sign(unsigned.signed()))

    def question_fields(self) -> tuple[Any, ...]:
        return (
            self.session,
            self.step,
            self.history,
            self.input_digest,
            self.output_digest,
            self.span,
            self.model,
        )

    @property
    def question(self) -> tuple[str, tuple[int, int], int, bytes, bytes]:
        """What two answers must share to be comparable."""
        return self.model, self.span, self.step, self.history, self.input_digest

    def signed(self) -> bytes:
        """The canonical bytes the signer signs: domain and every field, length-prefixed."""
        return b"".join(
            (
                _field(ANSWER_DOMAIN),
                _field(self.session),
                struct.pack(">Q", self.step),
                _field(self.history),
                _field(self.input_digest),
                _field(self.output_digest),
                struct.pack(">II", *self.span),
                _field(self.model.encode()),
                _field(self.signer.to_bytes()),
            )
        )

    def check_bounds(self, limits: EvidenceLimits = _DEFAULT_LIMITS) -> None:
        """Raise ``MalformedEvidence`` if a field breaks its type or bound."""
        start, end = self.span
        problems = [
            (len(self.session) > limits.max_session_bytes, "session id is too long"),
            (not 0 <= self.step <= limits.max_step, f"step {self.step} is out of range"),
            (not 0 <= start < end <= limits.max_block, f"span {self.span} is not a block span"),
            (len(self.model) > limits.max_model_chars, "model id is too long"),
        ]
        for name in ("history", "input_digest", "output_digest"):
            if len(getattr(self, name)) != DIGEST_BYTES:
                problems.append((True, f"{name} is not a {DIGEST_BYTES}-byte digest"))
        for bad, message in problems:
            if bad:
                raise MalformedEvidence(f"signed answer: {message}")

    def verify(self) -> None:
        """Raise ``InvalidEvidence`` unless ``signer`` signed this answer."""
        if not verify_signature(self.signer.public_key(), self.signed(), self.signature):
            raise InvalidEvidence(
                f"the answer to step {self.step} is not signed by {self.signer} as it claims"
            )

    def to_wire(self) -> list[Any]:
        return [
            self.session,
            self.step,
            self.history,
            self.input_digest,
            self.output_digest,
            self.span[0],
            self.span[1],
            self.model,
            self.signer.to_bytes(),
            self.signature,
        ]

    @classmethod
    def from_wire(cls, fields: Any, limits: EvidenceLimits = _DEFAULT_LIMITS) -> SignedAnswer:
        """Parse ``to_wire``'s list; ``MalformedEvidence`` for anything else."""
        if not isinstance(fields, list | tuple) or len(fields) != 10:
            raise MalformedEvidence("a signed answer is a list of 10 fields")
        session, step, history, inp, out, start, end, model, signer, signature = fields
        byte_fields = (session, history, inp, out, signer, signature)
        if not all(isinstance(f, bytes) for f in byte_fields):
            raise MalformedEvidence("a signed answer's ids, digests and signature are bytes")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (step, start, end)):
            raise MalformedEvidence("a signed answer's step and span are integers")
        if not isinstance(model, str) or len(signature) > 128:
            raise MalformedEvidence("a signed answer's model id is text, its signature short")
        try:
            peer = PeerId.from_bytes(signer)
        except InvalidPeerId as exc:
            raise MalformedEvidence(f"a signed answer's signer: {exc}") from None
        answer = cls(session, step, history, inp, out, (start, end), model, peer, signature)
        answer.check_bounds(limits)
        return answer


@dataclass(frozen=True, slots=True)
class Evidence:
    """An accuser's signed claim that ``accused`` answered wrongly, with what proves it.

    ``inputs`` (the inputs of steps 0..step) and ``output`` (the accused's output) are
    inline when they fit ``EvidenceLimits.max_inline_bytes``, otherwise empty: the
    accuser holds them, serves them at ``addrs`` (its multiaddrs, ending in its PeerID;
    not signed: a fetch authenticates the accuser itself) and ``check_material`` checks
    them once fetched.
    """

    accused: SignedAnswer
    witnesses: tuple[SignedAnswer, ...]
    accuser: PeerId
    created: float
    inputs: tuple[bytes, ...]
    output: bytes
    signature: bytes
    addrs: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        identity: KeyPair,
        accused: SignedAnswer,
        witnesses: Sequence[SignedAnswer],
        *,
        inputs: Sequence[bytes],
        output: bytes,
        now: float,
        addrs: Sequence[str] = (),
        limits: EvidenceLimits = _DEFAULT_LIMITS,
    ) -> Evidence:
        """Sign evidence as ``identity``; raises ``EvidenceError`` if it would not hold.

        ``inputs`` are the session's inputs of steps 0..``accused.step``, ``output`` the
        accused's output bytes; both go inline if they fit, else ``addrs`` (where the
        accuser serves them) go instead.
        """
        inline = sum(map(len, inputs)) + len(output) <= limits.max_inline_bytes
        unsigned = cls(
            accused,
            tuple(witnesses),
            identity.peer_id,
            float(now),
            tuple(bytes(i) for i in inputs) if inline else (),
            bytes(output) if inline else b"",
            b"",
        )
        unsigned._check_claims(limits)
        unsigned.check_material(inputs, output)
        evidence = cls(*unsigned._fields()[:-1], identity.sign(unsigned.signed()))
        if len(evidence.to_bytes()) > limits.max_record_bytes:
            evidence = cls(*evidence._fields()[:4], (), b"", evidence.signature)
        if not evidence.inline:
            evidence = cls(*evidence._fields(), tuple(addrs)[: limits.max_addrs])
            evidence._check_addrs(limits)
        return evidence

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.accused,
            self.witnesses,
            self.accuser,
            self.created,
            self.inputs,
            self.output,
            self.signature,
        )

    @property
    def inline(self) -> bool:
        """Whether the material to recompute travels inside the evidence."""
        return bool(self.inputs)

    def signed(self) -> bytes:
        """The canonical bytes the accuser signs (the material is bound by the digests)."""
        answers = [self.accused, *self.witnesses]
        return b"".join(
            (
                _field(EVIDENCE_DOMAIN),
                len(answers).to_bytes(4, "big"),
                *(_field(a.signed()) + _field(a.signature) for a in answers),
                _field(self.accuser.to_bytes()),
                struct.pack(">d", self.created),
            )
        )

    @property
    def evidence_id(self) -> bytes:
        """Names this accusation (inline or not): the sha256 of what the accuser signed."""
        return digest(self.signed())

    def check(self, limits: EvidenceLimits = _DEFAULT_LIMITS) -> None:
        """Verify the accuser's signature, then every claim; raise ``InvalidEvidence``."""
        if not verify_signature(self.accuser.public_key(), self.signed(), self.signature):
            raise InvalidEvidence(f"evidence is not signed by its accuser {self.accuser}")
        self._check_claims(limits)

    def _check_claims(self, limits: EvidenceLimits) -> None:
        accused = self.accused
        witnesses = self.witnesses
        if not limits.min_witnesses <= len(witnesses) <= limits.max_witnesses:
            raise InvalidEvidence(
                f"evidence has {len(witnesses)} witnesses, EvidenceLimits asks for "
                f"{limits.min_witnesses}..{limits.max_witnesses}"
            )
        signers = {w.signer for w in witnesses}
        if len(signers) != len(witnesses) or accused.signer in signers:
            raise InvalidEvidence("witnesses must be distinct servers other than the accused")
        if self.accuser == accused.signer:
            raise InvalidEvidence("a server cannot accuse itself")
        for answer in (accused, *witnesses):
            answer.check_bounds(limits)
            answer.verify()
        for witness in witnesses:
            if witness.question != accused.question:
                raise InvalidEvidence(
                    f"witness {witness.signer} answered another question than the accused"
                )
            if witness.output_digest == accused.output_digest:
                raise InvalidEvidence(f"witness {witness.signer} gave the accused's very output")
        if not math.isfinite(self.created):
            raise InvalidEvidence("evidence creation time is not finite")
        self._check_addrs(limits)

    def _check_addrs(self, limits: EvidenceLimits) -> None:
        if len(self.addrs) > limits.max_addrs or any(
            len(a) > limits.max_addr_chars for a in self.addrs
        ):
            raise MalformedEvidence(
                f"evidence names {len(self.addrs)} accuser addresses, EvidenceLimits allows "
                f"{limits.max_addrs} of up to {limits.max_addr_chars} characters"
            )

    def check_material(self, inputs: Sequence[bytes], output: bytes) -> None:
        """Raise ``InvalidEvidence`` unless ``inputs`` (steps 0..step) and ``output``
        are what the accused's answer committed to."""
        accused = self.accused
        if len(inputs) != accused.step + 1:
            raise InvalidEvidence(
                f"step {accused.step} needs {accused.step + 1} inputs, got {len(inputs)}"
            )
        if history_digest(inputs[:-1]) != accused.history:
            raise InvalidEvidence("the inputs do not chain to the accused's history digest")
        if digest(inputs[-1]) != accused.input_digest:
            raise InvalidEvidence("the last input is not the one the accused answered")
        if digest(output) != accused.output_digest:
            raise InvalidEvidence("the output is not the one the accused signed")

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "accused": self.accused.to_wire(),
                "witnesses": [w.to_wire() for w in self.witnesses],
                "accuser": self.accuser.to_bytes(),
                "created": self.created,
                "inputs": list(self.inputs),
                "output": self.output,
                "signature": self.signature,
                "addrs": list(self.addrs),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes, limits: EvidenceLimits = _DEFAULT_LIMITS) -> Evidence:
        """Parse evidence from a DHT record; ``MalformedEvidence`` for anything else."""
        if len(data) > limits.max_record_bytes:
            raise MalformedEvidence(
                f"evidence of {len(data)} bytes exceeds "
                f"EvidenceLimits.max_record_bytes={limits.max_record_bytes}"
            )
        try:
            content = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise MalformedEvidence(f"evidence is not msgpack: {exc}") from None
        if not isinstance(content, dict):
            raise MalformedEvidence("evidence is a map")
        witnesses = content.get("witnesses")
        inputs = content.get("inputs")
        created = content.get("created")
        output = content.get("output")
        signature = content.get("signature")
        addrs = content.get("addrs", [])
        if (
            not isinstance(addrs, list)
            or len(addrs) > limits.max_addrs
            or not all(isinstance(a, str) and len(a) <= limits.max_addr_chars for a in addrs)
        ):
            raise MalformedEvidence("evidence's accuser addresses are a short list of text")
        if not isinstance(witnesses, list) or len(witnesses) > limits.max_witnesses:
            raise MalformedEvidence("evidence's witnesses are a short list")
        if not isinstance(inputs, list) or not all(isinstance(i, bytes) for i in inputs):
            raise MalformedEvidence("evidence's inputs are a list of bytes")
        if not isinstance(created, float | int) or isinstance(created, bool):
            raise MalformedEvidence("evidence's creation time is a number")
        if not isinstance(output, bytes) or not isinstance(signature, bytes):
            raise MalformedEvidence("evidence's output and signature are bytes")
        try:
            accuser = PeerId.from_bytes(content.get("accuser"))
        except (InvalidPeerId, TypeError) as exc:
            raise MalformedEvidence(f"evidence's accuser: {exc}") from None
        return cls(
            SignedAnswer.from_wire(content.get("accused"), limits),
            tuple(SignedAnswer.from_wire(w, limits) for w in witnesses),
            accuser,
            float(created),
            tuple(inputs),
            output,
            signature,
            tuple(addrs),
        )


class Verdict(Enum):
    """What a verifier concludes from a piece of evidence."""

    CONFIRMED = "confirmed"
    """The accused answered wrongly: lower the accused."""
    REJECTED = "rejected"
    """The accusation does not hold: lower the accuser."""
    UNDECIDED = "undecided"
    """Not enough to blame anyone (yet)."""


@dataclass(frozen=True, slots=True)
class Recheck:
    """One trusted server's recomputation of the accused's question: whether its output
    agrees with the accused's (within the tolerance the two servers' dtypes allow)."""

    server: PeerId
    agrees_with_accused: bool


@dataclass(frozen=True, slots=True)
class Judgement:
    """A verdict, whom it lowers and with which event (``ReputationBook.record_evidence``)."""

    verdict: Verdict
    evidence_id: bytes
    penalised: PeerId | None
    event: Event | None
    reason: str


def judge(
    evidence: Evidence,
    rechecks: Iterable[Recheck],
    *,
    material: tuple[Sequence[bytes], bytes] | None = None,
    limits: EvidenceLimits = _DEFAULT_LIMITS,
) -> Judgement:
    """Decide on ``evidence`` given trusted servers' ``rechecks``; no I/O.

    ``material`` is (inputs, output) fetched from the accuser when the evidence is not
    inline. Rechecks by the accused, the accuser or a witness do not count, nor a
    second one by the same server; the caller picks trusted servers (different IP
    groups, good standing) to recompute.
    """
    ident = evidence.evidence_id
    accuser, accused = evidence.accuser, evidence.accused.signer

    def blame(peer: PeerId, event: Event, reason: str, verdict: Verdict) -> Judgement:
        return Judgement(verdict, ident, peer, event, reason)

    if not verify_signature(accuser.public_key(), evidence.signed(), evidence.signature):
        return Judgement(Verdict.UNDECIDED, ident, None, None, "the accuser's signature fails")
    try:
        evidence.check(limits)
        if material is None and not evidence.inline:
            return Judgement(Verdict.UNDECIDED, ident, None, None, "the material is not at hand")
        inputs, output = material if material is not None else (evidence.inputs, evidence.output)
        evidence.check_material(inputs, output)
    except EvidenceError as exc:
        return blame(
            accuser, Event.FALSE_ACCUSATION, f"the evidence fails: {exc}", Verdict.REJECTED
        )
    excluded = {accuser, accused, *(w.signer for w in evidence.witnesses)}
    counted: dict[PeerId, bool] = {}
    for recheck in rechecks:
        if recheck.server not in excluded:
            counted.setdefault(recheck.server, recheck.agrees_with_accused)
    if len(counted) < limits.min_rechecks:
        return Judgement(
            Verdict.UNDECIDED,
            ident,
            None,
            None,
            f"{len(counted)} independent rechecks, EvidenceLimits.min_rechecks="
            f"{limits.min_rechecks} needed",
        )
    agreeing = sum(counted.values())
    if agreeing == 0:
        reason = f"{len(counted)} trusted servers all disagree with the accused"
        return blame(accused, Event.EVIDENCE_AGAINST, reason, Verdict.CONFIRMED)
    if agreeing == len(counted):
        reason = f"{len(counted)} trusted servers all agree with the accused"
        return blame(accuser, Event.FALSE_ACCUSATION, reason, Verdict.REJECTED)
    return Judgement(
        Verdict.UNDECIDED,
        ident,
        None,
        None,
        f"trusted servers split: {agreeing} of {len(counted)} agree with the accused",
    )
