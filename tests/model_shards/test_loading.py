"""Loading: only the span's tensors and files, sharded checkpoints, Hub cache, dtypes, errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model_shards import (
    Checkpoint,
    CheckpointError,
    ModelFamily,
    UnknownModelFamily,
    load_manifest,
    load_model_ends,
    load_span,
    tqdm_progress,
)
from model_shards._checkpoint import INDEX_FILE, SINGLE_FILE, assign_state
from model_shards._span import avoid_cudnn_attention
from model_shards.families import FAMILIES
from model_shards.families.mixtral import MixtralFamily
from tests.model_shards.tiny import TinyModel, chain_forward, hf_blocks, make_tiny, prompts


def block_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_span_memory_follows_the_span(tiny: Callable[[str], TinyModel]) -> None:
    tm = tiny("mixtral")
    total = block_bytes(hf_blocks(tm.model))
    one = load_span(tm.path, 1, 2)
    three = load_span(tm.path, 0, 3)
    assert one.parameter_bytes() == block_bytes(hf_blocks(tm.model)[1])
    assert one.parameter_bytes() == pytest.approx(total / 4, rel=1e-6)
    assert three.parameter_bytes() == pytest.approx(3 * total / 4, rel=1e-6)
    ends = load_model_ends(tm.path)
    assert block_bytes(ends) < total / 4


def test_sharded_checkpoint_reads_only_the_files_it_needs(tmp_path: Path) -> None:
    tm = make_tiny("llama", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tm.path / INDEX_FILE).read_text())["weight_map"]
    assert not (tm.path / SINGLE_FILE).exists()
    assert len(set(index.values())) >= 4

    def files_of(prefixes: tuple[str, ...]) -> set[str]:
        return {f for name, f in index.items() if name.startswith(prefixes)}

    client_files = files_of(("model.embed_tokens.", "model.norm.", "lm_head."))
    block3_files = files_of(("model.layers.3.",))
    # a server for block 3 and a client need only their files: remove every other shard
    for file in set(index.values()) - client_files - block3_files:
        (tm.path / file).unlink()
    span = load_span(tm.path, 3, 4)
    ends = load_model_ends(tm.path)
    with pytest.raises(CheckpointError, match="is missing"):
        load_span(tm.path, 0, 1)

    ids = prompts(1, 6)
    with torch.no_grad():
        output = tm.model(ids, output_hidden_states=True)
        logits = ends.logits(span.forward(output.hidden_states[3]))  # the input of block 3
    torch.testing.assert_close(logits, output.logits, rtol=0, atol=1e-5)


def test_sharded_and_single_file_checkpoints_load_the_same(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    single = tiny("qwen2")
    sharded = make_tiny("qwen2", tmp_path, max_shard_size="30KB")
    assert (sharded.path / INDEX_FILE).exists()
    ids = prompts(2, 7)
    outputs = [
        chain_forward(load_model_ends(t.path), [load_span(t.path, 0, 4)], ids)
        for t in (single, sharded)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    # A download brings the weights, never a manifest cached by another test.
    shutil.copytree(
        checkpoint,
        repo / "snapshots" / commit,
        ignore=shutil.ignore_patterns("swarm_manifest.json"),
    )


def test_hub_names_resolve_from_the_local_cache_only(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    tm = tiny("bloom")
    fake_hub_cache(tmp_path, "tiny-org/tiny-bloom", tm.path)
    span = load_span("tiny-org/tiny-bloom", 0, 2, cache_dir=tmp_path)
    ends = load_model_ends("tiny-org/tiny-bloom", cache_dir=tmp_path)
    assert span.family.model_type == "bloom" and ends.vocab_size == tm.model.config.vocab_size
    checkpoint = Checkpoint.open("tiny-org/tiny-bloom", cache_dir=tmp_path)
    assert load_manifest(checkpoint).display_name.startswith("tiny-bloom@")
    with pytest.raises(CheckpointError, match="never downloads"):
        load_span("tiny-org/not-cached", 0, 1, cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="never downloads"):
        Checkpoint.open("not a repo id!", cache_dir=tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_spans(tiny: Callable[[str], TinyModel], dtype: torch.dtype) -> None:
    tm = tiny("llama")
    ends = load_model_ends(tm.path, dtype=dtype)
    spans = [load_span(tm.path, 0, 2, dtype=dtype), load_span(tm.path, 2, 4, dtype=str(dtype)[6:])]
    assert all(p.dtype == dtype for s in spans for p in s.blocks.parameters())
    ids = prompts(2, 8)
    logits = chain_forward(ends, spans, ids)
    assert logits.dtype == dtype
    with torch.no_grad():
        expected = tm.model(ids).logits
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=2e-2)


def test_tied_embeddings_share_the_head(tiny: Callable[[str], TinyModel]) -> None:
    ends = load_model_ends(tiny("falcon").path)
    assert ends.lm_head.weight is ends.embeddings.weight
    untied = load_model_ends(tiny("llama").path)
    assert untied.lm_head.weight is not untied.embeddings.weight


def test_progress_is_reported_per_block(tiny: Callable[[str], TinyModel]) -> None:
    calls: list[tuple[int, int]] = []
    load_span(tiny("llama").path, 1, 4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    load_span(tiny("llama").path, 0, 2, progress=tqdm_progress("loading"))


def test_registry_covers_the_six_families() -> None:
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "mixtral", "bloom", "falcon"}
    assert all(
        issubclass(f, ModelFamily) and FAMILIES[f.model_type] is f for f in FAMILIES.values()
    )


def test_unknown_family_and_bad_spans(tmp_path: Path, tiny: Callable[[str], TinyModel]) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnknownModelFamily, match="gpt2"):
        load_span(tmp_path / "gpt2", 0, 1)
    path = tiny("llama").path
    for start, end in [(0, 0), (3, 2), (-1, 2), (0, 5)]:
        with pytest.raises(ValueError, match="not inside"):
            load_span(path, start, end)
    with pytest.raises(ValueError, match="compute dtype"):
        load_span(path, 0, 1, dtype="int8")


def test_incomplete_or_foreign_checkpoints(
    tmp_path: Path, tiny: Callable[[str], TinyModel]
) -> None:
    source = tiny("llama").path
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / SINGLE_FILE)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.mlp.extra.weight"] = torch.zeros(2)
    tensors["model.layers.3.mlp.up_proj.weight"] = torch.zeros(3, 3)
    del tensors["lm_head.weight"]
    save_file(tensors, broken / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"layer: missing \['mlp.up_proj.weight'\]$"):
        load_span(broken, 1, 2)
    with pytest.raises(CheckpointError, match=r"layer: unexpected \['mlp.extra.weight'\]$"):
        load_span(broken, 2, 3)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_span(broken, 3, 4)
    with pytest.raises(CheckpointError, match="not tied"):
        load_model_ends(broken)

    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_span(tmp_path, 0, 1)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot be read as a model config"):
        load_span(tmp_path, 0, 1)
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(CheckpointError, match="safetensors checkpoints only"):
        load_span(tmp_path, 0, 1)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "../escape.safetensors"}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_span(tmp_path, 0, 1)
    (tmp_path / INDEX_FILE).unlink()
    (tmp_path / SINGLE_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_span(tmp_path, 0, 1)
    with pytest.raises(CheckpointError, match="is a file"):
        load_span(tmp_path / SINGLE_FILE, 0, 1)


def test_mixtral_fused_expert_layout_passes_through(tiny: Callable[[str], TinyModel]) -> None:
    family = MixtralFamily(tiny("mixtral").model.config)
    fused = {
        "mlp.experts.gate_up_proj": torch.zeros(4, 96, 32),
        "mlp.experts.down_proj": torch.zeros(4, 32, 48),
        "mlp.gate.weight": torch.zeros(4, 32),
    }
    assert family.block_state(dict(fused)) == fused


def test_broken_shards_and_indexes(tmp_path: Path) -> None:
    tm = make_tiny("llama", tmp_path / "sharded", max_shard_size="40KB")
    checkpoint = Checkpoint.open(tm.path)
    with pytest.raises(CheckpointError, match="'nope' is not in the checkpoint"):
        checkpoint.read(["nope"])
    index = json.loads((tm.path / INDEX_FILE).read_text())["weight_map"]
    (tm.path / index["model.layers.0.mlp.up_proj.weight"]).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_span(tm.path, 0, 1)
    (tm.path / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        Checkpoint.open(tm.path)


def test_descriptions_and_explicit_device(tiny: Callable[[str], TinyModel]) -> None:
    path = tiny("bloom").path
    span = load_span(path, 1, 3, device="cpu", quantization="nf4")
    assert repr(span) == "Span(bloom blocks [1, 3) of 4, float32, nf4, cpu)"
    ends = load_model_ends(path, device=torch.device("cpu"))
    assert "bloom, float32, cpu" in repr(ends)
    assert ends.hidden_size == span.hidden_size == 32
    assert ends.embedding_norm is not None


def test_every_tensor_of_a_block_must_come_from_the_checkpoint() -> None:
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
        module.register_buffer("scale", torch.ones(2), persistent=False)
    state = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"no checkpoint tensor for \['scale'\]"):
        assign_state(module, state, what="test block")


@pytest.mark.timeout(10)
def test_cudnn_attention_can_be_turned_off_for_the_process() -> None:
    """What ``load_span`` does on CUDA (no GPU here: the switch itself)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
