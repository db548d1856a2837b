"""Server-to-server push, seen from the client, against in-process servers on loopback.

A tiny Llama in four one-block spans: with push the client sends each step to the first
server only and reads every server's output; without, it relays every output itself.
Both must generate what the local model does. A push the next server refuses falls back
to the client's relay; a server leaving mid-generation is replaced and its neighbours
relinked, after which the servers push again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from model_shards._client import DistributedModelForCausalLM
from model_shards._client_session import ChainSession
from model_shards._client_timing import TokenClock
from model_shards._server_limits import ClientLimits, ServerLimits
from tests.model_shards.tiny import TinyModel, prompts
from tests.swarm.harness import LocalSwarm, private_copy

PROMPT = prompts(1, 6, seed=21)
NEW_TOKENS = 24
SPANS = [(0, 1), (1, 2), (2, 3), (3, 4)]
QUICK_LEAVE = ServerLimits(drain_timeout_s=0.1)


@pytest.fixture
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    made = LocalSwarm(tmp_path_factory.mktemp("client-push"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def llama(swarm: LocalSwarm, tiny: Callable[[str], TinyModel]) -> TinyModel:
    tm = private_copy(tiny("llama"), swarm.cache_dir)
    for start, end in SPANS:
        swarm.serve(tm.path, start, end, rebalance=False, limits=QUICK_LEAVE)
    return tm


def chain_of(model: DistributedModelForCausalLM) -> ChainSession:
    session = model.session
    assert session is not None and session._chain is not None
    return session._chain


def generate_counting(
    model: DistributedModelForCausalLM, ids: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, int]:
    """Tokens of a greedy generation, and how many steps the client sent to servers."""
    with model.inference_session(max_length=ids.shape[1] + new_tokens):
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens)
        return out, chain_of(model).sends


@pytest.mark.timeout(60)
def test_push_generates_the_same_tokens_as_client_relay(
    swarm: LocalSwarm, llama: TinyModel
) -> None:
    expected = llama.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
    runs = {}
    for push in (True, False):
        limits = ClientLimits(push=push)
        with DistributedModelForCausalLM.from_pretrained(
            llama.path, initial_peers=[swarm.addr], limits=limits
        ) as model:
            runs[push] = generate_counting(model, PROMPT, NEW_TOKENS)
    (pushed, pushed_sends), (relayed, relayed_sends) = runs[True], runs[False]
    assert torch.equal(pushed, expected) and torch.equal(relayed, expected)
    assert pushed_sends == NEW_TOKENS
    assert relayed_sends == NEW_TOKENS * len(SPANS)


@pytest.mark.timeout(60)
def test_a_refused_push_falls_back_to_client_relay(swarm: LocalSwarm, llama: TinyModel) -> None:
    first_tokens = 8
    expected = llama.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
    with DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[swarm.addr]
    ) as model:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
            start = model.generate(PROMPT, do_sample=False, max_new_tokens=first_tokens)
            chain = chain_of(model)
            assert chain.sends == first_tokens
            second = chain.hops[2]
            # the third server now takes pushes from nobody: the second's pushes are refused
            model.client.run(second.link(None, second.next_hop))
            out = model.generate(start, do_sample=False, max_new_tokens=NEW_TOKENS - first_tokens)
            sends = chain.sends
    assert torch.equal(out, expected)
    assert sends == first_tokens + 2 * (NEW_TOKENS - first_tokens)


@pytest.mark.timeout(60)
def test_a_leaving_server_is_replaced_and_pushes_resume(
    swarm: LocalSwarm, llama: TinyModel
) -> None:
    spare = swarm.serve(llama.path, 1, 2, rebalance=False, limits=QUICK_LEAVE)
    swarm.announce_throughput(spare, spare.server.throughput / 10)
    expected = llama.model.generate(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)
    leave_at = 8
    sends_at: dict[int, int] = {}

    with DistributedModelForCausalLM.from_pretrained(
        llama.path, initial_peers=[swarm.addr]
    ) as model:

        def on_token(token: int) -> None:
            chain = chain_of(model)
            sends_at[token] = chain.sends
            if token == leave_at:
                (used,) = (n for n in swarm.nodes if n.host.peer_id == chain.hops[1].hop.peer_id)
                assert used is not spare
                swarm.stop(used)

        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
            out = model.generate(
                PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS, streamer=TokenClock(on_token)
            )
            chain = chain_of(model)
            (failover,) = chain.failovers
            route = chain.route
    assert torch.equal(out, expected)
    assert (failover.start, failover.end) == (1, 2)
    assert [h.peer_id for h in failover.replacement] == [spare.host.peer_id]
    assert route[1].peer_id == spare.host.peer_id
    # one send per token before and after the failover: the neighbours push into the spare
    assert sends_at[leave_at] == leave_at
    assert sends_at[NEW_TOKENS] - sends_at[leave_at + 1] == NEW_TOKENS - leave_at - 1
