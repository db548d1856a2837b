"""The model_shards package's one exception tree.

    ShardError
    ├── UnknownModelFamily      config.model_type has no adapter in ``model_shards.families``
    ├── CheckpointError         checkpoint missing, unreadable, incomplete or not cached locally
    │   └── ManifestMismatch    weights read from disk differ from the model's manifest
    ├── CacheFull               the cache pool has no room for another session (bytes or count)
    ├── SessionClosed           a step on an inference session that was closed
    └── BadRequest              the caller's input is wrong (on a server: the remote's fault)
        ├── InvalidShape        wrong rank, batch size, hidden size or mask shape
        ├── WrongDtype          hidden states in another dtype than the span's
        ├── TooLong             more tokens than the session reserved or the limits allow
        └── MalformedTensor     wire bytes that do not decode to a tensor
            └── TensorTooLarge  a wire tensor beyond ``WireLimits``

Each class has a short ``code`` string, stable across versions, for error replies on the wire.
Remote and local faults are kept apart: ``BadRequest`` is the caller's doing; anything else
escaping this package is ours (or the machine's).
"""

from __future__ import annotations

from typing import ClassVar


class ShardError(Exception):
    """Root of every error raised by :mod:`model_shards`."""

    code: ClassVar[str] = "shard_error"


class UnknownModelFamily(ShardError):
    """The checkpoint's ``config.model_type`` has no family adapter."""

    code = "unknown_model_family"

    def __init__(self, model_type: str, known: tuple[str, ...]) -> None:
        super().__init__(
            f"model_type {model_type!r} has no family adapter; known: {', '.join(known)}. "
            "Add a module in model_shards/families/ and one registry line."
        )
        self.model_type = model_type


class CheckpointError(ShardError):
    """A checkpoint could not be found, read or matched to its config."""

    code = "checkpoint_error"


class ManifestMismatch(CheckpointError):
    """Weights read from disk hash differently from the manifest they should match."""

    code = "manifest_mismatch"

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{what} hashes to {actual[:16]}... but the manifest says {expected[:16]}...; "
            "the checkpoint on disk is not the model this manifest names"
        )
        self.what = what
        self.expected = expected
        self.actual = actual


class CacheFull(ShardError):
    """The cache pool cannot hold another session; raised at once, never after waiting."""

    code = "cache_full"

    def __init__(self, message: str, *, requested: int, available: int) -> None:
        super().__init__(message)
        self.requested = requested
        self.available = available


class SessionClosed(ShardError):
    """The inference session was closed; its cache has been given back."""

    code = "session_closed"


class BadRequest(ShardError):
    """The caller sent something this span cannot run (on a server: the remote's fault)."""

    code = "bad_request"


class InvalidShape(BadRequest):
    """A tensor has the wrong rank, batch size, hidden size or length."""

    code = "invalid_shape"


class WrongDtype(BadRequest):
    """Hidden states arrived in another dtype than the span computes in."""

    code = "wrong_dtype"


class TooLong(BadRequest):
    """More tokens than the session reserved, or than the limits allow."""

    code = "too_long"


class MalformedTensor(BadRequest):
    """Wire bytes that do not decode to a tensor."""

    code = "malformed_tensor"


class TensorTooLarge(MalformedTensor):
    """A wire tensor larger than ``WireLimits`` allow."""

    code = "tensor_too_large"
