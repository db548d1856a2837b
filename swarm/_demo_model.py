"""The demo's model: a small Llama with random weights (seed 0) and a byte-level tokenizer.

Built with ``transformers`` and ``tokenizers`` alone (nothing downloaded) into a cache
folder, once; later runs reuse it. Its LM head keeps only the rows of letters and the
space, so that the (meaningless) text it generates prints as text.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DEMO_NAME = "swarm-demo-llama"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> object:
    """A byte-level tokenizer: one token per byte (256), plus pad, bos and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _letters(tokenizer: object) -> list[int]:
    """Token ids of the ASCII letters and the space."""
    ids = []
    for token_id in range(len(tokenizer)):  # type: ignore[arg-type]
        text = tokenizer.decode([token_id])  # type: ignore[attr-defined]
        if len(text) == 1 and text.isascii() and (text.isalpha() or text == " "):
            ids.append(token_id)
    return ids


def demo_model(cache_dir: Path) -> Path:
    """The demo checkpoint's directory in ``cache_dir``, built first if missing."""
    path = cache_dir / DEMO_NAME
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    silent = torch.ones(config.vocab_size, dtype=torch.bool)
    silent[_letters(tokenizer)] = False
    with torch.no_grad():
        model.lm_head.weight[silent] = 0
    partial = cache_dir / f"{DEMO_NAME}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)  # type: ignore[attr-defined]
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path
