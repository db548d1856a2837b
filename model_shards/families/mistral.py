"""Mistral: Llama's shape with an optional sliding window on every layer."""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralRMSNorm,
    MistralRotaryEmbedding,
)

from ._llama_like import LlamaLikeFamily


class MistralFamily(LlamaLikeFamily):
    model_type = "mistral"
    layer_class = MistralDecoderLayer
    norm_class = MistralRMSNorm
    rotary_class = MistralRotaryEmbedding

    def window(self, index: int) -> int | None:
        return self.config.sliding_window
