"""The two ends of a model a client keeps: token embeddings in, final norm and LM head out.

``load_model_ends`` reads only those tensors (no block); a head tied to the embeddings
(no ``lm_head.weight`` in the checkpoint and ``tie_word_embeddings``) shares their weight.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ._checkpoint import Checkpoint, assign_state
from ._dtypes import compute_dtype, dtype_name, resolve_device
from ._errors import CheckpointError, ManifestMismatch
from ._manifest import Manifest, client_names, hash_tensors
from .families import ModelFamily, family_for


class ModelEnds(nn.Module):
    """Embeddings (and their norm, for BLOOM), final norm and LM head of one model.

    ``embed(input_ids) -> hidden`` feeds the first span; ``logits(hidden)`` reads the last
    span's output. Built by ``load_model_ends``.
    """

    def __init__(
        self,
        family: ModelFamily,
        embeddings: nn.Embedding,
        final_norm: nn.Module,
        lm_head: nn.Linear,
        embedding_norm: nn.Module | None,
    ) -> None:
        super().__init__()
        self.family = family
        self.embeddings = embeddings
        self.embedding_norm = embedding_norm
        self.final_norm = final_norm
        self.lm_head = lm_head

    @property
    def hidden_size(self) -> int:
        return self.family.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def extra_repr(self) -> str:
        return f"{self.family.model_type}, {dtype_name(self.dtype)}, {self.device}"

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[batch, tokens]`` -> hidden states ``[batch, tokens, hidden]``."""
        hidden = self.embeddings(input_ids.to(self.device))
        if self.embedding_norm is not None:
            hidden = self.embedding_norm(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last span's output ``[batch, tokens, hidden]`` -> logits ``[batch, tokens, vocab]``."""
        return self.lm_head(self.final_norm(hidden.to(self.device, self.dtype)))


def load_model_ends(
    source: str | os.PathLike[str] | Checkpoint,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    manifest: Manifest | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModelEnds:
    """Load a model's client-side modules, reading only their tensors.

    Same ``source``, ``dtype`` and ``device`` conventions as ``load_span``; with a
    ``manifest``, every tensor outside the blocks is hashed and checked against it.
    """
    checkpoint = (
        source if isinstance(source, Checkpoint) else Checkpoint.open(source, cache_dir=cache_dir)
    )
    family = family_for(checkpoint.config)
    device = resolve_device(device)
    dtype = compute_dtype(dtype, device)
    layout = family.client_layout()
    with torch.device("meta"):
        parts = family.build_client_parts()
    modules: dict[str, nn.Module] = {
        layout.embeddings: parts.embeddings,
        layout.final_norm: parts.final_norm,
    }
    if layout.embedding_norm is not None and parts.embedding_norm is not None:
        modules[layout.embedding_norm] = parts.embedding_norm
    tied = not checkpoint.names_with_prefix(layout.lm_head + ".")
    if tied and not getattr(checkpoint.config, "tie_word_embeddings", False):
        raise CheckpointError(
            f"{checkpoint.path} has no {layout.lm_head} and its embeddings are not tied"
        )
    if not tied:
        modules[layout.lm_head] = parts.lm_head
    names = [n for prefix in modules for n in checkpoint.names_with_prefix(prefix + ".")]
    if manifest is not None:
        names = client_names(checkpoint, family)
    tensors = checkpoint.read(names)
    if manifest is not None:
        actual = hash_tensors(tensors)
        if actual != manifest.client_hash:
            raise ManifestMismatch(
                "the embeddings, final norm and head", manifest.client_hash, actual
            )
    for prefix, module in modules.items():
        state = {
            n.removeprefix(prefix + "."): t.to(dtype) if t.is_floating_point() else t
            for n, t in tensors.items()
            if n.startswith(prefix + ".")
        }
        assign_state(module, state, what=prefix)
    if tied:
        parts.lm_head.weight = parts.embeddings.weight
    ends = ModelEnds(
        family, parts.embeddings, parts.final_norm, parts.lm_head, parts.embedding_norm
    )
    ends.requires_grad_(False)
    return ends.to(device).eval()
