"""Tiny models of every family, built from configs with a fixed seed and saved to disk.

Nothing is downloaded: each model is random, saved with ``save_pretrained`` (safetensors)
and read back through model_shards' own loading code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from model_shards import InferenceSession, ModelEnds, Span

VOCAB = 96


def _common() -> dict[str, object]:
    return {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None}


CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_common(),
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=256,
        **_common(),
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **_common(),
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        **_common(),
    ),
    "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=4, n_head=4, **_common()),
    "falcon": lambda: transformers.FalconConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        **_common(),
    ),
    "falcon-mq": lambda: transformers.FalconConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        multi_query=True,
        parallel_attn=True,
        **_common(),
    ),
    "falcon-alibi": lambda: transformers.FalconConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        alibi=True,
        multi_query=False,
        parallel_attn=False,
        bias=True,
        **_common(),
    ),
}
"""Falcon three ways: grouped "new decoder" (40B/180B), multi-query (7B), ALiBi (RW)."""


@dataclass
class TinyModel:
    name: str
    path: Path
    model: transformers.PreTrainedModel

    @property
    def num_blocks(self) -> int:
        return self.model.config.num_hidden_layers


def wide_llama(hidden: int) -> transformers.LlamaConfig:
    """A four-block Llama of ``hidden`` channels in four heads (head_dim 64 at 256, as real
    ones), its MLP 2.6875 times as wide (as Llama 2 7B's)."""
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 43 // 16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_common(),
    )


CALIBRATION_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    **CONFIGS,
    "llama-128": lambda: wide_llama(128),
    "llama-256": lambda: wide_llama(256),
}
"""The tiny models (hidden size 32) and Llamas of hidden size 128 and 256: what spot-check
tolerances are calibrated (``benchmarks/tolerance.py``) and tested on."""


def span_as(span: Span, cls: type[Span]) -> Span:
    """``span``'s blocks, unchanged, in ``cls``: a test's ``Span`` subclass that wraps the
    real computation (a slow or a cheating server)."""
    return cls(
        span.family,
        list(span.blocks),
        span.start,
        dtype=span.dtype,
        device=span.device,
        quantization=span.quantization,
        limits=span.limits,
    )


def make_tiny(name: str, directory: Path, *, max_shard_size: str | None = None) -> TinyModel:
    """Build ``name``'s tiny model with seed 0 and save it (sharded when ``max_shard_size``)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    model.generation_config.eos_token_id = None
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return TinyModel(name, directory, model)


def hf_blocks(model: transformers.PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a full transformers model."""
    for path in ("model.layers", "transformer.h"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(f"no decoder layers in {type(model).__name__}")


def prompts(batch: int, length: int, *, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded(lengths: Sequence[int], *, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of prompts of ``lengths``, left-padded with token 0."""
    width = max(lengths)
    ids = prompts(len(lengths), width, seed=seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = 0
        mask[row, : width - length] = 0
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from an attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def chain_forward(
    ends: ModelEnds, spans: Sequence[Span], ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of ``ids`` through the client's ends and the spans, stateless."""
    with torch.no_grad():
        hidden = ends.embed(ids)
        for span in spans:
            hidden = span.forward(hidden, attention_mask=mask)
        return ends.logits(hidden)


def chain_step(
    ends: ModelEnds,
    sessions: Sequence[InferenceSession],
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of new tokens ``ids`` through the sessions (each keeps its cache)."""
    with torch.no_grad():
        hidden = ends.embed(ids)
        for session in sessions:
            hidden = session.step(hidden, attention_mask=mask)
        return ends.logits(hidden)


def chain_generate(
    ends: ModelEnds,
    sessions: Sequence[InferenceSession],
    ids: torch.Tensor,
    new_tokens: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy generation through the sessions: prompt + ``new_tokens`` token ids."""
    out = ids
    logits = chain_step(ends, sessions, ids, mask)
    for i in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, token], dim=1)
        if i + 1 < new_tokens:
            logits = chain_step(ends, sessions, token)
    return out
