"""Manifests: a model's identity from its weights, cached beside the checkpoint, checked on load."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_shards import (
    Checkpoint,
    CheckpointError,
    Manifest,
    ManifestMismatch,
    compute_manifest,
    load_manifest,
    load_model_ends,
    load_span,
)
from model_shards._checkpoint import SINGLE_FILE
from model_shards._manifest import MANIFEST_FILE
from tests.model_shards.tiny import TinyModel, make_tiny


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(MANIFEST_FILE))
    return target


def test_manifest_names_the_weights_not_the_files(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    tm = tiny("llama")
    manifest = compute_manifest(Checkpoint.open(tm.path), short_name="tiny-llama")
    assert manifest.num_blocks == 4 and len(set(manifest.block_hashes)) == 4
    assert len(manifest.model_id) == 64
    assert manifest.display_name == f"tiny-llama@{manifest.model_id[:12]}"
    # the same weights sharded differently: same identity
    sharded = make_tiny("llama", tmp_path / "sharded", max_shard_size="40KB")
    assert compute_manifest(Checkpoint.open(sharded.path)).model_id == manifest.model_id
    # one changed value in one block: that block's hash and the identity change, nothing else
    changed = copy_checkpoint(tm.path, tmp_path / "changed")
    tensors = load_file(changed / SINGLE_FILE)
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] += 1
    save_file(tensors, changed / SINGLE_FILE)
    other = compute_manifest(Checkpoint.open(changed))
    assert other.model_id != manifest.model_id
    same = [a == b for a, b in zip(other.block_hashes, manifest.block_hashes, strict=True)]
    assert same == [True, True, False, True]
    assert other.client_hash == manifest.client_hash
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    with pytest.raises(ValueError, match="not a manifest"):
        Manifest.from_dict({"version": 1})
    with pytest.raises(ValueError, match="version"):
        Manifest.from_dict({**manifest.to_dict(), "version": 99})


def test_manifest_is_cached_and_recomputed_when_files_change(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny("mistral").path, tmp_path / "mistral")
    checkpoint = Checkpoint.open(path)
    manifest = load_manifest(checkpoint)
    assert manifest.short_name == "mistral"
    cache = json.loads((path / MANIFEST_FILE).read_text())
    # the cached file is what answers next time
    cache["manifest"]["client_hash"] = "0" * 64
    (path / MANIFEST_FILE).write_text(json.dumps(cache))
    assert load_manifest(checkpoint).client_hash == "0" * 64
    renamed = load_manifest(checkpoint, short_name="renamed")
    assert renamed == dataclasses.replace(manifest, short_name="renamed")
    # touching a weight file invalidates the cache
    weights = path / SINGLE_FILE
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_manifest(checkpoint, short_name="mistral") == manifest
    (path / MANIFEST_FILE).write_text("{not json")
    assert load_manifest(checkpoint, short_name="mistral") == manifest


def test_unwritable_cache_warns_and_still_answers(
    tiny: Callable[[str], TinyModel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = Checkpoint.open(tiny("bloom").path)
    with caplog.at_level(logging.WARNING, logger="model_shards._manifest"):
        manifest = load_manifest(checkpoint, cache_path=tmp_path / "missing-dir" / "m.json")
    assert manifest.model_type == "bloom"
    assert "not cached" in caplog.text


def test_loaders_check_weights_against_the_manifest(
    tiny: Callable[[str], TinyModel], tmp_path: Path
) -> None:
    tm = tiny("falcon")
    manifest = load_manifest(Checkpoint.open(tm.path))
    span = load_span(tm.path, 1, 3, manifest=manifest)
    assert span.end == 3
    load_model_ends(tm.path, manifest=manifest)

    tampered = copy_checkpoint(tm.path, tmp_path / "tampered")
    tensors = load_file(tampered / SINGLE_FILE)
    tensors["transformer.h.2.mlp.dense_4h_to_h.weight"] *= 1.001
    tensors["transformer.ln_f.weight"] += 1
    save_file(tensors, tampered / SINGLE_FILE)
    load_span(tampered, 0, 2, manifest=manifest)
    with pytest.raises(ManifestMismatch, match="block 2"):
        load_span(tampered, 1, 3, manifest=manifest)
    with pytest.raises(ManifestMismatch, match="final norm"):
        load_model_ends(tampered, manifest=manifest)

    other = load_manifest(Checkpoint.open(tiny("falcon-mq").path))
    with pytest.raises(ManifestMismatch, match=r"config\.json"):
        load_span(tm.path, 0, 1, manifest=other)
    llama = load_manifest(Checkpoint.open(tiny("llama").path))
    with pytest.raises(ManifestMismatch, match="model type"):
        load_span(tm.path, 0, 1, manifest=llama)
    assert torch.equal(
        load_span(tm.path, 0, 1).blocks[0].mlp.dense_4h_to_h.weight,
        tm.model.transformer.h[0].mlp.dense_4h_to_h.weight,
    )


def test_manifest_needs_every_block_and_file(tmp_path: Path) -> None:
    tm = make_tiny("llama", tmp_path / "llama", max_shard_size="40KB")
    calls: list[tuple[int, int]] = []
    compute_manifest(Checkpoint.open(tm.path), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    index_path = tm.path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (tm.path / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_manifest(Checkpoint.open(tm.path))
    index["weight_map"] = {
        k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.1.")
    }
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no tensors for block 1"):
        compute_manifest(Checkpoint.open(tm.path))


def test_any_stored_dtype_hashes(tmp_path: Path, tiny: Callable[[str], TinyModel]) -> None:
    path = copy_checkpoint(tiny("llama").path, tmp_path / "f64")
    tensors = load_file(path / SINGLE_FILE)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
    save_file(tensors, path / SINGLE_FILE)
    manifest = compute_manifest(Checkpoint.open(path))
    assert manifest.client_hash != compute_manifest(Checkpoint.open(tiny("llama").path)).client_hash
    assert load_model_ends(path, manifest=manifest).final_norm.weight.dtype == torch.float32
