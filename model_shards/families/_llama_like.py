"""Shared adapter for Llama-shaped decoders: rotary positions, RMS norms, ``model.layers.N``.

Llama, Mistral, Qwen2 and Mixtral differ here only in their classes and in which layers use
a sliding window; each family module names its classes and, if needed, its windows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from .._masks import StepGeometry, sdpa_mask
from ._base import CacheLayout, ClientLayout, ClientParts, KVWriter, ModelFamily


@dataclass(frozen=True, slots=True)
class RotaryStep:
    """What all blocks of one call share: rotary (cos, sin) and one mask per window size."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    masks: dict[int | None, torch.Tensor | None]


class LlamaLikeFamily(ModelFamily):
    """``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``; rotary positions."""

    layer_class: ClassVar[type[nn.Module]]
    norm_class: ClassVar[type[nn.Module]]
    rotary_class: ClassVar[type[nn.Module]]

    def __init__(self, config: PretrainedConfig, device: torch.device | None = None) -> None:
        super().__init__(config, device)
        self.rotary = self.rotary_class(config=self.config).to(self.device)
        self._windows = {self.window(i) for i in range(self.num_blocks)}
        forward_params = inspect.signature(self.layer_class.forward).parameters
        # transformers renamed past_key_values -> cache during 5.x; call layers by their own name
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    def window(self, index: int) -> int | None:
        """Sliding window of block ``index`` (None: full causal attention)."""
        return None

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def client_layout(self) -> ClientLayout:
        return ClientLayout(
            embeddings="model.embed_tokens", final_norm="model.norm", lm_head="lm_head"
        )

    def build_block(self, index: int) -> nn.Module:
        return self.layer_class(self.config, index)

    def build_client_parts(self) -> ClientParts:
        config = self.config
        return ClientParts(
            embeddings=nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
            final_norm=self.norm_class(config.hidden_size, eps=config.rms_norm_eps),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        )

    def cache_layout(self) -> CacheLayout:
        config = self.config
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return CacheLayout(heads=config.num_key_value_heads, head_dim=head_dim)

    def prepare(self, hidden: torch.Tensor, geometry: StepGeometry) -> RotaryStep:
        return RotaryStep(
            position_ids=geometry.position_ids,
            position_embeddings=self.rotary(hidden, geometry.position_ids),
            masks={window: sdpa_mask(geometry, window) for window in self._windows},
        )

    def run_block(
        self,
        index: int,
        block: nn.Module,
        hidden: torch.Tensor,
        prepared: RotaryStep,
        cache: KVWriter | None,
    ) -> torch.Tensor:
        return block(
            hidden,
            attention_mask=prepared.masks[self.window(index)],
            position_ids=prepared.position_ids,
            position_embeddings=prepared.position_embeddings,
            **{self._cache_kwarg: cache},
        )
