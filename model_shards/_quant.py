"""Weight quantization of transformer blocks with bitsandbytes: none, int8 (LLM.int8) or nf4.

Every ``nn.Linear`` inside a block becomes a bitsandbytes layer (``Linear8bitLt`` or
``Linear4bit``); norms, embeddings and weights that are not ``nn.Linear`` (Mixtral's fused
experts and router) stay in the compute dtype. bitsandbytes quantizes a weight when it is
moved to a device, and int8 weights only on their way off the CPU: so the loader keeps a
block's weights on the CPU, replaces its linears, and moving each new layer to the target
device quantizes it there. Both paths run on CPU (bitsandbytes >= 0.45) and on CUDA.
"""

from __future__ import annotations

import logging
from enum import StrEnum

import torch
from torch import nn


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs this at every int8 matmul of a non-float16 input: a notice, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_INT8_CAST_FILTER = _DropInt8CastNotice()


class Quantization(StrEnum):
    """How a span stores its linear layers' weights."""

    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


def resolve_quantization(
    quantization: Quantization | str | None, device: torch.device
) -> Quantization:
    """A requested quantization, or the default: nf4 on CUDA, none elsewhere."""
    if quantization is None:
        return Quantization.NF4 if device.type == "cuda" else Quantization.NONE
    return Quantization(quantization)


def quantize_linears(
    module: nn.Module,
    quantization: Quantization,
    compute_dtype: torch.dtype,
    *,
    device: torch.device | None = None,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` (in place) by its bitsandbytes counterpart.

    Each new layer is quantized on ``device`` (default: where its weight is). Give weights on
    the CPU: bitsandbytes quantizes int8 weights only when they move off the CPU. The same
    call on a full transformers model's layers gives the weights a span loaded with that
    quantization holds, bit for bit. ``int8_threshold`` is LLM.int8's outlier threshold
    (transformers' default).
    """
    if quantization is Quantization.NONE:
        return module
    import bitsandbytes as bnb

    if quantization is Quantization.INT8:
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_FILTER)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            weight = child.weight.data.to(compute_dtype)
            has_bias = child.bias is not None
            with torch.device("meta"):
                if quantization is Quantization.INT8:
                    new = bnb.nn.Linear8bitLt(
                        child.in_features,
                        child.out_features,
                        bias=has_bias,
                        has_fp16_weights=False,
                        threshold=int8_threshold,
                    )
                else:
                    new = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=has_bias,
                        compute_dtype=compute_dtype,
                        quant_type="nf4",
                    )
            if quantization is Quantization.INT8:
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            new.train(child.training)
            setattr(parent, name, new.to(weight.device if device is None else device))
    return module
