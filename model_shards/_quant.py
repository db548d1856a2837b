"""Weight quantization of transformer blocks with bitsandbytes: none, int8 (LLM.int8) or nf4.

Every ``nn.Linear`` inside a block becomes a bitsandbytes layer (``Linear8bitLt`` or
``Linear4bit``). A fused expert bank (transformers 5 keeps a mixture-of-experts layer's
experts as two 3-D parameters, ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
``[E, H, I]``) becomes ``QuantizedExperts``: one bitsandbytes layer per expert and
projection, so the experts, nearly all of a Mixtral block's weights, are quantized too.
Norms, embeddings and routers stay in the compute dtype.

bitsandbytes quantizes a weight when it is moved to a device, and int8 weights only on
their way off the CPU: so the loader keeps a block's weights on the CPU, replaces its
layers, and moving each new layer to the target device quantizes it there. Both paths run
on CPU (bitsandbytes >= 0.45) and on CUDA.
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
    """How a span stores its linear layers' and experts' weights."""

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


class QuantizedExperts(nn.Module):
    """A fused expert bank held as one quantized ``gate_up`` and ``down`` layer per expert.

    Takes the place of a transformers experts module whose weights are concatenated
    ``[gate; up]`` and not transposed (Mixtral's ``MixtralExperts``), and computes what its
    eager forward does: each token goes through its top-k experts, ``act(gate) * up`` then
    ``down``, weighted by its routing weight, summed in expert order.
    """

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = len(gate_up)
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.act_fn = act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``[tokens, hidden]`` with each token's experts and weights ``[tokens, k]``."""
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [experts, k, tokens]: which (slot, token) pairs each expert serves
            routed = nn.functional.one_hot(top_k_index, num_classes=self.num_experts)
            routed = routed.permute(2, 1, 0)
            hit = routed.sum(dim=(1, 2)).nonzero().flatten().tolist()
        for expert in hit:
            slot, token = torch.where(routed[expert])
            gate, up = self.gate_up[expert](hidden_states[token]).chunk(2, dim=-1)
            states = self.down[expert](self.act_fn(gate) * up)
            states = states * top_k_weights[token, slot, None]
            output.index_add_(0, token, states.to(output.dtype))
        return output


def quantize_linears(
    module: nn.Module,
    quantization: Quantization,
    compute_dtype: torch.dtype,
    *,
    device: torch.device | None = None,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Quantize (in place) every ``nn.Linear`` and fused expert bank under ``module``.

    Linears become their bitsandbytes counterparts; expert banks become
    ``QuantizedExperts``. Each new layer is quantized on ``device`` (default: where its
    weight is). Give weights on the CPU: bitsandbytes quantizes int8 weights only when they
    move off the CPU. The same call on a full transformers model's layers gives the weights
    a span loaded with that quantization holds, bit for bit. ``int8_threshold`` is
    LLM.int8's outlier threshold (transformers' default).
    """
    if quantization is Quantization.NONE:
        return module
    if quantization is Quantization.INT8:
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_CAST_FILTER)

    def quantized(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return _bnb_linear(
            weight,
            bias,
            quantization,
            compute_dtype,
            weight.device if device is None else device,
            int8_threshold,
        )

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.data
                new = quantized(child.weight.data, bias)
                new.train(child.training)
                setattr(parent, name, new)
            elif _is_expert_bank(child):
                gate_up, down = child.gate_up_proj.data, child.down_proj.data
                experts = QuantizedExperts(
                    [quantized(gate_up[e], None) for e in range(gate_up.shape[0])],
                    [quantized(down[e], None) for e in range(down.shape[0])],
                    child.act_fn,
                )
                experts.train(child.training)
                setattr(parent, name, experts)
    return module


def _is_expert_bank(module: nn.Module) -> bool:
    """A transformers experts module with fused 3-D weights (ValueError: a layout not handled)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.ndim == 3
        and down.ndim == 3
    ):
        return False
    layout = {
        "is_concatenated": True,
        "is_transposed": False,
        "has_gate": True,
        "has_bias": False,
        "has_post_expert_norm": False,
    }
    # a flag older transformers releases lack means the layout they all had
    found = {key: getattr(module, key, want) for key, want in layout.items()}
    if found != layout or not isinstance(getattr(module, "act_fn", None), nn.Module):
        raise ValueError(
            f"{type(module).__name__}: cannot quantize experts laid out as {found}; "
            f"QuantizedExperts needs {layout} and an act_fn module"
        )
    return True


def _bnb_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quantization: Quantization,
    compute_dtype: torch.dtype,
    device: torch.device,
    int8_threshold: float,
) -> nn.Module:
    """A bitsandbytes layer with ``weight`` ``[out, in]`` and ``bias``, quantized on ``device``."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    weight = weight.to(compute_dtype)
    with torch.device("meta"):
        if quantization is Quantization.INT8:
            layer = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=int8_threshold,
            )
        else:
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
            )
    if quantization is Quantization.INT8:
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return layer.to(device)
