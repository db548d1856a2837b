"""A server that is slow but alive does not end a generation (in-process servers, loopback).

Blocks [2, 4) are served by one server only; its span sleeps once, mid-generation, longer
than the client's step deadline. With nothing to fail over to, the client must keep
waiting on it (it still answers pings) and the tokens must be the local model's. With a
spare for that span, the slow server is failed over and only softly banned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from model_shards import Span
from model_shards._client import DistributedModelForCausalLM
from model_shards._server_limits import ClientLimits
from model_shards._server_node import ServerNode
from tests.model_shards.tiny import TinyModel, prompts, span_as
from tests.swarm.harness import LocalSwarm

NEW_TOKENS = 12
SLOW_AT_STEP = 5
SLEEP_S = 1.5
PROMPT = prompts(1, 6, seed=11)
LIMITS = ClientLimits(step_timeout_base_s=0.5, failover_wait_s=0.5, route_poll_s=0.1)
"""Without the slow-hop rule this client would give up after 0.5 s + 0.5 s."""


class SlowOnce:
    """Makes a server's inference steps sleep ``SLEEP_S`` once, at its ``SLOW_AT_STEP``-th."""

    def __init__(self) -> None:
        self.steps = 0
        self.slept = threading.Event()

    def install(self, node: ServerNode) -> None:
        server = node.server
        honest_span_for = server._span_for
        built: dict[tuple[int, int], Span] = {}

        def span_for(request: dict[str, Any]) -> Span:
            span = honest_span_for(request)
            key = (span.start, span.end)
            if key not in built:
                built[key] = self.slow(span)
            return built[key]

        server._span_for = span_for
        server.span = self.slow(server.span)

    def slow(self, span: Span) -> Span:
        watch = self

        class SlowSpan(Span):
            def _run(self, hidden: torch.Tensor, geometry: Any, cache: Any) -> torch.Tensor:
                if cache is not None:
                    watch.steps += 1
                    if watch.steps == SLOW_AT_STEP:
                        time.sleep(SLEEP_S)
                        watch.slept.set()
                return super()._run(hidden, geometry, cache)

        return span_as(span, SlowSpan)


@pytest.fixture
def llama(tiny: Callable[[str], TinyModel]) -> TinyModel:
    return tiny("llama")


@pytest.fixture
def expected(llama: TinyModel) -> torch.Tensor:
    return llama.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)


@pytest.fixture
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    made = LocalSwarm(tmp_path_factory.mktemp("slow-hop"))
    try:
        yield made
    finally:
        made.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("push", [True, False])
def test_a_slow_server_without_a_spare_is_waited_for(
    llama: TinyModel, expected: torch.Tensor, local: LocalSwarm, push: bool
) -> None:
    local.serve(llama.path, 0, 2, rebalance=False)
    slow = SlowOnce()
    slow.install(local.serve(llama.path, 2, 4, rebalance=False))
    limits = ClientLimits(step_timeout_base_s=0.5, failover_wait_s=0.5, route_poll_s=0.1, push=push)
    with DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[local.addr], limits=limits
    ) as model:
        with model.inference_session(max_length=32) as session:
            tokens = model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
            assert session.failovers == []
    assert slow.slept.is_set()
    assert torch.equal(tokens, expected)


@pytest.mark.timeout(60)
def test_a_slow_server_with_a_spare_is_replaced_and_softly_banned(
    llama: TinyModel, expected: torch.Tensor, local: LocalSwarm
) -> None:
    local.serve(llama.path, 0, 2, rebalance=False)
    slow = SlowOnce()
    slow_node = local.serve(llama.path, 2, 4, rebalance=False)
    slow.install(slow_node)
    spare = local.serve(llama.path, 2, 4, rebalance=False)
    local.announce_throughput(spare, slow_node.server.throughput / 10)
    with DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[local.addr], limits=LIMITS
    ) as model:
        with model.inference_session(max_length=32) as session:
            tokens = model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
            (failover,) = session.failovers
        assert failover.failed == slow_node.host.peer_id
        assert "TimeoutError" in failover.cause
        slow_key = str(slow_node.host.peer_id)
        assert slow_key in model.chain.banned()
        assert slow_key not in model.chain.banned(soft=False)
    assert torch.equal(tokens, expected)
