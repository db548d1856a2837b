"""Llama (and every checkpoint that says ``model_type: llama``)."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from ._llama_like import LlamaLikeFamily


class LlamaFamily(LlamaLikeFamily):
    model_type = "llama"
    layer_class = LlamaDecoderLayer
    norm_class = LlamaRMSNorm
    rotary_class = LlamaRotaryEmbedding
