"""int8 and nf4 spans equal a local model quantized the same way (bitsandbytes, on CPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import bitsandbytes as bnb
import pytest
import torch

from model_shards import CachePool, Quantization, load_model_ends, load_span, quantize_linears
from model_shards._quant import resolve_quantization
from tests.model_shards.tiny import (
    CONFIGS,
    TinyModel,
    chain_forward,
    chain_generate,
    hf_blocks,
    prompts,
)

BNB_LAYERS = {Quantization.INT8: bnb.nn.Linear8bitLt, Quantization.NF4: bnb.nn.Linear4bit}


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.NF4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_chain_equals_quantized_local_model(
    tiny: Callable[[str], TinyModel], name: str, quantization: Quantization
) -> None:
    tm = tiny(name)
    reference = copy.deepcopy(tm.model)
    quantize_linears(hf_blocks(reference), quantization, torch.float32)
    k = tm.num_blocks // 2
    ends = load_model_ends(tm.path)
    spans = [
        load_span(tm.path, 0, k, quantization=quantization),
        load_span(tm.path, k, tm.num_blocks, quantization=str(quantization)),
    ]
    assert all(s.quantization is quantization for s in spans)
    assert any(isinstance(m, BNB_LAYERS[quantization]) for m in spans[0].blocks.modules())
    assert not any(type(m) is torch.nn.Linear for s in spans for m in s.blocks.modules())

    ids = prompts(2, 9)
    with torch.no_grad():
        expected = reference(ids).logits
        unquantized = tm.model(ids).logits
    logits = chain_forward(ends, spans, ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, unquantized, atol=1e-5)

    generated = reference.generate(ids, do_sample=False, max_new_tokens=32)
    pool = CachePool()
    sessions = [span.open_session(pool, batch_size=2, max_length=41) for span in spans]
    assert torch.equal(chain_generate(ends, sessions, ids, 32), generated)


def test_quantization_shrinks_the_span(tiny: Callable[[str], TinyModel]) -> None:
    tm = tiny("llama")
    sizes = {q: load_span(tm.path, 0, 2, quantization=q).parameter_bytes() for q in Quantization}
    assert sizes[Quantization.NF4] < sizes[Quantization.INT8] < sizes[Quantization.NONE]


def test_default_quantization_is_nf4_on_cuda_none_on_cpu() -> None:
    assert resolve_quantization(None, torch.device("cpu")) is Quantization.NONE
    assert resolve_quantization(None, torch.device("cuda")) is Quantization.NF4
    assert resolve_quantization("int8", torch.device("cuda")) is Quantization.INT8
    with pytest.raises(ValueError):
        resolve_quantization("fp3", torch.device("cpu"))
