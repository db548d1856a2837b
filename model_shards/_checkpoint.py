"""A local Hugging Face checkpoint, read tensor by tensor.

A checkpoint is a directory holding ``config.json`` and either ``model.safetensors`` or a
``model.safetensors.index.json`` naming the shard file of every tensor. Reading goes through
safetensors' ``safe_open``: only the named tensors are read, and a shard file is opened only
when one of its tensors is asked for, so the memory (and the files) a span needs follow the
span, not the model.

A Hub name (``org/model``) is accepted only when the model is already in the local Hugging
Face cache; nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ._errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def resolve_checkpoint_dir(
    source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The local directory of ``source``: a directory path, or a Hub name already cached.

    ``cache_dir`` is the Hugging Face hub cache to look in (default: ``HF_HUB_CACHE``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; a checkpoint is a directory with {CONFIG_FILE}")
    try:
        snapshot = snapshot_download(str(source), local_files_only=True, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, HFValidationError) as e:
        raise CheckpointError(
            f"{str(source)!r} is neither a local directory nor a model in the local Hugging Face "
            f"cache; download it first (e.g. `hf download {source}`), Swarm never downloads: {e}"
        ) from e
    return Path(snapshot)


class Checkpoint:
    """One local safetensors checkpoint: its config and where each tensor lives."""

    def __init__(self, path: Path, config: PretrainedConfig, files: Mapping[str, str]) -> None:
        self.path = path
        self.config = config
        self._files = dict(files)
        self.names: tuple[str, ...] = tuple(sorted(self._files))

    @classmethod
    def open(
        cls, source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
    ) -> Checkpoint:
        """Open the checkpoint at ``source`` (a directory, or a Hub name in the local cache).

        Reads the config and the tensor index (or the single file's header), no weights.
        """
        path = resolve_checkpoint_dir(source, cache_dir=cache_dir)
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_FILE}")
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (ValueError, OSError, KeyError) as e:
            raise CheckpointError(
                f"{path / CONFIG_FILE} cannot be read as a model config: {e}"
            ) from e
        return cls(path, config, _tensor_files(path))

    @property
    def config_json(self) -> dict[str, Any]:
        """The raw ``config.json`` as written (for hashing: stable across transformers versions)."""
        return json.loads((self.path / CONFIG_FILE).read_text())

    def weight_files(self) -> list[Path]:
        """Every weight file the checkpoint refers to, sorted by name."""
        return [self.path / name for name in sorted(set(self._files.values()))]

    def names_with_prefix(self, prefix: str) -> list[str]:
        """Names of the tensors that start with ``prefix``, sorted."""
        return [name for name in self.names if name.startswith(prefix)]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (CPU, stored dtype), opening only the files that hold them."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._files:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.path}")
            by_file.setdefault(self._files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, file_names in by_file.items():
            file_path = self.path / file_name
            if not file_path.is_file():
                raise CheckpointError(f"{file_path} is missing; it holds {file_names[0]!r}")
            try:
                with safe_open(str(file_path), framework="pt", device="cpu") as f:
                    for name in file_names:
                        tensors[name] = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file_path} cannot be read: {e}") from e
        return tensors


def _tensor_files(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from e
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and Path(v).name == v
            for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        return weight_map
    single = path / SINGLE_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt", device="cpu") as f:
                return dict.fromkeys(f.keys(), SINGLE_FILE)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{single} cannot be read: {e}") from e
    raise CheckpointError(
        f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
        "Swarm reads safetensors checkpoints only"
    )


def assign_state(module: nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Assign checkpoint tensors to a module built on the meta device (CheckpointError: no fit)."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        problems = [
            f"{kind} {names[:5]}"
            for kind, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        raise CheckpointError(
            f"{what}: checkpoint tensors do not match the layer: {', '.join(problems)}"
        )
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: checkpoint tensors do not fit the layer: {e}") from e
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{what}: no checkpoint tensor for {leftover[:5]}")
