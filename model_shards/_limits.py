"""Every bound of the model_shards package, as data (STYLE.md rule 4).

Change a value with ``dataclasses.replace``; tests pass tiny limits.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """Bounds of one span's attention cache pool (all inference sessions together).

    ``max_bytes`` is the room for keys and values; a session reserves its whole share up front
    (batch x ``max_length`` tokens), so a step never allocates and never runs out.
    """

    max_bytes: int = 1 * GIB
    max_sessions: int = 256
    max_length: int = 8192
    max_batch_size: int = 64


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds of one call on a span: a stateless forward, a backward or an inference step."""

    max_batch_size: int = 64
    max_tokens: int = 16384
    """batch size x new tokens of one call."""


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Bounds of one tensor decoded from the wire (``model_shards._wire``)."""

    max_header_bytes: int = 1 * KIB
    max_ndim: int = 8
    max_tensor_bytes: int = 256 * MIB
    """Bytes of the decoded tensor (its dtype, after decompression)."""
    max_block_size: int = 4096
    """Largest block accepted for blockwise 8-bit compression."""
