"""End to end: real ``python -m swarm join`` processes on loopback, a client in this process.

For every family, two server processes split a tiny model and greedy generation of 32
tokens through them equals the local transformers model's tokens exactly (float32). Two
more servers serve another model with int8 and nf4 weights; the chain equals a local model
quantized the same way. Every process is stopped (or killed) in teardown.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers

from model_shards import Quantization, quantize_linears
from model_shards._client import DistributedModelForCausalLM
from model_shards._server_limits import ClientLimits
from tests.model_shards.tiny import CONFIGS, TinyModel, hf_blocks, left_padded
from tests.swarm.harness import ProcessSwarm, private_copy

FAMILIES = ["llama", "mistral", "qwen2", "mixtral", "bloom", "falcon"]
TCP = "/ip4/127.0.0.1/tcp/0"
START_TIMEOUT = 240.0
LIMITS = ClientLimits(route_wait_s=30.0)


def join_args(path: Path, blocks: str, bootstrap: str, cache: Path, *extra: str) -> list[str]:
    return [
        "join",
        "--model",
        str(path),
        "--blocks",
        blocks,
        "--bootstrap",
        bootstrap,
        "--listen",
        TCP,
        "--threads",
        "1",
        "--cache-dir",
        str(cache),
        *extra,
    ]


def make_other_llama(directory: Path) -> transformers.PreTrainedModel:
    """A tiny Llama with other weights (seed 1): its own name in the swarm."""
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def swarm(
    tiny: Callable[[str], TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, TinyModel], transformers.PreTrainedModel, Path]]:
    """A bootstrap, two servers per family and two quantized servers, all started at once."""
    logs = tmp_path_factory.mktemp("logs")
    cache = tmp_path_factory.mktemp("cache")
    other_path = tmp_path_factory.mktemp("llama-other")
    other = make_other_llama(other_path)
    copies = tmp_path_factory.mktemp("models")
    models = {name: private_copy(tiny(name), copies) for name in FAMILIES}
    processes = ProcessSwarm(logs)
    try:
        bootstrap = processes.start("bootstrap", ["bootstrap", "--listen", TCP]).addr(60)
        servers = []
        for name, tm in models.items():
            for blocks in ("0:2", "2:4"):
                args = join_args(tm.path, blocks, bootstrap, cache)
                servers.append(processes.start(f"{name}-{blocks}", args))
        for blocks, quant in (("0:2", "int8"), ("2:4", "nf4")):
            args = join_args(other_path, blocks, bootstrap, cache, "--quant", quant)
            servers.append(processes.start(f"other-{quant}", args))
        for server in servers:
            server.wait_for("online", START_TIMEOUT)
        yield bootstrap, models, other, other_path
    finally:
        processes.close(graceful=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_through_two_server_processes_equals_local(
    swarm: tuple[str, dict[str, TinyModel], transformers.PreTrainedModel, Path],
    tiny: Callable[[str], TinyModel],
    name: str,
) -> None:
    bootstrap, models = swarm[0], swarm[1]
    tm = models[name]
    ids, mask = left_padded([6, 4])
    expected = tm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    with DistributedModelForCausalLM.from_pretrained(
        tm.path, initial_peers=[bootstrap], limits=LIMITS
    ) as model:
        with model.inference_session(max_length=38) as session:
            generated = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
            assert len(session.route) == 2
    assert torch.equal(generated, expected)


@pytest.mark.timeout(600)
def test_int8_and_nf4_servers_equal_a_local_model_quantized_the_same_way(
    swarm: tuple[str, dict[str, TinyModel], transformers.PreTrainedModel, Path],
) -> None:
    bootstrap, _, other, other_path = swarm
    reference = copy.deepcopy(other)
    blocks = hf_blocks(reference)
    quantize_linears(blocks[0], Quantization.INT8, torch.float32)
    quantize_linears(blocks[1], Quantization.INT8, torch.float32)
    quantize_linears(blocks[2], Quantization.NF4, torch.float32)
    quantize_linears(blocks[3], Quantization.NF4, torch.float32)
    ids, mask = left_padded([5, 7], seed=3)
    expected = reference.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    unquantized = other.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    with DistributedModelForCausalLM.from_pretrained(
        other_path, initial_peers=[bootstrap], limits=LIMITS
    ) as model:
        generated = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
        quantizations = sorted(s.quantization for s in model.servers().values())
    assert quantizations == ["int8", "nf4"]
    assert torch.equal(generated, expected)
    assert not torch.equal(generated, unquantized)
