"""BLOOM: ALiBi positions, fused QKV, LayerNorm on the embeddings (kept by the client)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from .._masks import StepGeometry, additive_mask, allowed_keys
from ._base import CacheLayout, ClientLayout, ClientParts, KVWriter, ModelFamily


@dataclass(frozen=True, slots=True)
class BloomStep:
    """ALiBi biases ``[batch * heads, 1, kv]`` and the additive causal mask, built once a call."""

    alibi: torch.Tensor
    mask: torch.Tensor


class BloomFamily(ModelFamily):
    model_type = "bloom"
    attn_implementation = "eager"

    def block_prefix(self, index: int) -> str:
        return f"transformer.h.{index}."

    def client_layout(self) -> ClientLayout:
        return ClientLayout(
            embeddings="transformer.word_embeddings",
            embedding_norm="transformer.word_embeddings_layernorm",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
        )

    def build_block(self, index: int) -> nn.Module:
        return BloomBlock(self.config, layer_idx=index)

    def build_client_parts(self) -> ClientParts:
        config = self.config
        return ClientParts(
            embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            embedding_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            final_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        )

    def cache_layout(self) -> CacheLayout:
        config = self.config
        return CacheLayout(heads=config.n_head, head_dim=config.hidden_size // config.n_head)

    def prepare(self, hidden: torch.Tensor, geometry: StepGeometry) -> BloomStep:
        return BloomStep(
            alibi=build_alibi_tensor(geometry.key_mask.long(), self.config.n_head, hidden.dtype),
            mask=additive_mask(allowed_keys(geometry), hidden.dtype),
        )

    def run_block(
        self,
        index: int,
        block: nn.Module,
        hidden: torch.Tensor,
        prepared: BloomStep,
        cache: KVWriter | None,
    ) -> torch.Tensor:
        output, _ = block(
            hidden, alibi=prepared.alibi, attention_mask=prepared.mask, layer_past=cache
        )
        return output
