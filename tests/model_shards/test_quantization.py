"""int8 and nf4 spans equal a local model quantized the same way (bitsandbytes, on CPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import bitsandbytes as bnb
import pytest
import torch

from model_shards import CachePool, Quantization, load_model_ends, load_span, quantize_linears
from model_shards._dtypes import resolve_device
from model_shards._quant import QuantizedExperts, resolve_quantization
from tests.model_shards.test_backward import chain_gradient, reference_gradient
from tests.model_shards.tiny import (
    CONFIGS,
    TinyModel,
    chain_forward,
    chain_generate,
    hf_blocks,
    left_padded,
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
    assert not any(p.ndim == 3 for s in spans for p in s.blocks.parameters())

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


def test_device_is_auto_cpu_or_cuda() -> None:
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == auto
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_mixtral_experts_are_quantized(tiny: Callable[[str], TinyModel]) -> None:
    tm = tiny("mixtral")
    sizes = {q: load_span(tm.path, 0, 2, quantization=q) for q in Quantization}
    for quantization in (Quantization.INT8, Quantization.NF4):
        experts = [m for m in sizes[quantization].blocks.modules() if type(m) is QuantizedExperts]
        assert len(experts) == 2
        assert all(type(layer) is BNB_LAYERS[quantization] for layer in experts[0].gate_up)
    full = sizes[Quantization.NONE].parameter_bytes()
    # the experts are 85% of this block's weights; the float32 router and norms stay
    assert sizes[Quantization.INT8].parameter_bytes() < 0.3 * full
    assert sizes[Quantization.NF4].parameter_bytes() < 0.17 * full


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.NF4])
def test_backward_through_quantized_experts(
    tiny: Callable[[str], TinyModel], quantization: Quantization
) -> None:
    tm = tiny("mixtral")
    reference = copy.deepcopy(tm.model)
    quantize_linears(hf_blocks(reference), quantization, torch.float32)
    ids, mask = left_padded([6, 4])
    weights = torch.randn(
        2, 6, tm.model.config.vocab_size, generator=torch.Generator().manual_seed(4)
    )
    h0, grad = chain_gradient(tm, ids, mask, weights, quantization=quantization)
    expected = reference_gradient(reference, ids, mask, h0, weights)
    assert grad.abs().sum() > 0
    real = mask.bool()
    torch.testing.assert_close(grad[real], expected[real], rtol=1e-4, atol=1e-6)


def test_quantized_experts_compute_what_the_fused_experts_compute(
    tiny: Callable[[str], TinyModel],
) -> None:
    """With the nf4 weights dequantized into transformers' own experts module, both agree."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = copy.deepcopy(tiny("mixtral").model.config)
    config._experts_implementation = "eager"
    torch.manual_seed(3)
    bank = MixtralExperts(config)
    torch.nn.init.normal_(bank.gate_up_proj, std=0.2)
    torch.nn.init.normal_(bank.down_proj, std=0.2)
    holder = torch.nn.Module()
    holder.experts = copy.deepcopy(bank)
    quantize_linears(holder, Quantization.NF4, torch.float32)
    quantized = holder.experts
    assert isinstance(quantized, QuantizedExperts) and quantized.num_experts == 4

    def dequantized(layers: torch.nn.ModuleList) -> torch.Tensor:
        return torch.stack(
            [bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]
        )

    with torch.no_grad():
        bank.gate_up_proj.copy_(dequantized(quantized.gate_up))
        bank.down_proj.copy_(dequantized(quantized.down))
    hidden = torch.randn(7, config.hidden_size)
    index = torch.tensor([[0, 2], [1, 2], [2, 0], [3, 1], [0, 3], [2, 3], [1, 0]])
    weights = torch.rand(7, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            quantized(hidden, index, weights), bank(hidden, index, weights), rtol=0, atol=1e-5
        )


def test_unknown_expert_layouts_are_refused(tiny: Callable[[str], TinyModel]) -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    holder = torch.nn.Module()
    holder.experts = MixtralExperts(tiny("mixtral").model.config)
    holder.experts.is_transposed = True
    with pytest.raises(ValueError, match="is_transposed"):
        quantize_linears(holder, Quantization.NF4, torch.float32)
