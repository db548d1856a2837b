"""Model family adapters, registered by ``config.model_type``.

Adding a family is one module beside these (a ``ModelFamily`` subclass) and one line in
``FAMILIES``.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from .._errors import UnknownModelFamily
from ._base import CacheLayout, ClientLayout, ClientParts, KVWriter, ModelFamily
from .bloom import BloomFamily
from .falcon import FalconFamily
from .llama import LlamaFamily
from .mistral import MistralFamily
from .mixtral import MixtralFamily
from .qwen2 import Qwen2Family

FAMILIES: dict[str, type[ModelFamily]] = {
    family.model_type: family
    for family in (
        LlamaFamily,
        MistralFamily,
        Qwen2Family,
        MixtralFamily,
        BloomFamily,
        FalconFamily,
    )
}


def family_for(config: PretrainedConfig, device: torch.device | None = None) -> ModelFamily:
    """A new adapter for ``config``, holding a copy of it, its modules on ``device``."""
    try:
        family = FAMILIES[config.model_type]
    except KeyError:
        raise UnknownModelFamily(config.model_type, tuple(FAMILIES)) from None
    return family(config, device)


__all__ = [
    "FAMILIES",
    "CacheLayout",
    "ClientLayout",
    "ClientParts",
    "KVWriter",
    "ModelFamily",
    "family_for",
]
