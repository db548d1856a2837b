"""The reputation book: what one peer has learned about the others, as numbers.

Each peer's *score* is a sum of event weights (``ReputationSettings``) that decays
towards 0 with a half-life, clamped to ``[min_score, max_score]``: successes and passed
spot-checks raise it, failures, timeouts, failed spot-checks, verified evidence and
false accusations lower it. A peer is *banned* for a while when a grave event happens
(a failed spot-check, verified evidence) or, while not banned, its score falls to
``ban_below``; every further ban lasts twice as long, up to ``max_ban_s``.

Reputation is earned per identity, so throwing an identity away never helps: a new
identity starts at 0 and *on probation* until it has passed ``probation_checks``
spot-checks (a failed check starts the count again), and probation peers together get
at most ``probation_share`` of a client's traffic while established peers are there to
take the rest (``eligible`` for one request, ``routing_weights`` for weighted routing).
Many peers behind one IP group (``security.ip_group``, the DHT's diversity unit) share
a penalty: past ``group_free_peers`` candidates of one group, each one's weight shrinks
in proportion. ``contact_score`` is the hook ``dht.RoutingTable`` takes.

The book is a plain object with an injected clock and no I/O but ``save``/``load``: a
small msgpack file written atomically with mode 0600, so that reputation survives
restarts. Its size is bounded (``max_peers``): when full, the peer whose score is
nearest 0 and who was seen least recently is forgotten, never a banned or a distrusted
one before it.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import msgpack

from ._errors import InvalidPeerId, ReputationFileError
from ._ipgroup import ip_group
from ._peer_id import PeerId

HOUR = 3600.0
DAY = 24 * HOUR
_FILE_VERSION = 1


class Event(Enum):
    """Something a peer did that changes its score."""

    SUCCESS = "success"
    """It answered a request correctly (as far as we know)."""
    FAILURE = "failure"
    """It answered with an error, or broke the protocol."""
    TIMEOUT = "timeout"
    """It did not answer in time."""
    CHECK_PASSED = "check_passed"
    """A spot-check agreed with its answer."""
    CHECK_FAILED = "check_failed"
    """A spot-check (with a tie-break) found its answer wrong."""
    EVIDENCE_AGAINST = "evidence_against"
    """Published evidence against it was verified by recomputation."""
    FALSE_ACCUSATION = "false_accusation"
    """It published evidence that did not verify."""


@dataclass(frozen=True, slots=True)
class ReputationSettings:
    """Weights, decay, bans, probation and bounds of a ``ReputationBook``."""

    success: float = 1.0
    failure: float = -2.0
    timeout: float = -1.0
    check_passed: float = 5.0
    check_failed: float = -100.0
    evidence_against: float = -100.0
    false_accusation: float = -50.0
    half_life_s: float = DAY
    """Every score halves towards 0 in this time."""
    max_score: float = 100.0
    min_score: float = -1000.0
    score_scale: float = 10.0
    """Scores are squashed as ``tanh(score / score_scale)`` into routing weights."""

    ban_below: float = -20.0
    """A score at or below this bans the peer."""
    ban_events: frozenset[Event] = frozenset({Event.CHECK_FAILED, Event.EVIDENCE_AGAINST})
    """Events that ban at once, whatever the score."""
    ban_s: float = HOUR
    """The first ban's length; each later one doubles it."""
    max_ban_s: float = 30 * DAY

    probation_checks: int = 3
    """Spot-checks a new identity must pass before it leaves probation."""
    probation_share: float = 0.1
    """The most of our traffic that peers on probation get while others can take it."""
    traffic_half_life_s: float = 600.0
    """The window (a half-life) over which the probation share is measured."""

    group_free_peers: int = 2
    """Candidates of one IP group that carry no penalty; beyond, weights shrink."""
    exempt_private_addrs: bool = True
    """Loopback and LAN addresses belong to no group (home clusters); off in public."""

    max_peers: int = 10_000
    max_file_bytes: int = 8 * 1024 * 1024
    max_remembered_evidence: int = 10_000
    """Evidence ids remembered so that the same evidence never counts twice."""

    def __post_init__(self) -> None:
        positive = ("half_life_s", "score_scale", "ban_s", "max_ban_s", "traffic_half_life_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"ReputationSettings.{name} must be positive")
        if not self.min_score < self.ban_below < 0 < self.max_score:
            raise ValueError(
                "ReputationSettings needs min_score < ban_below < 0 < max_score, got "
                f"{self.min_score}, {self.ban_below}, {self.max_score}"
            )
        if not 0 < self.probation_share < 1:
            raise ValueError(
                f"ReputationSettings.probation_share must be in (0, 1), got {self.probation_share}"
            )
        for name in ("probation_checks", "group_free_peers", "max_peers"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReputationSettings.{name} must be at least 1")

    def weight(self, event: Event) -> float:
        """The score change of one ``event``."""
        return float(getattr(self, event.value))


@dataclass(frozen=True, slots=True)
class Standing:
    """What the book holds on one peer, at one moment."""

    peer: PeerId
    score: float
    """Decayed to the moment asked."""
    banned_until: float
    bans: int
    checks_passed: int
    checks_failed: int
    group: str | None
    on_probation: bool
    banned: bool


@dataclass(slots=True)
class _Peer:
    score: float = 0.0
    updated: float = 0.0
    banned_until: float = 0.0
    bans: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    group: str | None = None
    seen: float = 0.0

    def fields(self) -> list[object]:
        return [
            self.score,
            self.updated,
            self.banned_until,
            self.bans,
            self.checks_passed,
            self.checks_failed,
            self.group,
            self.seen,
        ]


class ReputationBook:
    """Per-peer decaying scores, bans and probation, with a traffic cap for newcomers.

    ``clock`` gives Unix time (it must survive restarts: not a monotonic clock).
    """

    def __init__(
        self,
        settings: ReputationSettings = ReputationSettings(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._peers: dict[PeerId, _Peer] = {}
        self._evidence: OrderedDict[bytes, None] = OrderedDict()
        self._traffic_all = 0.0
        self._traffic_probation = 0.0
        self._traffic_at = clock()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def peers(self) -> list[PeerId]:
        return list(self._peers)

    # -- state ---------------------------------------------------------------------------

    def _decayed(self, state: _Peer, now: float) -> float:
        elapsed = max(0.0, now - state.updated)
        return state.score * 0.5 ** (elapsed / self.settings.half_life_s)

    def _state(self, peer: PeerId, now: float) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.settings.max_peers:
                self._forget_one(now)
            state = self._peers[peer] = _Peer(updated=now, seen=now)
        return state

    def _forget_one(self, now: float) -> None:
        """Drop the least telling peer: not banned, score nearest 0, seen longest ago."""

        def telling(item: tuple[PeerId, _Peer]) -> tuple[bool, float, float]:
            state = item[1]
            return state.banned_until > now, abs(self._decayed(state, now)), state.seen

        peer, _ = min(self._peers.items(), key=telling)
        del self._peers[peer]

    def _on_probation(self, state: _Peer | None) -> bool:
        return state is None or state.checks_passed < self.settings.probation_checks

    def standing(self, peer: PeerId) -> Standing:
        """What the book holds on ``peer`` now (a peer never seen stands at 0, on probation)."""
        now = self._clock()
        state = self._peers.get(peer)
        if state is None:
            return Standing(peer, 0.0, 0.0, 0, 0, 0, None, True, False)
        return Standing(
            peer,
            self._decayed(state, now),
            state.banned_until,
            state.bans,
            state.checks_passed,
            state.checks_failed,
            state.group,
            self._on_probation(state),
            state.banned_until > now,
        )

    def score(self, peer: PeerId) -> float:
        """``peer``'s decayed score now (0 for a peer never seen)."""
        state = self._peers.get(peer)
        return 0.0 if state is None else self._decayed(state, self._clock())

    def is_banned(self, peer: PeerId) -> bool:
        state = self._peers.get(peer)
        return state is not None and state.banned_until > self._clock()

    def on_probation(self, peer: PeerId) -> bool:
        return self._on_probation(self._peers.get(peer))

    # -- events --------------------------------------------------------------------------

    def record(self, peer: PeerId, event: Event) -> Standing:
        """Count ``event`` for ``peer``; a grave event or a low enough score bans it."""
        settings = self.settings
        now = self._clock()
        state = self._state(peer, now)
        score = self._decayed(state, now) + settings.weight(event)
        state.score = min(settings.max_score, max(settings.min_score, score))
        state.updated = state.seen = now
        if event is Event.CHECK_PASSED:
            state.checks_passed += 1
        elif event in (Event.CHECK_FAILED, Event.EVIDENCE_AGAINST):
            state.checks_failed += 1
            state.checks_passed = 0
        low = state.score <= settings.ban_below and state.banned_until <= now
        if event in settings.ban_events or low:
            self._ban(state, now, settings.ban_s * 2.0**state.bans)
        return self.standing(peer)

    def record_outcome(self, peer: PeerId, ok: bool, timed_out: bool = False) -> Standing:
        """``record`` one request's outcome: ``SUCCESS`` when ``ok``, else ``TIMEOUT`` or
        ``FAILURE`` (the shape of ``dht.DHT``'s ``on_outcome`` hook)."""
        event = Event.SUCCESS if ok else Event.TIMEOUT if timed_out else Event.FAILURE
        return self.record(peer, event)

    def record_evidence(self, evidence_id: bytes, peer: PeerId, event: Event) -> bool:
        """``record`` an outcome of evidence ``evidence_id`` unless that evidence already
        counted; True if it counted now."""
        if evidence_id in self._evidence:
            return False
        self._evidence[evidence_id] = None
        while len(self._evidence) > self.settings.max_remembered_evidence:
            self._evidence.popitem(last=False)
        self.record(peer, event)
        return True

    def ban(self, peer: PeerId, seconds: float) -> Standing:
        """Ban ``peer`` for ``seconds`` more (at least), e.g. for the rest of a session."""
        now = self._clock()
        self._ban(self._state(peer, now), now, seconds)
        return self.standing(peer)

    def _ban(self, state: _Peer, now: float, seconds: float) -> None:
        seconds = min(seconds, self.settings.max_ban_s)
        state.banned_until = max(state.banned_until, now + seconds)
        state.bans += 1

    def note_address(self, peer: PeerId, ip: str | None) -> None:
        """Remember the IP ``peer`` was seen at (its IP group is what counts)."""
        now = self._clock()
        state = self._state(peer, now)
        state.group = ip_group(ip, exempt_private=self.settings.exempt_private_addrs)
        state.seen = now

    # -- routing -------------------------------------------------------------------------

    def contact_score(self, peer: PeerId) -> float:
        """The DHT routing table's hook: -1 for a banned peer (refused), otherwise a
        number in (0, 1) that grows with the score (0.5 for a peer never seen)."""
        state = self._peers.get(peer)
        if state is None:
            return 0.5
        now = self._clock()
        if state.banned_until > now:
            return -1.0
        return 0.5 * (1.0 + math.tanh(self._decayed(state, now) / self.settings.score_scale))

    def routing_weights(
        self, candidates: Iterable[PeerId], *, cap_probation: bool = True
    ) -> dict[PeerId, float]:
        """A weight in [0, 1) per candidate for choosing among servers of one span.

        Banned peers weigh 0. Others weigh ``contact_score``, shrunk by
        ``group_free_peers / n`` when ``n`` candidates share an IP group beyond the free
        count, and, with ``cap_probation``, peers on probation are scaled together so
        that, when chosen in proportion to weight, they get at most ``probation_share``
        of the choices (unless no established peer is among the candidates). Without it
        (for a choice that is not a draw, e.g. least-latency routing), ``eligible`` is
        what keeps them to their share.
        """
        settings = self.settings
        peers = list(dict.fromkeys(candidates))
        groups: dict[str, int] = {}
        for peer in peers:
            state = self._peers.get(peer)
            if state is not None and state.group is not None:
                groups[state.group] = groups.get(state.group, 0) + 1
        weights: dict[PeerId, float] = {}
        probation_sum = established_sum = 0.0
        for peer in peers:
            weight = max(0.0, self.contact_score(peer))
            state = self._peers.get(peer)
            if state is not None and state.group is not None:
                crowd = groups[state.group]
                if crowd > settings.group_free_peers:
                    weight *= settings.group_free_peers / crowd
            weights[peer] = weight
            if self._on_probation(state):
                probation_sum += weight
            else:
                established_sum += weight
        cap = established_sum * settings.probation_share / (1.0 - settings.probation_share)
        if cap_probation and established_sum > 0 and probation_sum > cap:
            factor = cap / probation_sum
            for peer in peers:
                if self._on_probation(self._peers.get(peer)):
                    weights[peer] *= factor
        return weights

    def _traffic_decay(self, now: float) -> None:
        elapsed = max(0.0, now - self._traffic_at)
        factor = 0.5 ** (elapsed / self.settings.traffic_half_life_s)
        self._traffic_all *= factor
        self._traffic_probation *= factor
        self._traffic_at = now

    def probation_traffic_share(self) -> float:
        """The recent share of our requests that went to peers on probation."""
        self._traffic_decay(self._clock())
        return self._traffic_probation / self._traffic_all if self._traffic_all else 0.0

    def note_request(self, peer: PeerId, units: float = 1.0) -> None:
        """Count a request (``units`` of work, e.g. tokens) sent to ``peer``."""
        self._traffic_decay(self._clock())
        self._traffic_all += units
        if self.on_probation(peer):
            self._traffic_probation += units

    def eligible(self, candidates: Iterable[PeerId]) -> list[PeerId]:
        """The candidates that may receive our next request, in the order given.

        Never a banned peer; a peer on probation only while the probation share of our
        recent traffic is under ``probation_share``, or when no established candidate
        is there to take the request instead.
        """
        allowed = [peer for peer in dict.fromkeys(candidates) if not self.is_banned(peer)]
        established = [peer for peer in allowed if not self.on_probation(peer)]
        if not established or self.probation_traffic_share() < self.settings.probation_share:
            return allowed
        return established

    # -- persistence ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        peers = [[peer.to_bytes(), *state.fields()] for peer, state in self._peers.items()]
        return msgpack.packb(
            {"version": _FILE_VERSION, "peers": peers, "evidence": list(self._evidence)},
            use_bin_type=True,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the book to ``path`` atomically (a temporary file, then a rename), mode 0600."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            data = self.to_bytes()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        settings: ReputationSettings = ReputationSettings(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> ReputationBook:
        """The book saved at ``path``; an empty one if there is no file yet."""
        book = cls(settings, clock=clock)
        target = Path(path)
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            return book
        if size > settings.max_file_bytes:
            raise ReputationFileError(
                f"reputation file {target} has {size} bytes, over "
                f"ReputationSettings.max_file_bytes={settings.max_file_bytes}; delete it"
            )
        book._restore(target.read_bytes(), str(target))
        return book

    def _restore(self, data: bytes, where: str) -> None:
        try:
            content = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(content, dict) or content.get("version") != _FILE_VERSION:
                raise ValueError("not a version 1 reputation file")
            for item in content["peers"][: self.settings.max_peers]:
                peer = PeerId.from_bytes(item[0])
                score, updated, banned_until, bans, passed, failed, group, seen = item[1:]
                numbers = (score, updated, banned_until, seen)
                if not all(isinstance(x, float | int) and math.isfinite(x) for x in numbers):
                    raise ValueError("a peer's numbers are not finite")
                if not all(isinstance(x, int) and x >= 0 for x in (bans, passed, failed)):
                    raise ValueError("a peer's counters are not counts")
                if group is not None and not isinstance(group, str):
                    raise ValueError("a peer's IP group is not text")
                floats = (float(score), float(updated), float(banned_until))
                self._peers[peer] = _Peer(*floats, bans, passed, failed, group, float(seen))
            for evidence_id in content["evidence"][-self.settings.max_remembered_evidence :]:
                if not isinstance(evidence_id, bytes):
                    raise ValueError("an evidence id is not bytes")
                self._evidence[evidence_id] = None
        except (ValueError, TypeError, KeyError, IndexError, InvalidPeerId) as exc:
            raise ReputationFileError(
                f"reputation file {where} is damaged ({exc}); delete it to start afresh"
            ) from None
        except msgpack.UnpackException as exc:
            raise ReputationFileError(
                f"reputation file {where} is not msgpack ({exc}); delete it to start afresh"
            ) from None
