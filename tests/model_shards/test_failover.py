"""Failover mid-generation, with the failing servers as real processes on loopback.

A tiny Llama in two spans, each served twice: the server a test fails is a ``swarm join``
process, the others run in the test's process (``churn.ChurnSwarm``). A client generates
64 tokens greedily and, from its streamer, kills (SIGKILL) or stops (SIGTERM) the process
its chain uses. The generation must complete with the tokens of the uninterrupted run
and of the local model; the slowest token gap is the stall (printed here; measured by
``benchmarks/generate.py``). In-process servers that
leave check the errors of a swarm that can no longer cover the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM, RemoteInferenceSession
from model_shards._client_chain import is_lost
from model_shards._client_errors import FailoverFailed
from model_shards._client_runtime import SwarmClient
from model_shards._client_timing import TokenClock
from model_shards._server_limits import ClientLimits, ServerLimits
from p2p import ConnectionLimits, HostLimits
from scheduler import MissingBlocksError
from swarm._procs import NodeProcess
from tests.model_shards.churn import ChurnSwarm
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import LocalSwarm, private_copy

NEW_TOKENS = 64
AT_TOKEN = 20
STALL_BOUND_S = 15.0
"""Far above the failover goal (2 s, measured by ``benchmarks/generate.py``), far below
``ClientLimits.call_timeout_s`` (120 s): a loss found by the step deadline, not by a call
that runs out of time, whatever the machine's load."""
LIMITS = ClientLimits(route_poll_s=0.2, failover_wait_s=60.0, step_timeout_base_s=0.5)
PROMPT = prompts(1, 8, seed=5)
QUIC_FIRST = HostLimits(connections=ConnectionLimits(transport_preference=("quic", "tcp")))
"""A client that reaches the server processes over QUIC: a killed peer sends nothing."""
QUICK_LEAVE = ServerLimits(drain_timeout_s=0.1)


@pytest.fixture(scope="module")
def llama(tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return private_copy(tiny("llama"), tmp_path_factory.mktemp("failover-model"))


@pytest.fixture(scope="module")
def expected(llama: TinyModel) -> torch.Tensor:
    return llama.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every server: the throughput is measured once."""
    return tmp_path_factory.mktemp("failover-cache")


@pytest.fixture
def swarm(llama: TinyModel, cache_dir: Path, tmp_path: Path) -> Iterator[ChurnSwarm]:
    made = ChurnSwarm(llama.path, cache_dir, tmp_path)
    try:
        yield made
    finally:
        made.close()


def client_model(
    llama: TinyModel, swarm: ChurnSwarm, transport: str = "tcp"
) -> DistributedModelForCausalLM:
    host_limits = QUIC_FIRST if transport == "quic" else None
    client = SwarmClient([swarm.addr], limits=LIMITS, host_limits=host_limits)
    model = DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[swarm.addr], limits=LIMITS, client=client
    )
    model._owns_client = True
    return model


class Strike:
    """At token ``AT_TOKEN``: ``action`` on the process that serves a hop of the chain (the
    struck span is served by processes only, the other one in-process)."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        swarm: ChurnSwarm,
        action: Callable[[NodeProcess], None],
    ) -> None:
        self.model, self.swarm, self.action = model, swarm, action
        self.session: RemoteInferenceSession | None = None
        self.peer: str | None = None
        self.span: tuple[int, int] | None = None

    def __call__(self, token: int) -> None:
        if token != AT_TOKEN:
            return
        self.session = self.model.session
        assert self.session is not None
        processes = set(self.swarm.peers.values())
        # a route may split the struck span between its two processes: strike the first
        hop = next(h for h in self.session.hops if str(h.peer_id) in processes)
        self.peer, self.span = str(hop.peer_id), (hop.start, hop.end)
        self.action(self.swarm.node_of(self.peer))


def generate(model: DistributedModelForCausalLM, clock: TokenClock) -> torch.Tensor:
    return model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS, streamer=clock)


def spans_with_victim(swarm: ChurnSwarm, victim: int, **join: float) -> None:
    """Blocks [0, 2) and [2, 4), each served twice: the span of hop ``victim`` by two
    processes (online; whichever the route picks is struck), the other by two in-process
    servers."""
    spans = [(0, 2), (2, 4)]
    processes = [swarm.join(*spans[victim], **join) for _ in range(2)]
    swarm.serve(*spans[1 - victim])
    swarm.serve(*spans[1 - victim])
    swarm.online(*processes)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("transport", "victim"), [("tcp", 0), ("quic", 1)])
def test_sigkill_of_a_used_server_mid_generation_keeps_the_tokens(
    llama: TinyModel, expected: torch.Tensor, swarm: ChurnSwarm, transport: str, victim: int
) -> None:
    spans_with_victim(swarm, victim)
    with client_model(llama, swarm, transport) as model:
        calm = TokenClock()
        uninterrupted = generate(model, calm)
        assert torch.equal(uninterrupted, expected)

        strike = Strike(model, swarm, NodeProcess.kill)
        clock = TokenClock(strike)
        assert torch.equal(generate(model, clock), uninterrupted)
    assert strike.session is not None
    (failover,) = strike.session.failovers
    assert (str(failover.failed), (failover.start, failover.end)) == (strike.peer, strike.span)
    assert strike.peer not in {str(h.peer_id) for h in failover.replacement}
    print(
        f"{transport}: stall {clock.stall_s:.3f}s (failover {failover.seconds:.3f}s), "
        f"uninterrupted slowest gap {calm.stall_s:.3f}s"
    )
    assert clock.stall_s < STALL_BOUND_S


@pytest.mark.timeout(90)
def test_graceful_stop_of_a_used_server_mid_generation_keeps_the_tokens(
    llama: TinyModel, expected: torch.Tensor, swarm: ChurnSwarm
) -> None:
    spans_with_victim(swarm, 1, drain_s=0.3)

    def stop_and_wait(node: NodeProcess) -> None:
        """SIGTERM, then hold the generation until the server has drained and exited."""
        swarm.terminate(node)
        assert node.popen.wait(30) == 0

    with client_model(llama, swarm) as model:
        strike = Strike(model, swarm, stop_and_wait)
        clock = TokenClock(strike)
        assert torch.equal(generate(model, clock), expected)
    assert strike.session is not None
    (failover,) = strike.session.failovers
    assert (str(failover.failed), (failover.start, failover.end)) == (strike.peer, strike.span)
    print(f"graceful: failover {failover.seconds:.3f}s after {failover.cause}")


@pytest.mark.timeout(90)
def test_a_server_joining_after_the_kill_takes_over(
    llama: TinyModel, expected: torch.Tensor, swarm: ChurnSwarm
) -> None:
    first = swarm.join(2, 4)
    swarm.serve(0, 2)
    swarm.online(first)
    late: list[NodeProcess] = []

    def kill_and_replace(node: NodeProcess) -> None:
        node.kill()
        late.append(swarm.join(2, 4))

    with client_model(llama, swarm) as model:
        strike = Strike(model, swarm, kill_and_replace)
        clock = TokenClock(strike)
        assert torch.equal(generate(model, clock), expected)
    swarm.online(*late)
    assert strike.session is not None
    (failover,) = strike.session.failovers
    assert [str(h.peer_id) for h in failover.replacement] == [swarm.peers[late[0]]]
    print(f"late replacement: stall {clock.stall_s:.3f}s (failover {failover.seconds:.3f}s)")


@pytest.fixture
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    made = LocalSwarm(tmp_path_factory.mktemp("failover-local"))
    try:
        yield made
    finally:
        made.close()


def leave_at_token(
    model: DistributedModelForCausalLM, swarm: LocalSwarm, victim: int
) -> Callable[[int], None]:
    """A streamer callback stopping (in-process, gracefully) the server of hop ``victim``."""

    def on_token(token: int) -> None:
        if token == AT_TOKEN:
            session = model.session
            assert session is not None
            peer = session.hops[victim].peer_id
            (node,) = (n for n in swarm.nodes if n.host.peer_id == peer)
            swarm.stop(node)

    return on_token


@pytest.mark.timeout(60)
def test_blocks_nobody_serves_any_more_raise_missing_blocks(
    llama: TinyModel, local: LocalSwarm
) -> None:
    for start, end in [(0, 2), (2, 4)]:
        local.serve(llama.path, start, end, rebalance=False, limits=QUICK_LEAVE)
    limits = ClientLimits(failover_wait_s=0.5, route_poll_s=0.1)
    with DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[local.addr], limits=limits
    ) as model:
        clock = TokenClock(leave_at_token(model, local, 1))
        with pytest.raises(MissingBlocksError) as raised:
            generate(model, clock)
    assert raised.value.blocks == (2, 3)
    assert len(clock.times) == AT_TOKEN


@pytest.mark.timeout(60)
def test_failover_attempts_are_bounded(llama: TinyModel, local: LocalSwarm) -> None:
    for start, end in [(0, 2), (2, 4), (2, 4)]:
        local.serve(llama.path, start, end, rebalance=False, limits=QUICK_LEAVE)
    limits = ClientLimits(max_failovers=0)
    with DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[local.addr], limits=limits
    ) as model:
        clock = TokenClock(leave_at_token(model, local, 1))
        with pytest.raises(FailoverFailed) as raised:
            generate(model, clock)
    assert (raised.value.start, raised.value.end, raised.value.attempts) == (2, 4, 0)
    assert raised.value.__cause__ is not None and is_lost(raised.value.__cause__)
