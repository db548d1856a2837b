"""Mixtral: Mistral's attention with a sparse mixture of experts.

Mixtral checkpoints store each expert as three matrices
(``block_sparse_moe.experts.E.w1/w2/w3.weight``); transformers 5 keeps the experts of a layer
fused (``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` = w1 then w3, ``mlp.experts.down_proj``
``[E, H, I]`` = w2). ``block_state`` converts, as transformers' own loader does; checkpoints
already in the fused layout pass through.
"""

from __future__ import annotations

import re

import torch
from transformers.models.mixtral.modeling_mixtral import (
    MixtralDecoderLayer,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)

from ._llama_like import LlamaLikeFamily

_EXPERT = re.compile(r"experts\.(\d+)\.(w[123])\.weight")


class MixtralFamily(LlamaLikeFamily):
    model_type = "mixtral"
    experts_implementation = "grouped_mm"
    spot_checkable = False
    layer_class = MixtralDecoderLayer
    norm_class = MixtralRMSNorm
    rotary_class = MixtralRotaryEmbedding

    def window(self, index: int) -> int | None:
        return self.config.sliding_window

    def block_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {"w1": {}, "w2": {}, "w3": {}}
        for name, tensor in tensors.items():
            name = name.replace("block_sparse_moe.", "mlp.", 1)
            match = _EXPERT.fullmatch(name.removeprefix("mlp."))
            if match is None:
                state[name] = tensor
            else:
                experts[match[2]][int(match[1])] = tensor
        if experts["w1"]:
            w1, w2, w3 = (
                torch.stack([experts[w][e] for e in sorted(experts[w])]) for w in ("w1", "w2", "w3")
            )
            state["mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
            state["mlp.experts.down_proj"] = w2
        return state
