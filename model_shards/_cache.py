"""Attention caches: a pool that accounts for them, and one session's keys and values.

A session reserves its whole cache when it opens (batch x ``max_length`` tokens for every
block of the span), so a step never allocates and a full pool answers at once with
``CacheFull`` rather than failing half-way through a generation.

Swarm's cache layout: per span and session, one keys tensor and one values tensor of shape
``[blocks, batch, heads, max_length, head_dim]`` (heads and head_dim from the family's
``CacheLayout``); slots ``[0, length)`` hold the tokens seen so far.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ._errors import BadRequest, CacheFull, TooLong
from ._limits import CacheLimits
from .families import ModelFamily


class CachePool:
    """Room for attention caches, shared by the inference sessions of one span.

    Thread-safe: sessions may be opened on the event loop and closed from a compute thread.
    """

    def __init__(self, limits: CacheLimits | None = None) -> None:
        self.limits = limits or CacheLimits()
        self._lock = threading.Lock()
        self._used_bytes = 0
        self._sessions = 0

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self.limits.max_bytes - self._used_bytes

    @property
    def sessions(self) -> int:
        return self._sessions

    def reserve(self, nbytes: int, *, batch_size: int, max_length: int) -> CacheReservation:
        """Take ``nbytes`` for a session of ``batch_size`` x ``max_length`` tokens, or raise.

        ``TooLong`` / ``BadRequest`` when the session itself exceeds the limits (no pool
        could hold it), ``CacheFull`` when the pool is too full right now.
        """
        limits = self.limits
        if max_length > limits.max_length:
            raise TooLong(
                f"session of {max_length} tokens exceeds CacheLimits.max_length={limits.max_length}"
            )
        if batch_size > limits.max_batch_size:
            raise BadRequest(
                f"session batch of {batch_size} exceeds CacheLimits.max_batch_size="
                f"{limits.max_batch_size}"
            )
        with self._lock:
            if self._sessions >= limits.max_sessions:
                raise CacheFull(
                    f"{self._sessions} sessions open, "
                    f"CacheLimits.max_sessions={limits.max_sessions}",
                    requested=nbytes,
                    available=self.free_bytes,
                )
            if nbytes > self.free_bytes:
                raise CacheFull(
                    f"session needs {nbytes} cache bytes, {self.free_bytes} of "
                    f"CacheLimits.max_bytes={limits.max_bytes} are free",
                    requested=nbytes,
                    available=self.free_bytes,
                )
            self._used_bytes += nbytes
            self._sessions += 1
        return CacheReservation(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._used_bytes -= nbytes
            self._sessions -= 1


class CacheReservation:
    """A session's share of a pool; ``release`` gives it back (idempotent)."""

    def __init__(self, pool: CachePool, nbytes: int) -> None:
        self.pool = pool
        self.nbytes = nbytes
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.nbytes)


def cache_bytes(
    family: ModelFamily, num_blocks: int, batch_size: int, max_length: int, dtype: torch.dtype
) -> int:
    """Bytes of one session's keys and values over ``num_blocks`` blocks."""
    layout = family.cache_layout()
    per_token = 2 * layout.heads * layout.head_dim * dtype.itemsize
    return num_blocks * batch_size * max_length * per_token


class SessionCache:
    """One session's keys and values for a span's blocks; what the layers see as their cache.

    ``length`` tokens are held; a step writes its new tokens at ``[length, length + n)`` through
    ``update`` and the session then advances ``length`` (or rolls it back).
    """

    def __init__(
        self,
        family: ModelFamily,
        first_block: int,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        layout = family.cache_layout()
        shape = (num_blocks, batch_size, layout.heads, max_length, layout.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self._family = family
        self._first_block = first_block

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one block's new keys/values after ``length``; return all up to the new end."""
        block = layer_idx - self._first_block
        start = self.length
        end = start + key_states.shape[-2]
        keys, values, family = self.keys[block], self.values[block], self._family
        keys[:, :, start:end] = family.to_cache(key_states)
        values[:, :, start:end] = family.to_cache(value_states)
        return family.from_cache(keys[:, :, :end]), family.from_cache(values[:, :, :end])
