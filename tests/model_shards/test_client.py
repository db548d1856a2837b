"""``DistributedModelForCausalLM`` against in-process servers on loopback TCP.

Two servers split a tiny Llama; everything the client computes must equal what the local
transformers model computes: greedy and sampled generation, padded batches, sessions that
span several ``generate`` calls, stateless logits, losses and input gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from model_shards import TooLong
from model_shards._client import DistributedModelForCausalLM
from model_shards._server_limits import ClientLimits
from scheduler import MissingBlocksError
from tests.model_shards.tiny import TinyModel, left_padded, prompts
from tests.swarm.harness import LocalSwarm, private_copy


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    made = LocalSwarm(tmp_path_factory.mktemp("swarm-cache"))
    yield made
    made.close()


@pytest.fixture(scope="module")
def llama(
    swarm: LocalSwarm, tiny: Callable[[str], TinyModel]
) -> Iterator[tuple[TinyModel, DistributedModelForCausalLM]]:
    tm = private_copy(tiny("llama"), swarm.cache_dir)
    swarm.serve(tm.path, 0, 2)
    swarm.serve(tm.path, 2, 4)
    model = DistributedModelForCausalLM.from_pretrained(tm.path, initial_peers=[swarm.addr])
    yield tm, model
    model.close()


def test_greedy_generation_of_a_padded_batch_equals_the_local_model(
    llama: tuple[TinyModel, DistributedModelForCausalLM],
) -> None:
    tm, model = llama
    ids, mask = left_padded([7, 4, 9])
    expected = tm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    generated = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    assert torch.equal(generated, expected)
    assert len(model.servers()) == 2


def test_sampling_with_a_seed_is_reproducible_and_equals_the_local_model(
    llama: tuple[TinyModel, DistributedModelForCausalLM],
) -> None:
    tm, model = llama
    ids = prompts(2, 5, seed=11)
    options = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=24, **options))
    torch.manual_seed(123)
    local = tm.model.generate(ids, max_new_tokens=24, **options)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], local)
    torch.manual_seed(124)
    assert not torch.equal(model.generate(ids, max_new_tokens=24, **options), runs[0])


def test_generate_calls_continue_one_session(
    llama: tuple[TinyModel, DistributedModelForCausalLM],
) -> None:
    tm, model = llama
    ids = prompts(1, 6, seed=12)
    expected = tm.model.generate(ids, do_sample=False, max_new_tokens=20)
    with model.inference_session(max_length=40) as session:
        first = model.generate(ids, do_sample=False, max_new_tokens=8)
        assert session.position == 6 + 8 - 1
        assert len(session.route) == 2
        second = model.generate(first, do_sample=False, max_new_tokens=12)
        assert session.position == 6 + 20 - 1
        assert torch.equal(second, expected)
        # a new prompt sharing the first 3 tokens: the servers roll back to them
        other = torch.cat([ids[:, :3], prompts(1, 4, seed=13)], dim=1)
        continued = model.generate(other, do_sample=False, max_new_tokens=6)
        assert session.position == 7 + 6 - 1
    assert torch.equal(continued, tm.model.generate(other, do_sample=False, max_new_tokens=6))


def test_stateless_logits_loss_and_input_gradients_equal_the_local_model(
    llama: tuple[TinyModel, DistributedModelForCausalLM],
) -> None:
    tm, model = llama
    ids, mask = left_padded([6, 3])
    with torch.no_grad():
        expected = tm.model(ids, attention_mask=mask).logits
        logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    labels = prompts(2, 6, seed=14)
    embeds = tm.model.get_input_embeddings()(ids).detach()
    local_embeds = embeds.clone().requires_grad_()
    local = tm.model(inputs_embeds=local_embeds, attention_mask=mask, labels=labels)
    local.loss.backward()
    remote_embeds = embeds.clone().requires_grad_()
    remote = model(inputs_embeds=remote_embeds, attention_mask=mask, labels=labels)
    remote.loss.backward()
    torch.testing.assert_close(remote.loss, local.loss, rtol=0, atol=1e-5)
    assert remote_embeds.grad is not None and local_embeds.grad is not None
    torch.testing.assert_close(remote_embeds.grad, local_embeds.grad, rtol=1e-4, atol=1e-6)


def test_a_session_too_short_fails_with_a_typed_error(
    llama: tuple[TinyModel, DistributedModelForCausalLM],
) -> None:
    _, model = llama
    ids = prompts(1, 4, seed=15)
    with model.inference_session(max_length=6), pytest.raises(TooLong):
        model.generate(ids, do_sample=False, max_new_tokens=8)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(4)[None])


def test_blocks_nobody_serves_raise_missing_blocks(
    swarm: LocalSwarm, tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    tm = private_copy(tiny("qwen2"), tmp_path)
    node = swarm.serve(tm.path, 1, 3)
    limits = ClientLimits(route_wait_s=0.0)
    with DistributedModelForCausalLM.from_pretrained(
        tm.path, initial_peers=[swarm.addr], limits=limits
    ) as model:
        with pytest.raises(MissingBlocksError) as missing:
            model.generate(prompts(1, 3), max_new_tokens=2)
        assert missing.value.blocks == (0, 3)
        swarm.stop(node)
        model.chain._read_at = None
        with pytest.raises(MissingBlocksError) as missing:
            model(prompts(1, 3))
        assert missing.value.blocks == (0, 1, 2, 3)


@pytest.mark.timeout(60)
def test_spot_checks_are_off_for_a_mixture_of_experts(
    swarm: LocalSwarm, tiny: Callable[[str], TinyModel], caplog: pytest.LogCaptureFixture
) -> None:
    """Honest Mixtral servers disagree past any tolerance when rounding flips an expert:
    checking them would convict honest servers, so the client does not (and says so)."""
    for name, checked in (("llama", True), ("mixtral", False)):
        with DistributedModelForCausalLM.from_pretrained(
            tiny(name).path, initial_peers=[swarm.addr], spot_check_rate=0.05
        ) as model:
            assert (model.checker is not None) is checked, name
    assert "spot-checks are off for mixtral models" in caplog.text
