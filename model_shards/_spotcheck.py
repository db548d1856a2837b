"""Spot-checks: re-run a random share of a hop's steps on independent servers and compare.

After a hop of an inference session answers a step, ``SpotChecker.after_step`` draws
whether to check it (probability ``SpotCheckSettings.rate``; every step when paranoid;
``probation_rate``, by default every step, while the server is on probation in the book).
A check sends the whole prefix that hop has received so far (every step's input, in
order) to an *independent* server of the same blocks with the stateless forward protocol,
and compares the positions of the last step with what the hop returned, within the
tolerance of the two servers' precisions (``_tolerance``). An independent server is
another peer, announced online for those blocks, not banned, in another IP group than the
checked peer and every server already asked, of a precision comparable with theirs;
among those, strict tolerances first, then higher reputation, then a closer precision
(``choose_checkers``).

If the checker agrees, the hop passed. If not, more servers break the tie, one at a time
(up to ``max_answers`` answers): as soon as one agrees with the checked hop, it is
``HONEST`` and every checker that disagreed with both is outvoted (a lying checker); as
soon as two checkers agree with each other against it, it is ``CHEATER``, and its answer is
to be replaced by theirs (``SpotCheck.replacement``). With no two answers agreeing, the
check is ``INCONCLUSIVE`` and nobody is blamed. Outcomes feed the reputation book
(``security.ReputationBook``): ``CHECK_PASSED`` to the deciding majority, ``CHECK_FAILED``
(a ban) to every server outvoted.

``detection_bound(rate, cheat_rate)`` is how many steps a cheater can last: with each step
checked with probability ``r`` and wrong with probability ``c``, a step catches it with
probability ``r*c``, and ``n`` steps miss it with probability ``(1 - r*c)**n``. It is
stated for a server that left probation (checked at ``rate``); one still on probation is
checked at ``probation_rate``, so caught sooner.

``SpotChecker.draw`` draws, ``blocks`` says whether the drawn check must finish before the
step's output is used (paranoid, probation, or ``background`` off), ``check`` runs it: an
inference session (``ChainSession``) runs the others in the background.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from p2p import P2PError
from scheduler import ServerState
from security import Event, Evidence, PeerId, Recheck, ReputationBook, SignedAnswer, ip_group

from ._announce import ServerRecord
from ._client_chain import Hop, RemoteChain, wire_mask
from ._errors import ShardError
from ._evidence_wire import encode_steps, forward_steps, split_step
from ._tolerance import Discrepancy, Precision, Tolerance, discrepancy, tolerance_for
from ._wire import decode_tensor

_log = logging.getLogger("model_shards.spotcheck")

DEFAULT_RATE = 0.05
"""Share of each hop's steps checked by default."""


def detection_bound(rate: float, cheat_rate: float, *, confidence: float = 0.99) -> int:
    """Steps within which a server wrong on ``cheat_rate`` of its steps is caught with
    probability at least ``confidence``, each step checked with probability ``rate``:
    ``ceil(ln(1 - confidence) / ln(1 - rate * cheat_rate))``."""
    if not (0 < rate <= 1 and 0 < cheat_rate <= 1 and 0 < confidence < 1):
        raise ValueError(
            f"need 0 < rate <= 1, 0 < cheat_rate <= 1, 0 < confidence < 1; got rate={rate}, "
            f"cheat_rate={cheat_rate}, confidence={confidence}"
        )
    caught = rate * cheat_rate
    if caught >= 1:
        return 1
    return math.ceil(math.log(1 - confidence) / math.log1p(-caught))


@dataclass(frozen=True, slots=True)
class SpotCheckSettings:
    """How often and against whom a client checks its servers' steps."""

    rate: float = DEFAULT_RATE
    """Probability that a given step of a hop is checked (1.0: paranoid, every step)."""
    probation_rate: float = 1.0
    """The same for a server on probation in the checker's ``ReputationBook`` (it has not
    passed ``ReputationSettings.probation_checks`` checks yet): at 1.0 a newcomer that
    cheats on every step is caught on its first, before any token comes from it. Never
    below ``rate``; with ``rate`` 0 no step is checked at all."""
    distinct_ip_groups: bool = True
    """Checkers must sit in another IP group than the checked server (and each other)."""
    exempt_private_addrs: bool = True
    """Loopback and LAN addresses belong to no group (a home cluster checks itself);
    off in a public swarm, where one operator's /24 must not check itself."""
    max_answers: int = 4
    """Most independent answers gathered for one check: the checker, then tie-breakers
    until two servers agree."""
    max_tries: int = 6
    """Most servers asked for one check, those that failed to answer included."""
    background: bool = True
    """Checks drawn at ``rate`` for a server off probation run in the background of an
    inference session (``ChainSession``): the token does not wait for them, and a cheater
    one catches rewinds the generation to its first corrupted position. Paranoid checks
    (``rate`` 1) and checks of servers on probation always block their step (``blocks``),
    so that no token comes from a step they catch. False: every check blocks."""

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"SpotCheckSettings.rate must be in [0, 1], got {self.rate}")
        if not 0 <= self.probation_rate <= 1:
            raise ValueError(
                f"SpotCheckSettings.probation_rate must be in [0, 1], got {self.probation_rate}"
            )
        if not 1 <= self.max_answers <= self.max_tries:
            raise ValueError(
                f"SpotCheckSettings needs 1 <= max_answers <= max_tries, got "
                f"{self.max_answers}, {self.max_tries}"
            )

    @classmethod
    def paranoid(cls) -> SpotCheckSettings:
        """Every step of every hop is checked."""
        return cls(rate=1.0)


class Verdict(StrEnum):
    """What a spot-check concluded about the checked server's step."""

    HONEST = "honest"
    CHEATER = "cheater"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class SpotCheck:
    """One spot-check's outcome."""

    verdict: Verdict
    checked: PeerId
    checkers: tuple[PeerId, ...]
    """The servers whose answers were compared with the checked one, in order."""
    majority: tuple[PeerId, ...]
    """The servers whose answers agreed and decided the verdict (none if inconclusive)."""
    accused: tuple[PeerId, ...]
    """The servers outvoted: the checked one (``CHEATER``) and any lying checker."""
    discrepancy: Discrepancy | None
    """The checked answer against the first checker's."""
    corrected: torch.Tensor | None = field(default=None, repr=False)
    """With ``CHEATER``: the majority's output for the whole prefix (every step the hop
    ran in this session), in the checked output's dtype: earlier steps of the cheater can
    be compared with it, and the last one replaced (``replacement``)."""
    step_tokens: int = 0
    """Positions of the checked step (the last ones of the prefix)."""
    reason: str = ""
    signed: tuple[SignedAnswer, ...] = ()
    """The checkers' signed answers to their forwards of the prefix (from those that
    sign): with ``CHEATER``, the majority's are the witnesses of ``Evidence``."""

    @property
    def replacement(self) -> torch.Tensor | None:
        """With ``CHEATER``: the majority's output for this step's positions."""
        if self.corrected is None:
            return None
        return self.corrected[:, self.corrected.shape[1] - self.step_tokens :]


@dataclass(slots=True)
class SpotCheckStats:
    """Counts of one checker's outcomes."""

    steps: int = 0
    checks: int = 0
    passed: int = 0
    caught: int = 0
    inconclusive: int = 0
    checker_lies: int = 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A server that could re-run a span, as ``choose_checkers`` ranks it."""

    record: ServerRecord
    precision: Precision
    tolerance: Tolerance
    group: str | None


def precision_of(record: ServerRecord) -> Precision | None:
    """The precision a server announces (None if it names one we hold no tolerance for)."""
    try:
        return Precision.of(record.dtype, record.quantization)
    except ValueError:
        return None


def group_of(record: ServerRecord, *, exempt_private: bool) -> str | None:
    """The IP group of a server's first IP address (None: none, or exempt)."""
    for addr in record.addrs:
        proto, value = addr.components[0]
        if proto in ("ip4", "ip6"):
            return ip_group(value, exempt_private=exempt_private)
    return None


def choose_checkers(
    servers: Mapping[PeerId, ServerRecord],
    start: int,
    end: int,
    checked: Precision,
    *,
    avoid_peers: Sequence[PeerId],
    avoid_groups: Sequence[str | None],
    settings: SpotCheckSettings,
    score: Callable[[PeerId], float] = lambda peer: 0.0,
    banned: Callable[[PeerId], bool] = lambda peer: False,
    rng: random.Random | None = None,
) -> list[Candidate]:
    """The servers that may check blocks ``[start, end)`` computed in ``checked``, best first.

    Left out: servers not online, not covering the span, banned, in ``avoid_peers``, in an
    IP group of ``avoid_groups`` (with ``distinct_ip_groups``), or of a precision whose
    tolerance against ``checked`` cannot tell a cheat (``tolerance_for`` is None). The rest
    are ranked strict tolerances first (they catch every cheat), then by reputation
    (``score``, highest first), then by tolerance (tightest first); ``rng`` shuffles them
    first, so that equals share the work.
    """
    avoid = set(avoid_peers)
    groups = {g for g in avoid_groups if g is not None}
    found = []
    for peer, record in servers.items():
        if (
            peer in avoid
            or record.state != ServerState.ONLINE
            or not record.start <= start < end <= record.end
            or banned(peer)
        ):
            continue
        precision = precision_of(record)
        tolerance = None if precision is None else tolerance_for(checked, precision)
        if precision is None or tolerance is None:
            continue
        group = group_of(record, exempt_private=settings.exempt_private_addrs)
        if settings.distinct_ip_groups and group is not None and group in groups:
            continue
        found.append(Candidate(record, precision, tolerance, group))
    if rng is not None:
        found.sort(key=lambda c: c.record.peer_id)
        rng.shuffle(found)
    found.sort(key=lambda c: (not c.tolerance.strict, -score(c.record.peer_id), c.tolerance.rms))
    return found


class SpotChecker:
    """Spot-checks the steps of a client's inference sessions (use on the client's loop).

    ``book`` (optional) ranks checkers and receives the outcomes; ``rng`` draws which steps
    are checked and shuffles equal checkers (inject a seeded one for reproducible runs).
    """

    def __init__(
        self,
        chain: RemoteChain,
        *,
        settings: SpotCheckSettings | None = None,
        book: ReputationBook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.chain = chain
        self.settings = settings or SpotCheckSettings()
        self.book = book
        self.rng = rng or random.Random()
        self.stats = SpotCheckStats()

    async def after_step(
        self,
        hop: Hop,
        history: Sequence[torch.Tensor],
        output: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        steps: Sequence[int] | None = None,
    ) -> SpotCheck | None:
        """Check this step with probability ``rate_for(hop.peer_id)``; None when it is not
        drawn.

        ``history``: the hidden states sent to ``hop`` at every step of its session so far,
        oldest first, the last being this step's (``[batch, new, hidden]`` each);
        ``output``: what the hop returned for this step; ``mask``: the attention mask of
        the whole prefix ``[batch, tokens]`` (None: no padding); ``steps``: the positions of
        each step of the hop's session, the last being this one's (the checker replays
        them, ``_run_elsewhere``; None: one stateless forward of the prefix).
        """
        if not self.draw(hop.peer_id):
            return None
        return await self.check(hop, history, output, mask=mask, steps=steps)

    def draw(self, peer: PeerId) -> bool:
        """Whether to check a step of ``peer`` just answered (probability ``rate_for``);
        counts the step."""
        self.stats.steps += 1
        return self.rng.random() < self.rate_for(peer)

    def blocks(self, peer: PeerId) -> bool:
        """Whether a check of ``peer``'s step drawn now must finish before the step's
        output is used: with ``background`` off, when paranoid (``rate`` 1), or while the
        book holds ``peer`` on probation; else it may run in the background."""
        settings = self.settings
        return (
            not settings.background
            or settings.rate >= 1
            or (self.book is not None and self.book.on_probation(peer))
        )

    def rate_for(self, peer: PeerId) -> float:
        """How likely a step of ``peer`` is checked: ``settings.probation_rate`` while the
        book holds it on probation (a peer never seen is), else ``settings.rate``; without
        a book, or with checks off (``rate`` 0), ``rate``."""
        settings = self.settings
        if settings.rate == 0 or self.book is None or not self.book.on_probation(peer):
            return settings.rate
        return max(settings.rate, settings.probation_rate)

    async def check(
        self,
        hop: Hop,
        history: Sequence[torch.Tensor],
        output: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        steps: Sequence[int] | None = None,
    ) -> SpotCheck:
        """Check this step now (see ``after_step``)."""
        result = await self._check(hop, history, output, mask, steps)
        self._count(result)
        self._inform(result)
        if result.verdict is not Verdict.HONEST or result.accused:
            wrong = ", ".join(p.short() for p in result.accused) or "nobody"
            # a small swarm often has no independent server: that is worth a debug line only
            level = logging.INFO if result.accused else logging.DEBUG
            _log.log(
                level,
                "spot-check of %s: %s, %s wrong (%s)",
                hop,
                result.verdict,
                wrong,
                result.reason,
            )
        return result

    async def _check(
        self,
        hop: Hop,
        history: Sequence[torch.Tensor],
        output: torch.Tensor,
        mask: torch.Tensor | None,
        steps: Sequence[int] | None,
    ) -> SpotCheck:
        peer = hop.peer_id
        servers = await self.chain.servers()
        record = servers.get(peer)
        checked = None if record is None else precision_of(record)
        if record is None or checked is None:
            return _inconclusive(peer, (), None, "the checked server's precision is not known")
        prefix = torch.cat([h.to(torch.float32) for h in history], dim=1)
        new = history[-1].shape[1]
        inputs = prefix[:, -new:]
        step_mask = None if mask is None else mask[:, -new:] != 0
        claimed = output.to(torch.float32)

        def agree(a: Precision, x: torch.Tensor, b: Precision, y: torch.Tensor) -> bool:
            tolerance = tolerance_for(a, b)
            rounding = a.unit_roundoff + b.unit_roundoff
            return tolerance is not None and discrepancy(
                inputs, x, y, rounding=rounding, mask=step_mask
            ).within(tolerance)

        answers: list[tuple[Candidate, torch.Tensor]] = []
        fulls: list[torch.Tensor] = []
        signed: list[SignedAnswer] = []
        avoid_peers = [peer]
        avoid_groups = [group_of(record, exempt_private=self.settings.exempt_private_addrs)]
        first: Discrepancy | None = None
        tries = 0
        while len(answers) < self.settings.max_answers and tries < self.settings.max_tries:
            got, tried = await self._run_elsewhere(
                servers,
                hop,
                checked,
                prefix,
                mask,
                avoid_peers=avoid_peers,
                avoid_groups=avoid_groups,
                against=[c.precision for c, _ in answers],
                tries=self.settings.max_tries - tries,
                steps=steps,
            )
            tries += tried
            if got is None:
                break
            candidate, full, signature = got
            if signature is not None:
                signed.append(signature)
            answer = full[:, -new:]
            avoid_peers.append(candidate.record.peer_id)
            avoid_groups.append(candidate.group)
            if first is None:
                first = discrepancy(
                    inputs,
                    answer,
                    claimed,
                    rounding=checked.unit_roundoff + candidate.precision.unit_roundoff,
                    mask=step_mask,
                )
            checkers = (*(c.record.peer_id for c, _ in answers), candidate.record.peer_id)
            if agree(candidate.precision, answer, checked, claimed):
                liars = tuple(
                    c.record.peer_id
                    for c, other in answers
                    if not agree(c.precision, other, candidate.precision, answer)
                )
                majority = (peer, candidate.record.peer_id)
                reason = f"agrees with {candidate.record.peer_id.short()}"
                return SpotCheck(
                    Verdict.HONEST,
                    peer,
                    checkers,
                    majority,
                    liars,
                    first,
                    reason=reason,
                    signed=tuple(signed),
                )
            for index, (other_candidate, other) in enumerate(answers):
                if agree(other_candidate.precision, other, candidate.precision, answer):
                    majority = (other_candidate.record.peer_id, candidate.record.peer_id)
                    liars = tuple(
                        c.record.peer_id
                        for c, o in answers
                        if c is not other_candidate
                        and not agree(c.precision, o, candidate.precision, answer)
                    )
                    return SpotCheck(
                        Verdict.CHEATER,
                        peer,
                        checkers,
                        majority,
                        (peer, *liars),
                        first,
                        fulls[index].to(output.dtype),
                        new,
                        reason=f"two servers agree against it ({first})",
                        signed=tuple(signed),
                    )
            answers.append((candidate, answer))
            fulls.append(full)
        checkers = tuple(c.record.peer_id for c, _ in answers)
        reason = "no independent server answered" if not answers else "no two answers agreed"
        return _inconclusive(peer, checkers, first, reason)

    async def _run_elsewhere(
        self,
        servers: Mapping[PeerId, ServerRecord],
        hop: Hop,
        checked: Precision,
        prefix: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        avoid_peers: Sequence[PeerId],
        avoid_groups: Sequence[str | None],
        against: Sequence[Precision],
        tries: int,
        steps: Sequence[int] | None = None,
    ) -> tuple[tuple[Candidate, torch.Tensor, SignedAnswer | None] | None, int]:
        """``prefix`` through ``hop``'s blocks on the best independent server (comparable
        with ``checked`` and every precision ``against``) that answers within ``tries``
        servers, with its signed answer; and how many servers were asked.

        With ``steps`` (the positions of each step of ``hop``'s session, the last being the
        checked one's), the checker replays those steps (``forward_steps``): each step's
        input is encoded as the client sent it to ``hop``, so the checker signs the very
        question ``hop`` answered. Without, it runs one stateless forward."""
        book = self.book
        candidates = choose_checkers(
            servers,
            hop.start,
            hop.end,
            checked,
            avoid_peers=avoid_peers,
            avoid_groups=avoid_groups,
            settings=self.settings,
            score=(lambda p: 0.0) if book is None else book.score,
            banned=lambda p: self.chain.is_banned(p) or (book is not None and book.is_banned(p)),
            rng=self.rng,
        )
        candidates = [c for c in candidates if all(tolerance_for(p, c.precision) for p in against)]
        sent_mask = wire_mask(mask)
        replayed = steps is not None and sum(steps) == prefix.shape[1] and min(steps) >= 1
        inputs = (
            encode_steps(prefix, steps, hop.dtype, self.chain.compression, mask=mask)
            if replayed and steps is not None
            else []
        )
        asked = 0
        for candidate in candidates[:tries]:
            asked += 1
            record = candidate.record
            target = Hop(record.peer_id, hop.start, hop.end, candidate.precision.dtype)
            try:
                if inputs:
                    out, signature = await forward_steps(self.chain, target, inputs)
                else:
                    out, signature = await self.chain.forward_signed(target, prefix, sent_mask)
            except (P2PError, ShardError, TimeoutError) as e:
                _log.info("checker %s failed: %s", record.peer_id.short(), e)
                self._note(record.peer_id, Event.FAILURE)
                continue
            if out.shape != prefix.shape:
                _log.info("checker %s answered a %s", record.peer_id.short(), list(out.shape))
                self._note(record.peer_id, Event.FAILURE)
                continue
            return (candidate, out.to(torch.float32), signature), asked
        return None, asked

    def _note(self, peer: PeerId, event: Event) -> None:
        if self.book is not None:
            self.book.record(peer, event)

    def _count(self, result: SpotCheck) -> None:
        stats = self.stats
        stats.checks += 1
        if result.verdict is Verdict.HONEST:
            stats.passed += 1
        elif result.verdict is Verdict.CHEATER:
            stats.caught += 1
        else:
            stats.inconclusive += 1
        stats.checker_lies += len([p for p in result.accused if p != result.checked])

    def _inform(self, result: SpotCheck) -> None:
        """Feed the outcome to the reputation book: the majority passed a check, every
        server outvoted failed one."""
        for peer in result.majority:
            self._note(peer, Event.CHECK_PASSED)
        for peer in result.accused:
            self._note(peer, Event.CHECK_FAILED)


def _inconclusive(
    peer: PeerId, checkers: tuple[PeerId, ...], found: Discrepancy | None, reason: str
) -> SpotCheck:
    return SpotCheck(Verdict.INCONCLUSIVE, peer, checkers, (), (), found, reason=reason)


async def recheck(
    chain: RemoteChain,
    evidence: Evidence,
    trusted: Sequence[PeerId],
    *,
    material: tuple[Sequence[bytes], bytes] | None = None,
) -> list[Recheck]:
    """The accused's question of ``evidence`` recomputed on the ``trusted`` servers: each
    replays the inputs of steps 0..step (``forward_steps``; inline, or ``material`` fetched
    from the accuser) and signs the accused's very question; whether its output of the last
    step agrees with the accused's, within the tolerance of its precision and the accused's
    announced one. A server that does not answer, answers another question, or whose
    precision is not comparable, gives no recheck (``judge`` then needs others)."""
    if material is None and not evidence.inline:
        return []
    inputs, output = material if material is not None else (evidence.inputs, evidence.output)
    answer = evidence.accused
    try:
        last = [decode_tensor(t) for t in split_step(inputs[-1])]
        claimed = decode_tensor(output).to(torch.float32)
    except ShardError as e:
        _log.info("evidence material does not decode: %s", e)
        return []
    hidden = last[0].to(torch.float32)
    step_mask = last[1] != 0 if len(last) == 2 else None
    servers = await chain.servers()
    accused_record = servers.get(answer.signer)
    accused = None if accused_record is None else precision_of(accused_record)
    if accused is None:
        _log.info("the accused %s announces no precision to compare", answer.signer.short())
        return []
    start, end = answer.span
    rechecks = []
    for peer in trusted:
        record = servers.get(peer)
        mine = None if record is None else precision_of(record)
        tolerance = None if mine is None else tolerance_for(accused, mine)
        if mine is None or tolerance is None:
            continue
        try:
            full, signed = await forward_steps(chain, Hop(peer, start, end, mine.dtype), inputs)
        except (P2PError, ShardError, TimeoutError) as e:
            _log.info("recheck on %s failed: %s", peer.short(), e)
            continue
        if signed.question != answer.question:
            _log.info("recheck on %s answered another question", peer.short())
            continue
        out = full[:, full.shape[1] - hidden.shape[1] :]
        agrees = out.shape == claimed.shape and discrepancy(
            hidden,
            out,
            claimed,
            rounding=accused.unit_roundoff + mine.unit_roundoff,
            mask=step_mask,
        ).within(tolerance)
        rechecks.append(Recheck(peer, agrees))
    return rechecks
