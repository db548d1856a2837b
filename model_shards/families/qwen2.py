"""Qwen2: Llama's shape; ``sliding_attention`` layers (``config.layer_types``) use a window."""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

from ._llama_like import LlamaLikeFamily


class Qwen2Family(LlamaLikeFamily):
    model_type = "qwen2"
    layer_class = Qwen2DecoderLayer
    norm_class = Qwen2RMSNorm
    rotary_class = Qwen2RotaryEmbedding

    def window(self, index: int) -> int | None:
        if self.config.layer_types[index] == "sliding_attention":
            return self.config.sliding_window
        return None
