"""Falcon: rotary or ALiBi positions; multi-query (7B) or grouped (40B/180B) attention.

The new decoder architecture hands its cache every key/value head broadcast over its query
group (``num_attention_heads`` copies of ``num_kv_heads`` heads); Swarm's cache keeps one
head per group and broadcasts again on the way out, so the cache is heads/kv_heads times
smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.falcon.modeling_falcon import (
    FalconDecoderLayer,
    FalconRotaryEmbedding,
    build_alibi_tensor,
)

from .._masks import StepGeometry, allowed_keys
from ._base import CacheLayout, ClientLayout, ClientParts, KVWriter, ModelFamily


@dataclass(frozen=True, slots=True)
class FalconStep:
    """Masks and positions shared by all blocks of one call (ALiBi folded into the mask)."""

    mask: torch.Tensor
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    alibi: torch.Tensor | None


class FalconFamily(ModelFamily):
    model_type = "falcon"

    def __init__(self, config: PretrainedConfig, device: torch.device | None = None) -> None:
        super().__init__(config, device)
        config = self.config
        self.rotary = None if config.alibi else FalconRotaryEmbedding(config=config).to(self.device)
        self._head_dim = config.hidden_size // config.num_attention_heads
        self._groups = (
            config.num_attention_heads // config.num_kv_heads
            if config.new_decoder_architecture
            else 1
        )

    def block_prefix(self, index: int) -> str:
        return f"transformer.h.{index}."

    def client_layout(self) -> ClientLayout:
        return ClientLayout(
            embeddings="transformer.word_embeddings",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
        )

    def build_block(self, index: int) -> nn.Module:
        return FalconDecoderLayer(self.config, layer_idx=index)

    def build_client_parts(self) -> ClientParts:
        config = self.config
        return ClientParts(
            embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            final_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        )

    def cache_layout(self) -> CacheLayout:
        config = self.config
        if config.new_decoder_architecture:
            heads = config.num_kv_heads
        else:
            heads = 1 if config.multi_query else config.num_attention_heads
        return CacheLayout(heads=heads, head_dim=self._head_dim)

    def to_cache(self, states: torch.Tensor) -> torch.Tensor:
        return states[:, :: self._groups] if self._groups > 1 else states

    def from_cache(self, states: torch.Tensor) -> torch.Tensor:
        return states.repeat_interleave(self._groups, dim=1) if self._groups > 1 else states

    def prepare(self, hidden: torch.Tensor, geometry: StepGeometry) -> FalconStep:
        allowed = allowed_keys(geometry)
        if self.rotary is not None:
            return FalconStep(
                mask=allowed,
                position_ids=geometry.position_ids,
                position_embeddings=self.rotary(hidden, geometry.position_ids),
                alibi=None,
            )
        heads = self.config.num_attention_heads
        alibi = build_alibi_tensor(geometry.key_mask.long(), heads, hidden.dtype)
        # as FalconModel does: the scaled ALiBi bias becomes the additive mask of every head
        biases = alibi.reshape(hidden.shape[0], heads, *alibi.shape[1:]) / math.sqrt(self._head_dim)
        mask = torch.masked_fill(biases, ~allowed, torch.finfo(hidden.dtype).min)
        return FalconStep(
            mask=mask, position_ids=geometry.position_ids, position_embeddings=None, alibi=alibi
        )

    def run_block(
        self,
        index: int,
        block: nn.Module,
        hidden: torch.Tensor,
        prepared: FalconStep,
        cache: KVWriter | None,
    ) -> torch.Tensor:
        output, _ = block(
            hidden,
            alibi=prepared.alibi,
            attention_mask=prepared.mask,
            position_ids=prepared.position_ids,
            layer_past=cache,
            position_embeddings=prepared.position_embeddings,
        )
        return output
