"""Backward through two spans: the gradient at the first block's input equals autograd's."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from model_shards import Quantization, load_model_ends, load_span, quantize_linears
from tests.model_shards.tiny import CONFIGS, TinyModel, hf_blocks, left_padded, mask_positions


def reference_gradient(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    first_input: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """d(sum(logits * weights)) / d(input of block 0), through the full transformers model."""
    leaf = first_input.detach().clone().requires_grad_()

    def swap_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        return (leaf, *args[1:]), kwargs

    handle = hf_blocks(model)[0].register_forward_pre_hook(swap_input, with_kwargs=True)
    try:
        logits = model(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad((logits * weights).sum(), leaf)
    return grad


def chain_gradient(
    tm: TinyModel, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of span 0, its gradient) as a fine-tuning client gets it from two servers."""
    k = tm.num_blocks // 2
    ends = load_model_ends(tm.path)
    first = load_span(tm.path, 0, k, **kwargs)
    second = load_span(tm.path, k, tm.num_blocks, **kwargs)
    h0 = ends.embed(ids)
    h1 = first.forward(h0, attention_mask=mask)
    h2 = second.forward(h1, attention_mask=mask).requires_grad_()
    (ends.logits(h2) * weights).sum().backward()
    g1 = second.backward(h1, h2.grad, attention_mask=mask)
    return h0, first.backward(h0, g1, attention_mask=mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_backward_matches_autograd(tiny: Callable[[str], TinyModel], name: str) -> None:
    tm = tiny(name)
    ids, mask = left_padded([6, 4])
    weights = torch.randn(
        2, 6, tm.model.config.vocab_size, generator=torch.Generator().manual_seed(3)
    )
    h0, grad = chain_gradient(tm, ids, mask, weights)
    expected = reference_gradient(tm.model, ids, mask, h0, weights)
    real = mask.bool()
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad[real], expected[real], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.NF4])
def test_backward_through_quantized_spans(
    tiny: Callable[[str], TinyModel], quantization: Quantization
) -> None:
    tm = tiny("llama")
    reference = copy.deepcopy(tm.model)
    quantize_linears(hf_blocks(reference), quantization, torch.float32)
    ids, mask = left_padded([5, 5])
    weights = torch.randn(
        2, 5, tm.model.config.vocab_size, generator=torch.Generator().manual_seed(4)
    )
    h0, grad = chain_gradient(tm, ids, mask, weights, quantization=quantization)
    expected = reference_gradient(reference, ids, mask, h0, weights)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
