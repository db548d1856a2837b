"""Cheaters caught late at the default check rate, through ``generate``: rewinds.

One process (``tests/model_shards/cheater.py``) holds twelve shard servers of a tiny Llama:
one cheater of blocks [0, 2) per mode of the issue (a)-(f), a ``late`` cheater of [0, 2)
and one of [2, 4) (honest for their first ``LATE_AFTER`` steps, noisy after), and two
honest servers of each span. Each test's client checks at the default rate (5 %),
believes the servers it should not route to far away (so that its route goes through the
cheater under test, and a failover to an honest server), and compares its tokens with
the local model's (greedy).

At 5 % a cheater is caught at some step k; the steps before k that no check covered were
corrupted too. The client finds the first corrupted position p (the cheater's earlier
answers against the majority's output for its whole prefix), rolls the chain back to p and
draws the tokens after p again: the final tokens are the honest run's.

A peer that already left probation in the client's book (``probation_checks`` passed
checks, recorded here) is checked at the default rate, the rate ``detection_bound`` is
stated for; a fresh one is checked at every step (``probation_rate``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._client_chain import Hop
from model_shards._client_errors import RewindsExhausted
from model_shards._client_timing import TokenClock
from model_shards._server_limits import ClientLimits
from model_shards._spotcheck import (
    DEFAULT_RATE,
    SpotCheck,
    SpotChecker,
    SpotCheckSettings,
    Verdict,
    detection_bound,
)
from scheduler import ServerState
from security import Event, PeerId, ReputationBook
from tests.model_shards.cheater import CHEAT_RATES, CORRUPTIONS, LATE_AFTER, cheating_swarm
from tests.model_shards.tiny import TinyModel, left_padded, prompts
from tests.swarm.harness import private_copy

SERVERS = [
    *(f"{mode}:0:2" for mode in CORRUPTIONS),
    "late:0:2",
    "late:2:4",
    "honest:0:2",
    "honest:0:2",
    "honest:2:4",
    "honest:2:4",
]
PROMPT = prompts(1, 5, seed=23)
FAR_S = 5.0
"""The round trip the client is made to believe it has to a server its route should avoid."""
ANNOUNCED_S = 60.0
"""How long a test waits for every server to be announced online."""
LIMITS = ClientLimits(ban_s=3600.0)
"""Bans last the whole test."""
SEED = 11
"""The checker's draws (which steps are checked) in the per-mode tests."""
POSITIONS = 256 - PROMPT.shape[1] - 1
"""The most new tokens one generation of the tiny model can hold."""


@dataclass
class Swarm:
    bootstrap: str
    tm: TinyModel
    peers: dict[str, PeerId]

    def honest(self) -> list[PeerId]:
        return [peer for role, peer in self.peers.items() if role.startswith("honest")]


@pytest.fixture(scope="module")
def swarm(
    tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Swarm]:
    tm = private_copy(tiny("llama"), tmp_path_factory.mktemp("rewind-model"))
    work = tmp_path_factory.mktemp("rewind")
    with cheating_swarm(tm.path, SERVERS, work) as (bootstrap, peers):
        yield Swarm(bootstrap, tm, peers)


def client(swarm: Swarm, limits: ClientLimits = LIMITS) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        swarm.tm.path, initial_peers=[swarm.bootstrap], limits=limits
    )


def steer(model: DistributedModelForCausalLM, swarm: Swarm, cheater: PeerId) -> None:
    """Routes go through ``cheater``, and fail it over to an honest server of its span:
    the other servers of its span are made to look far, and the other cheaters are banned
    (routes and checks leave them out)."""
    span = next(role for role, peer in swarm.peers.items() if peer == cheater).split(" ")[1]
    deadline = time.monotonic() + ANNOUNCED_S
    while True:  # right after the swarm started, a server may not be announced yet
        servers = model.client.run(model.chain.servers(refresh=True))
        online = {p for p, record in servers.items() if record.state is ServerState.ONLINE}
        if online >= set(swarm.peers.values()):
            break
        assert time.monotonic() < deadline, "some servers were not announced in time"
        time.sleep(0.2)
    for role, peer in swarm.peers.items():
        mode, blocks = role.split(" ")[:2]
        if peer == cheater:
            continue
        if mode != "honest":
            model.chain.ban(peer)
        elif blocks == span:
            model.chain._rtts[peer] = FAR_S


def establish(book: ReputationBook, peers: list[PeerId]) -> None:
    """Take ``peers`` off probation (they passed the checks it takes), as a peer that has
    served this client honestly for a while: its steps are checked at the default rate."""
    for peer in peers:
        for _ in range(book.settings.probation_checks):
            book.record(peer, Event.CHECK_PASSED)
        assert not book.on_probation(peer)


@dataclass
class Steps:
    """The steps of one server that the checker saw, and the one it was caught at."""

    peer: PeerId
    seen: int = 0
    caught_at: int | None = None
    drawn: list[int] = field(default_factory=list)
    """The steps drawn for a check whose check has not started yet, oldest first."""


def count_steps(checker: SpotChecker, peer: PeerId, script: set[int] | None = None) -> Steps:
    """Count ``peer``'s steps as the checker draws them, and the step whose check caught
    it (checks start in the order of their draws, in the background or not). With
    ``script``, the steps of ``peer`` checked are those numbered (from 1) in it, and no
    other server's, whatever the route."""
    steps = Steps(peer)
    draw, check = checker.draw, checker.check

    def drawn(who: PeerId) -> bool:
        chosen = draw(who)
        if who != peer:
            return chosen and script is None
        steps.seen += 1
        if script is not None:
            chosen = steps.seen in script
        if chosen:
            steps.drawn.append(steps.seen)
        return chosen

    async def checked(hop: Hop, *args: Any, **kwargs: Any) -> SpotCheck:
        at = steps.drawn.pop(0) if hop.peer_id == peer else 0
        result = await check(hop, *args, **kwargs)
        if hop.peer_id == peer and result.verdict is Verdict.CHEATER:
            steps.caught_at = steps.caught_at or at
        return result

    checker.draw = drawn  # type: ignore[method-assign]
    checker.check = checked  # type: ignore[method-assign]
    return steps


class Draws(random.Random):
    """The checker's randomness, scripted: draw number n (from 1) checks its step at the
    default rate when n is in ``checked``; peers on probation are checked at every draw."""

    def __init__(self, checked: set[int]) -> None:
        super().__init__(0)
        self.checked = checked
        self.count = 0

    def random(self) -> float:
        self.count += 1
        return 0.0 if self.count in self.checked else 0.99

    def getrandbits(self, k: int) -> int:  # shuffles draw from these, not from ``random``
        return super().getrandbits(k)


def honest_tokens(swarm: Swarm, ids: torch.Tensor, new: int, **kwargs: Any) -> torch.Tensor:
    return swarm.tm.model.generate(ids, do_sample=False, max_new_tokens=new, **kwargs)


NEW_TOKENS = {
    mode: min(POSITIONS, detection_bound(DEFAULT_RATE, CHEAT_RATES[mode])) for mode in CORRUPTIONS
}
"""Tokens of one generation per mode: the bound, or the most the model holds (``rare``'s
bound, 919 steps, takes up to four generations of 250)."""


@dataclass
class Generation:
    tokens: torch.Tensor
    expected: torch.Tensor
    caught: list[SpotCheck]
    rewinds: list[int]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(CORRUPTIONS))
def test_at_the_default_rate_a_cheater_is_caught_within_the_bound_and_the_tokens_are_honest(
    swarm: Swarm, mode: str
) -> None:
    """Generations one after the other (a new prompt and session each) until the cheater
    is caught or has run ``bound`` steps. The generation it is caught in gives the honest
    tokens; an earlier one (mode ``rare`` only: its bound is longer than a generation)
    went unchecked and may not: that is what the bound is about."""
    cheater = swarm.peers[f"{mode} 0:2"]
    bound = detection_bound(DEFAULT_RATE, CHEAT_RATES[mode])
    new = NEW_TOKENS[mode]
    generations: list[Generation] = []
    with client(swarm) as model:
        checker = model.checker
        assert checker is not None and checker.settings.rate == DEFAULT_RATE
        checker.rng = random.Random(SEED)
        establish(model.book, [cheater, *swarm.honest()])
        assert checker.rate_for(cheater) == DEFAULT_RATE
        assert not checker.blocks(cheater)  # its checks run in the background
        steer(model, swarm, cheater)
        steps = count_steps(checker, cheater)
        while steps.caught_at is None and steps.seen < bound:
            ids = prompts(1, PROMPT.shape[1], seed=23 + len(generations))
            with model.inference_session(max_length=ids.shape[1] + new) as session:
                got = model.generate(ids, do_sample=False, max_new_tokens=new)
                expected = honest_tokens(swarm, ids, new)
                generations.append(Generation(got, expected, session.caught, session.rewinds))
        assert model.book.is_banned(cheater)
        for peer in swarm.honest():
            assert model.book.standing(peer).checks_failed == 0
    assert steps.caught_at is not None and steps.caught_at <= bound, (steps, bound)
    last = generations[-1]
    assert [c.checked for c in last.caught] == [cheater]
    assert all(g.caught == [] for g in generations[:-1])
    if CHEAT_RATES[mode] == 1.0:
        assert len(generations) == 1
        # the check ran in the background: by its verdict the chain had used the
        # cheater's output of every step up to the checked one (the prompt's the first),
        # and the generation went back to the start
        assert last.rewinds == [0]
    else:
        assert len(last.rewinds) <= 1
    assert torch.equal(last.tokens, last.expected)


def test_the_probation_rate_is_a_probability() -> None:
    assert SpotCheckSettings().probation_rate == 1.0
    for wrong in (-0.1, 1.5):
        with pytest.raises(ValueError, match="probation_rate"):
            SpotCheckSettings(probation_rate=wrong)


def test_a_token_clock_forgets_the_tokens_a_rewind_draws_again() -> None:
    ticks = iter(range(100))
    clock = TokenClock(clock=lambda: float(next(ticks)))
    clock.put(torch.tensor([[5, 6, 7]]))  # the prompt, at 0
    for token in (8, 9, 10):  # at 1, 2, 3
        clock.put(torch.tensor([token]))
    clock.rewound(4)  # the prompt and the first new token are kept
    clock.put(torch.tensor([11]))  # at 4
    clock.end()
    assert clock.tokens == [8, 11] and clock.rewinds == [4]
    assert clock.gaps_s == [1.0, 3.0]


@pytest.mark.timeout(120)
def test_a_cheater_on_probation_is_caught_at_its_first_step_without_a_rewind(
    swarm: Swarm,
) -> None:
    cheater = swarm.peers["noise 0:2"]
    new = 12
    with client(swarm) as model:
        assert model.book.on_probation(cheater)
        assert model.checker is not None and model.checker.rate_for(cheater) == 1.0
        # on probation its checks block their step, background checks on or not
        assert model.checker.settings.background and model.checker.blocks(cheater)
        off = SpotChecker(model.chain, settings=SpotCheckSettings(rate=0.0), book=model.book)
        assert off.rate_for(cheater) == 0.0  # checks off are off for newcomers too
        model.checker.rng = random.Random(SEED)
        steer(model, swarm, cheater)
        steps = count_steps(model.checker, cheater)
        with model.inference_session(max_length=PROMPT.shape[1] + new) as session:
            got = model.generate(PROMPT, do_sample=False, max_new_tokens=new)
            caught, rewinds, failovers = session.caught, session.rewinds, session.failovers
    assert steps.caught_at == 1
    assert [c.checked for c in caught] == [cheater] and rewinds == []
    assert [f.failed for f in failovers] == [cheater]
    assert torch.equal(got, honest_tokens(swarm, PROMPT, new))


CAUGHT_AT = 8
"""The step of the ``late`` cheater that is checked: steps ``LATE_AFTER + 1`` to
``CAUGHT_AT - 1`` were corrupted and went unchecked."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hop", ["first", "last"])
def test_a_cheater_caught_late_rewinds_the_generation_to_its_first_corrupted_position(
    swarm: Swarm, hop: str
) -> None:
    """``first``: the cheater serves blocks [0, 2) and pushes to the next server, one
    prompt; ``last``: it serves [2, 4), a batch of two left-padded prompts."""
    cheater = swarm.peers["late 0:2" if hop == "first" else "late 2:4"]
    ids, mask = (PROMPT, torch.ones_like(PROMPT)) if hop == "first" else left_padded([5, 3])
    new = 16
    # draws alternate between the two hops of each step; the cheater's step CAUGHT_AT is
    # checked, no other step of an established peer is
    draw = 2 * CAUGHT_AT - (hop == "first")
    clock = TokenClock()
    with client(swarm) as model:
        assert model.checker is not None
        model.checker.rng = Draws({draw})
        establish(model.book, [cheater, *swarm.honest()])
        steer(model, swarm, cheater)
        steps = count_steps(model.checker, cheater)
        with model.inference_session(max_length=ids.shape[1] + new) as session:
            got = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new,
                pad_token_id=0,
                streamer=clock if hop == "first" else None,
            )
            rewinds, failovers = session.rewinds, session.failovers
    assert steps.caught_at == CAUGHT_AT
    first_corrupted = ids.shape[1] + LATE_AFTER - 1  # the prompt is step 1
    assert rewinds == [first_corrupted]
    assert [f.failed for f in failovers] == [cheater]
    expected = honest_tokens(swarm, ids, new, attention_mask=mask, pad_token_id=0)
    assert torch.equal(got, expected)
    if hop == "first":
        # the streamer saw the corrupted tokens, then was told to forget them
        assert clock.rewinds == [first_corrupted + 1]
        assert clock.tokens == expected[0, ids.shape[1] :].tolist()


@pytest.mark.timeout(120)
def test_rewinds_beyond_the_limit_raise(swarm: Swarm) -> None:
    cheater = swarm.peers["flip 0:2"]
    with client(swarm, dataclasses.replace(LIMITS, max_rewinds=0)) as model:
        assert model.checker is not None
        model.checker.rng = Draws({2 * 3 - 1})  # its third step
        establish(model.book, [cheater, *swarm.honest()])
        steer(model, swarm, cheater)
        with pytest.raises(RewindsExhausted, match="max_rewinds") as raised:
            model.generate(PROMPT, do_sample=False, max_new_tokens=8)
    assert raised.value.rewind.position == 0
    assert raised.value.rewind.check.checked == cheater


class Events:
    """A streamer that records what ``generate`` tells it: the prompt, each new token,
    rewinds (the length kept) and the end."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def put(self, value: torch.Tensor) -> None:
        self.events.append("prompt" if not self.events else int(value.reshape(-1)[0]))

    def rewound(self, length: int) -> None:
        self.events.append(("rewound", length))

    def end(self) -> None:
        self.events.append("end")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("checks", ["background", "inline", "paranoid"])
def test_background_checks_let_the_token_go_and_rewind_while_blocking_checks_do_not(
    swarm: Swarm, checks: str
) -> None:
    """A cheater off probation, its first step (the prompt's) checked: in the background
    the chain goes on with its output, so the verdict rewinds the generation to the
    start; a blocking check (``background`` off, or paranoid) replaces the output before
    any token is drawn from it: no rewind. The tokens are the honest ones either way."""
    cheater = swarm.peers["scale 0:2"]
    new = 8
    with client(swarm) as model:
        checker = model.checker
        assert checker is not None
        if checks == "inline":
            checker.settings = dataclasses.replace(checker.settings, background=False)
        elif checks == "paranoid":
            checker.settings = SpotCheckSettings.paranoid()
        establish(model.book, [cheater, *swarm.honest()])
        assert checker.blocks(cheater) is (checks != "background")
        steer(model, swarm, cheater)
        steps = count_steps(checker, cheater, None if checks == "paranoid" else {1})
        with model.inference_session(max_length=PROMPT.shape[1] + new) as session:
            got = model.generate(PROMPT, do_sample=False, max_new_tokens=new)
            caught, rewinds, failovers = session.caught, session.rewinds, session.failovers
    assert steps.caught_at == 1
    assert [c.checked for c in caught] == [cheater]
    assert rewinds == ([0] if checks == "background" else [])
    assert [f.failed for f in failovers] == [cheater]
    assert torch.equal(got, honest_tokens(swarm, PROMPT, new))


@pytest.mark.timeout(120)
def test_a_check_still_running_at_the_last_token_is_settled_before_generate_returns(
    swarm: Swarm,
) -> None:
    """Only the cheater's last step is checked, in the background: no later step
    collects it, ``generate`` waits for it (``settle``) after the last token was drawn
    and handed to the streamer, rewinds and draws every token again; the streamer ends
    once, after that."""
    cheater = swarm.peers["zeros 0:2"]
    new = 8
    streamer = Events()
    with client(swarm) as model:
        assert model.checker is not None
        establish(model.book, [cheater, *swarm.honest()])
        steer(model, swarm, cheater)
        steps = count_steps(model.checker, cheater, {new})
        with model.inference_session(max_length=PROMPT.shape[1] + new) as session:
            got = model.generate(PROMPT, do_sample=False, max_new_tokens=new, streamer=streamer)
            caught, rewinds = session.caught, session.rewinds
            assert session.chain is not None and session.chain._pending == []
    assert steps.seen == new and steps.caught_at == new
    assert [c.checked for c in caught] == [cheater] and rewinds == [0]
    expected = honest_tokens(swarm, PROMPT, new)
    assert torch.equal(got, expected)
    events = streamer.events
    rewound = events.index(("rewound", PROMPT.shape[1]))
    assert events[0] == "prompt" and rewound == 1 + new  # every corrupted token went out
    assert events[rewound + 1 :] == [*expected[0, PROMPT.shape[1] :].tolist(), "end"]
