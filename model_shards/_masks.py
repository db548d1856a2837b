"""Where one call's new tokens sit, and the attention masks built from that once per call.

Swarm keeps its own cache (``_cache.py``), so it builds the masks transformers' model
classes would build, with the same conventions (``transformers.masking_utils``): a query at
cache slot ``q`` sees key slot ``k`` when ``k <= q``, the key is not padding, and, with a
sliding window ``w``, ``k > q - w``. Slots count every token held, padding included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class StepGeometry:
    """The tokens of one call on a span: what the blocks need besides hidden states.

    ``key_mask`` is ``[batch, past_length + new_length]``, True for real tokens (False for
    padding) over every slot the new queries may see; ``position_ids`` is
    ``[batch, new_length]``; ``padded`` says whether ``key_mask`` holds any False.
    """

    key_mask: torch.Tensor
    position_ids: torch.Tensor
    past_length: int
    padded: bool

    @property
    def new_length(self) -> int:
        return self.position_ids.shape[1]

    @property
    def kv_length(self) -> int:
        return self.key_mask.shape[1]


def positions_from_mask(key_mask: torch.Tensor, past_length: int) -> torch.Tensor:
    """Position ids of the new tokens as ``transformers``' ``generate`` numbers them.

    A token's position is the number of real tokens before it in its row; padding gets 0.
    """
    counts = key_mask.long().cumsum(dim=1)[:, past_length:] - 1
    return counts.masked_fill(~key_mask[:, past_length:], 0)


def allowed_keys(geometry: StepGeometry, window: int | None = None) -> torch.Tensor:
    """Boolean ``[batch, 1, new_length, kv_length]``: which key slot each query may see."""
    device = geometry.key_mask.device
    query_slots = torch.arange(geometry.new_length, device=device)[:, None] + geometry.past_length
    key_slots = torch.arange(geometry.kv_length, device=device)[None, :]
    allowed = key_slots <= query_slots
    if window is not None:
        allowed = allowed & (key_slots > query_slots - window)
    return allowed[None, None] & geometry.key_mask[:, None, None, :]


def sdpa_mask(geometry: StepGeometry, window: int | None = None) -> torch.Tensor | None:
    """The mask for torch's scaled-dot-product attention, or None where ``is_causal`` does.

    Same skip rule as transformers: no padding, no window cut, and either one new token or
    no past, so that the attention kernel's own causal flag is exact.
    """
    if (
        not geometry.padded
        and (window is None or geometry.kv_length < window)
        and (geometry.new_length == 1 or geometry.kv_length == geometry.new_length)
    ):
        return None
    return allowed_keys(geometry, window)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's most negative finite value elsewhere (no NaN on empty rows)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
