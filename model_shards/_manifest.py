"""A model's manifest: what names it in the swarm, the way an info-hash names a torrent.

The manifest holds the sha256 of every block's tensors (names relative to the block, dtype,
shape and raw bytes as stored in the checkpoint), of the other tensors (embeddings, norms,
head: the client's side) and of the architecture config. ``model_id`` is the sha256 of all
that, so servers of different weights can never be mixed into one chain, and a loader can
check the weights it read against it.

Hashing reads every tensor once; the result is cached beside the checkpoint in
``swarm_manifest.json`` together with the size and mtime of every file it covers, and is
recomputed when one of them changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import CONFIG_FILE, Checkpoint
from ._errors import CheckpointError
from ._progress import Progress
from .families import ModelFamily, family_for

MANIFEST_FILE = "swarm_manifest.json"
MANIFEST_VERSION = 1
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Manifest:
    """Hashes naming one model; ``model_id`` is its identity, ``short_name`` only for display."""

    model_type: str
    config_hash: str
    block_hashes: tuple[str, ...]
    client_hash: str
    short_name: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    @property
    def model_id(self) -> str:
        """sha256 (hex) of everything but the short name."""
        body = json.dumps(
            {
                "version": MANIFEST_VERSION,
                "model_type": self.model_type,
                "config": self.config_hash,
                "blocks": list(self.block_hashes),
                "client": self.client_hash,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def display_name(self) -> str:
        """``short_name@0123456789ab``: readable, and still unambiguous in practice."""
        return f"{self.short_name}@{self.model_id[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "model_type": self.model_type,
            "short_name": self.short_name,
            "config_hash": self.config_hash,
            "block_hashes": list(self.block_hashes),
            "client_hash": self.client_hash,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of ``to_dict``; ValueError on anything else."""
        try:
            if data["version"] != MANIFEST_VERSION:
                raise ValueError(f"manifest version {data['version']!r} is not {MANIFEST_VERSION}")
            manifest = cls(
                model_type=str(data["model_type"]),
                config_hash=str(data["config_hash"]),
                block_hashes=tuple(str(h) for h in data["block_hashes"]),
                client_hash=str(data["client_hash"]),
                short_name=str(data["short_name"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a manifest: {e}") from e
        return manifest


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over tensors in name order: name, dtype, shape, then the raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0"
        digest.update(header.encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy())
    return digest.hexdigest()


def config_hash(config_json: Mapping[str, Any]) -> str:
    """sha256 (hex) of ``config.json`` as written, less the keys that do not change the model."""
    kept = {k: v for k, v in config_json.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(
        json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def block_names(checkpoint: Checkpoint, family: ModelFamily, index: int) -> list[str]:
    """Checkpoint names of block ``index``'s tensors."""
    return checkpoint.names_with_prefix(family.block_prefix(index))


def client_names(checkpoint: Checkpoint, family: ModelFamily) -> list[str]:
    """Checkpoint names of every tensor outside the blocks (the client's side)."""
    in_blocks = {n for i in range(family.num_blocks) for n in block_names(checkpoint, family, i)}
    return [name for name in checkpoint.names if name not in in_blocks]


def hash_block(family: ModelFamily, index: int, tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash of block ``index`` from its checkpoint tensors (full names)."""
    prefix = family.block_prefix(index)
    return hash_tensors({name.removeprefix(prefix): t for name, t in tensors.items()})


def compute_manifest(
    checkpoint: Checkpoint, *, short_name: str | None = None, progress: Progress | None = None
) -> Manifest:
    """Hash every tensor of ``checkpoint``, block by block (memory: one block at a time)."""
    family = family_for(checkpoint.config)
    hashes = []
    for index in range(family.num_blocks):
        names = block_names(checkpoint, family, index)
        if not names:
            raise CheckpointError(f"{checkpoint.path} has no tensors for block {index}")
        hashes.append(hash_block(family, index, checkpoint.read(names)))
        if progress is not None:
            progress(index + 1, family.num_blocks)
    return Manifest(
        model_type=family.model_type,
        config_hash=config_hash(checkpoint.config_json),
        block_hashes=tuple(hashes),
        client_hash=hash_tensors(checkpoint.read(client_names(checkpoint, family))),
        short_name=short_name or default_short_name(checkpoint.path),
    )


def default_short_name(path: Path) -> str:
    """The directory name, or ``name`` for a Hub cache snapshot of ``org/name``."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


def load_manifest(
    checkpoint: Checkpoint,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    short_name: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """The checkpoint's manifest, from its cache file when still valid, else computed and cached.

    The cache lives at ``cache_path`` (default: ``swarm_manifest.json`` in the checkpoint
    directory); when it cannot be written the manifest is returned uncached, with a warning.
    """
    path = Path(cache_path) if cache_path is not None else checkpoint.path / MANIFEST_FILE
    fingerprint = _fingerprint(checkpoint)
    try:
        cached = json.loads(path.read_text())
        if cached["files"] == fingerprint:
            manifest = Manifest.from_dict(cached["manifest"])
            if short_name is None or manifest.short_name == short_name:
                return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    manifest = compute_manifest(checkpoint, short_name=short_name, progress=progress)
    try:
        path.write_text(
            json.dumps({"files": fingerprint, "manifest": manifest.to_dict()}, indent=1)
        )
    except OSError as e:
        logger.warning("manifest of %s not cached at %s: %s", checkpoint.path, path, e)
    return manifest


def _fingerprint(checkpoint: Checkpoint) -> dict[str, list[int]]:
    files = [checkpoint.path / CONFIG_FILE, *checkpoint.weight_files()]
    fingerprint = {}
    for file in files:
        try:
            stat = file.stat()
        except OSError as e:
            raise CheckpointError(f"{file} is missing: {e}") from e
        fingerprint[file.name] = [stat.st_size, stat.st_mtime_ns]
    return fingerprint
