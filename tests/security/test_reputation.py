"""The reputation book: decay, bans, probation, IP-group penalty, persistence, as a
state machine driven by hypothesis and by directed cases."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from pathlib import Path

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from security import (
    Event,
    KeyPair,
    PeerId,
    ReputationBook,
    ReputationFileError,
    ReputationSettings,
)

HOUR = 3600.0
DAY = 24 * HOUR


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def peer(n: int) -> PeerId:
    return KeyPair.from_seed(bytes([n + 1]) * 32).peer_id


PEERS = [peer(i) for i in range(8)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- directed cases ----------------------------------------------------------------------


def test_scores_add_weights_and_halve_every_half_life(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    a = PEERS[0]
    assert book.score(a) == 0.0 and a not in book
    for _ in range(4):
        book.record(a, Event.SUCCESS)
    assert book.score(a) == pytest.approx(4.0)
    clock.now += DAY
    assert book.score(a) == pytest.approx(2.0)
    book.record(a, Event.TIMEOUT)
    clock.now += 2 * DAY
    assert book.score(a) == pytest.approx(0.25)


def test_scores_are_clamped(clock: Clock) -> None:
    book = ReputationBook(
        ReputationSettings(max_score=10.0, ban_below=-5.0, min_score=-8.0), clock=clock
    )
    for _ in range(50):
        book.record(PEERS[0], Event.SUCCESS)
    assert book.score(PEERS[0]) == 10.0
    for _ in range(50):
        book.record(PEERS[1], Event.FAILURE)
    assert book.score(PEERS[1]) == -8.0


def test_a_failed_spot_check_bans_at_once_and_bans_escalate(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    cheat = PEERS[0]
    standing = book.record(cheat, Event.CHECK_FAILED)
    assert standing.banned and standing.banned_until == clock.now + HOUR and standing.bans == 1
    assert book.contact_score(cheat) == -1.0
    assert book.eligible([cheat, PEERS[1]]) == [PEERS[1]]
    assert book.routing_weights([cheat, PEERS[1]])[cheat] == 0.0
    clock.now += HOUR + 1
    assert not book.is_banned(cheat)
    second = book.record(cheat, Event.CHECK_FAILED)
    assert second.banned_until == clock.now + 2 * HOUR and second.bans == 2


def test_many_small_failures_ban_once_the_score_falls_low_enough(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    flaky = PEERS[0]
    for _ in range(9):
        assert not book.record(flaky, Event.FAILURE).banned
    assert book.record(flaky, Event.FAILURE).banned  # -20 reaches ban_below
    # more failures while banned do not lengthen the ban; a grave event does
    assert book.record(flaky, Event.TIMEOUT).bans == 1
    assert book.record(flaky, Event.CHECK_FAILED).bans == 2


def test_manual_bans_last_at_least_as_asked(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    book.ban(PEERS[0], 600.0)
    assert book.is_banned(PEERS[0])
    clock.now += 599
    assert book.is_banned(PEERS[0])
    clock.now += 2
    assert not book.is_banned(PEERS[0])
    book.ban(PEERS[0], 10**9)
    assert book.standing(PEERS[0]).banned_until == clock.now + ReputationSettings().max_ban_s


def test_probation_ends_after_the_checks_and_restarts_after_a_failure(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    new = PEERS[0]
    assert book.on_probation(new)
    for _ in range(2):
        book.record(new, Event.CHECK_PASSED)
    assert book.on_probation(new)
    book.record(new, Event.CHECK_PASSED)
    assert not book.on_probation(new)
    book.record(new, Event.CHECK_FAILED)
    assert book.on_probation(new) and book.standing(new).checks_passed == 0


def established(book: ReputationBook, peers: list[PeerId]) -> None:
    for p in peers:
        for _ in range(book.settings.probation_checks):
            book.record(p, Event.CHECK_PASSED)


def test_probation_peers_get_a_capped_share_of_requests(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    old, new = PEERS[:2], PEERS[2:6]
    established(book, old)
    sent = {p: 0 for p in PEERS[:6]}
    for i in range(2000):
        allowed = book.eligible(PEERS[:6])
        choice = allowed[i % len(allowed)]
        book.note_request(choice)
        sent[choice] += 1
        clock.now += 0.1
    share = sum(sent[p] for p in new) / 2000
    assert 0.05 < share <= 0.11, share
    assert book.probation_traffic_share() <= 0.1 + 1e-9


def test_probation_peers_take_everything_when_nobody_else_can(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    for _ in range(10):
        book.note_request(PEERS[0])
    assert book.eligible(PEERS[:3]) == PEERS[:3]
    weights = book.routing_weights(PEERS[:3])
    assert all(w == 0.5 for w in weights.values())


def test_routing_weights_cap_probation_and_penalise_crowded_ip_groups(clock: Clock) -> None:
    settings = ReputationSettings(exempt_private_addrs=False)
    book = ReputationBook(settings, clock=clock)
    old, new = PEERS[:2], PEERS[2:8]
    established(book, old)
    weights = book.routing_weights(PEERS)
    established_sum = sum(weights[p] for p in old)
    probation_sum = sum(weights[p] for p in new)
    assert probation_sum / (probation_sum + established_sum) == pytest.approx(0.1)
    # four peers of one /24 share a penalty of 2/4 each; the others are untouched
    for p in PEERS[4:8]:
        book.note_address(p, "203.0.113.9")
    book.note_address(PEERS[2], "198.51.100.1")
    crowded = book.routing_weights(PEERS[2:8])
    assert crowded[PEERS[4]] == pytest.approx(crowded[PEERS[2]] / 2)
    assert book.standing(PEERS[4]).group == "203.0.113.0/24"


def test_a_fresh_identity_never_beats_a_proven_one(clock: Clock) -> None:
    """Throwing an identity away for a new one never raises the weight of its traffic."""
    book = ReputationBook(clock=clock)
    established(book, PEERS[:3])
    book.record(PEERS[0], Event.TIMEOUT)
    book.record(PEERS[1], Event.CHECK_FAILED)
    clock.now += 10 * DAY  # long after the ban
    weights = book.routing_weights([*PEERS[:3], PEERS[7]])
    assert weights[PEERS[7]] <= min(weights[PEERS[0]], weights[PEERS[2]])
    # the caught one is back on probation, weighing no more than a fresh identity
    assert book.on_probation(PEERS[1]) and weights[PEERS[1]] <= weights[PEERS[7]]


def test_the_same_evidence_counts_once(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    assert book.record_evidence(b"e1", PEERS[0], Event.EVIDENCE_AGAINST)
    assert not book.record_evidence(b"e1", PEERS[0], Event.EVIDENCE_AGAINST)
    assert book.score(PEERS[0]) == -100.0


def test_a_full_book_forgets_the_least_telling_peer(clock: Clock) -> None:
    book = ReputationBook(ReputationSettings(max_peers=3), clock=clock)
    book.record(PEERS[0], Event.CHECK_FAILED)  # banned: kept
    book.record(PEERS[1], Event.FAILURE)  # distrusted: kept over a neutral peer
    book.record(PEERS[2], Event.SUCCESS)
    book.record(PEERS[2], Event.TIMEOUT)  # back to 0: the least telling
    book.record(PEERS[3], Event.SUCCESS)
    assert set(book.peers()) == {PEERS[0], PEERS[1], PEERS[3]}


def test_contact_score_orders_peers_for_the_dht(clock: Clock) -> None:
    book = ReputationBook(clock=clock)
    book.record(PEERS[0], Event.SUCCESS)
    book.record(PEERS[1], Event.FAILURE)
    assert book.contact_score(PEERS[1]) < book.contact_score(PEERS[7]) == 0.5
    assert 0.5 < book.contact_score(PEERS[0]) < 1.0


def test_the_book_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "state" / "reputation.msgpack"
    book = ReputationBook(clock=clock)
    book.record(PEERS[0], Event.CHECK_FAILED)
    established(book, PEERS[1:2])
    book.note_address(PEERS[2], "203.0.113.4")
    book.record_evidence(b"e1", PEERS[3], Event.FALSE_ACCUSATION)
    book.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["reputation.msgpack"]
    again = ReputationBook.load(path, clock=clock)
    assert {p: again.standing(p) for p in PEERS} == {p: book.standing(p) for p in PEERS}
    assert not again.record_evidence(b"e1", PEERS[3], Event.FALSE_ACCUSATION)
    assert len(ReputationBook.load(tmp_path / "absent", clock=clock)) == 0


@pytest.mark.parametrize(
    "content",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"version": 2, "peers": [], "evidence": []}),
        msgpack.packb({"version": 1, "peers": [[b"x"]], "evidence": []}),
        msgpack.packb(
            {
                "version": 1,
                "peers": [[PEERS[0].to_bytes(), math.nan, 0, 0, 0, 0, 0, None, 0]],
                "evidence": [],
            }
        ),
        msgpack.packb({"version": 1, "peers": [], "evidence": ["text"]}),
    ],
)
def test_a_damaged_file_is_a_typed_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "book"
    path.write_bytes(content)
    with pytest.raises(ReputationFileError, match="delete it"):
        ReputationBook.load(path)


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "book"
    path.write_bytes(b"\x00" * 2048)
    with pytest.raises(ReputationFileError, match="max_file_bytes=1024"):
        ReputationBook.load(path, ReputationSettings(max_file_bytes=1024))


@pytest.mark.parametrize(
    "change",
    [
        {"half_life_s": 0.0},
        {"ban_below": 1.0},
        {"probation_share": 1.0},
        {"probation_checks": 0},
    ],
)
def test_impossible_settings_are_refused(change: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(ReputationSettings(), **change)


# -- the state machine -------------------------------------------------------------------


class BookMachine(RuleBasedStateMachine):
    """Random events, time, traffic, bans and restarts; the invariants hold throughout."""

    @initialize()
    def start(self) -> None:
        self.clock = Clock()
        self.settings = ReputationSettings(exempt_private_addrs=False, max_peers=6)
        self.book = ReputationBook(self.settings, clock=self.clock)
        self.passed: dict[PeerId, int] = {}
        self.banned_until: dict[PeerId, float] = {}
        self.path = Path(os.environ.get("TMPDIR", "/tmp")) / f"book-{os.getpid()}-{id(self)}"

    def teardown(self) -> None:
        self.path.unlink(missing_ok=True)

    @rule(who=st.sampled_from(PEERS), event=st.sampled_from(list(Event)))
    def event(self, who: PeerId, event: Event) -> None:
        before = self.book.standing(who)
        after = self.book.record(who, event)
        if event is Event.CHECK_FAILED:
            assert after.checks_passed == 0 and after.checks_failed == before.checks_failed + 1
        elif event is Event.CHECK_PASSED:
            assert after.checks_passed == before.checks_passed + 1
        if event in self.settings.ban_events:
            assert after.banned
        expected = before.score + self.settings.weight(event)
        clamped = min(self.settings.max_score, max(self.settings.min_score, expected))
        assert after.score == pytest.approx(clamped, abs=1e-9)

    @rule(who=st.sampled_from(PEERS))
    def graduate(self, who: PeerId) -> None:
        for _ in range(self.settings.probation_checks):
            self.book.record(who, Event.CHECK_PASSED)
        assert not self.book.on_probation(who)

    @rule(seconds=st.floats(min_value=0, max_value=5 * DAY))
    def wait(self, seconds: float) -> None:
        scores = {p: self.book.score(p) for p in PEERS}
        self.clock.now += seconds
        for p, before in scores.items():
            after = self.book.score(p)
            assert abs(after) <= abs(before) + 1e-9 and after * before >= 0

    @rule(who=st.sampled_from(PEERS), seconds=st.floats(min_value=1, max_value=DAY))
    def ban(self, who: PeerId, seconds: float) -> None:
        self.book.ban(who, seconds)
        assert self.book.is_banned(who)

    @rule(who=st.sampled_from(PEERS), ip=st.sampled_from(["203.0.113.1", "198.51.100.2", None]))
    def address(self, who: PeerId, ip: str | None) -> None:
        self.book.note_address(who, ip)

    @rule(data=st.data())
    def route(self, data: st.DataObject) -> None:
        candidates = data.draw(st.lists(st.sampled_from(PEERS), min_size=1, max_size=8))
        allowed = self.book.eligible(candidates)
        assert set(allowed) <= set(candidates)
        for p in allowed:
            self.book.note_request(p)

    @precondition(lambda self: len(self.book) > 0)
    @rule()
    def restart(self) -> None:
        before = {p: self.book.standing(p) for p in PEERS}
        self.book.save(self.path)
        self.book = ReputationBook.load(self.path, self.settings, clock=self.clock)
        assert {p: self.book.standing(p) for p in PEERS} == before

    @invariant()
    def bounded(self) -> None:
        assert len(self.book) <= self.settings.max_peers
        for p in PEERS:
            score = self.book.score(p)
            assert self.settings.min_score <= score <= self.settings.max_score

    @invariant()
    def banned_peers_get_nothing(self) -> None:
        weights = self.book.routing_weights(PEERS)
        eligible = set(self.book.eligible(PEERS))
        for p in PEERS:
            banned = self.book.is_banned(p)
            assert (self.book.contact_score(p) < 0) == banned
            if banned:
                assert weights[p] == 0.0 and p not in eligible
            else:
                assert 0.0 <= weights[p] < 1.0

    @invariant()
    def probation_weight_is_capped(self) -> None:
        weights = self.book.routing_weights(PEERS)
        old = sum(w for p, w in weights.items() if not self.book.on_probation(p))
        new = sum(w for p, w in weights.items() if self.book.on_probation(p))
        if old > 0:
            assert new <= (old + new) * self.settings.probation_share + 1e-9

    @invariant()
    def probation_follows_checks(self) -> None:
        for p in PEERS:
            standing = self.book.standing(p)
            assert standing.on_probation == (
                standing.checks_passed < self.settings.probation_checks
            )


BookMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_reputation_state_machine = pytest.mark.timeout(120)(BookMachine.TestCase)
