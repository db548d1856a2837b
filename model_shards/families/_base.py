"""The contract of a model family adapter: all that is family-specific, nothing else.

An adapter instantiates transformers' own classes (decoder layer, norms, rotary embedding)
and says how to call them; it never copies or overrides modeling code. Span loading,
quantization, the cache pool and the wire format are written once, against this class.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from transformers import PretrainedConfig

from .._masks import StepGeometry


@dataclass(frozen=True, slots=True)
class ClientLayout:
    """Checkpoint prefixes (module paths) of the modules a client keeps."""

    embeddings: str
    final_norm: str
    lm_head: str
    embedding_norm: str | None = None


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Shape of one token's keys (or values) in one block, as Swarm's cache stores them."""

    heads: int
    head_dim: int


@dataclass(eq=False, slots=True)
class ClientParts:
    """The client-side modules, built empty (on the meta device) by the family."""

    embeddings: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear
    embedding_norm: nn.Module | None = None


class KVWriter(Protocol):
    """What a transformers attention layer sees as its cache: ``update(keys, values, layer_idx)``.

    Implemented by ``model_shards._cache.SessionCache``; layers are given one only during an
    inference step. Keys and values arrive and leave as ``[batch, heads, tokens, head_dim]``.
    """

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class ModelFamily(ABC):
    """Adapter for one ``config.model_type``; one instance per loaded model.

    It holds a copy of the config and the small modules every block of a call shares (a
    rotary embedding), on ``device``. Subclasses set ``model_type`` and the attention
    implementation transformers would pick, and implement the abstract methods;
    ``families/__init__.py`` registers them.
    """

    model_type: ClassVar[str]
    attn_implementation: ClassVar[str] = "sdpa"
    experts_implementation: ClassVar[str | None] = None
    spot_checkable: ClassVar[bool] = True
    """Whether honest servers agree within a spot-check tolerance. Not for a mixture of
    experts: rounding that differs between a session step and a checker's replay flips a
    token's expert choice, and the outputs then differ by more than any cheat worth
    catching (docs/benchmarks.md, "Calibration")."""

    def __init__(self, config: PretrainedConfig, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        config = copy.deepcopy(config)
        config._attn_implementation = self.attn_implementation
        if self.experts_implementation is not None:
            config._experts_implementation = self.experts_implementation
        self.config = config

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # checkpoint layout

    @abstractmethod
    def block_prefix(self, index: int) -> str:
        """Checkpoint name prefix of block ``index``, with its trailing dot."""

    def block_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One block's checkpoint tensors (names relative to its prefix) -> the layer's state."""
        return tensors

    @abstractmethod
    def client_layout(self) -> ClientLayout:
        """Where the client-side modules live in the checkpoint."""

    # construction (the loader calls these under ``torch.device("meta")``)

    @abstractmethod
    def build_block(self, index: int) -> nn.Module:
        """transformers' decoder layer for block ``index``."""

    @abstractmethod
    def build_client_parts(self) -> ClientParts:
        """Empty embeddings (and their norm, if any), final norm and LM head."""

    # execution

    @abstractmethod
    def cache_layout(self) -> CacheLayout:
        """How many key/value heads of which size one block keeps per token."""

    def to_cache(self, states: torch.Tensor) -> torch.Tensor:
        """Keys or values as the layer hands them to its cache -> Swarm's cache layout."""
        return states

    def from_cache(self, states: torch.Tensor) -> torch.Tensor:
        """Keys or values in Swarm's cache layout -> as the layer expects them back."""
        return states

    @abstractmethod
    def prepare(self, hidden: torch.Tensor, geometry: StepGeometry) -> Any:
        """What every block of one call shares (masks, rotary cos/sin, alibi), built once."""

    @abstractmethod
    def run_block(
        self,
        index: int,
        block: nn.Module,
        hidden: torch.Tensor,
        prepared: Any,
        cache: KVWriter | None,
    ) -> torch.Tensor:
        """Run block ``index`` on ``[batch, new_tokens, hidden]``; no ``cache`` when stateless."""
