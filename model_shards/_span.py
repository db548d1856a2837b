"""A span: the blocks [start, end) of one model, loaded alone and run on hidden states.

``load_span`` reads only the span's tensors (block by block: build the layer on the meta
device, assign the checkpoint tensors, quantize, move to the device). A ``Span`` then runs

* stateless forwards (``forward``) and their input gradients (``backward``),
* replays of a session's steps (``forward_steps``: what a checker runs), and
* inference sessions (``open_session``): a KV cache reserved up front in a ``CachePool``,
  steps of new tokens, rollback.

Each call builds masks and positions once (``ModelFamily.prepare``), then loops over the
blocks. Calls are synchronous and CPU/GPU bound: a server runs them in a worker thread, one
call at a time per session.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ._cache import CachePool, CacheReservation, SessionCache, cache_bytes
from ._checkpoint import Checkpoint, assign_state
from ._dtypes import compute_dtype, dtype_name, resolve_device
from ._errors import (
    BadRequest,
    CacheFull,
    InvalidShape,
    ManifestMismatch,
    SessionClosed,
    TooLong,
    WrongDtype,
)
from ._limits import RequestLimits
from ._manifest import Manifest, block_names, config_hash, hash_block
from ._masks import StepGeometry, positions_from_mask
from ._progress import Progress
from ._quant import Quantization, quantize_linears, resolve_quantization
from .families import KVWriter, ModelFamily, family_for

_log = logging.getLogger("model_shards.span")


class Span:
    """Blocks ``[start, end)`` of one model on one device, ready to run.

    Built by ``load_span``. Hidden states are ``[batch, tokens, hidden_size]`` in ``dtype``;
    attention masks are ``[batch, tokens]`` (1 for real tokens, 0 for padding); position ids
    are ``[batch, tokens]`` and default to what ``transformers``' ``generate`` would use
    (a token's position is the number of real tokens before it).
    """

    def __init__(
        self,
        family: ModelFamily,
        blocks: Sequence[nn.Module],
        start: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantization: Quantization,
        limits: RequestLimits | None = None,
    ) -> None:
        self.family = family
        self.blocks = nn.ModuleList(blocks)
        self.start = start
        self.end = start + len(blocks)
        self.dtype = dtype
        self.device = device
        self.quantization = quantization
        self.limits = limits or RequestLimits()

    def __repr__(self) -> str:
        return (
            f"Span({self.family.model_type} blocks [{self.start}, {self.end}) of "
            f"{self.family.num_blocks}, {dtype_name(self.dtype)}, {self.quantization}, "
            f"{self.device})"
        )

    @property
    def hidden_size(self) -> int:
        return self.family.hidden_size

    def parameter_bytes(self) -> int:
        """Bytes of every parameter and buffer the span's blocks hold."""
        tensors = [*self.blocks.parameters(), *self.blocks.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def cache_bytes(self, batch_size: int, max_length: int) -> int:
        """Cache bytes one session of ``batch_size`` x ``max_length`` tokens reserves."""
        return cache_bytes(self.family, len(self.blocks), batch_size, max_length, self.dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks on a whole sequence, without a cache."""
        hidden = self._check_hidden(hidden, batch_size=None)
        geometry = self._geometry(hidden, _full_mask(hidden, attention_mask), 0, position_ids)
        with torch.no_grad():
            return self._run(hidden, geometry, None)

    def forward_steps(
        self,
        pool: CachePool,
        hidden: torch.Tensor,
        steps: Sequence[int],
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a session's steps (``steps``: positions of each, in order) as its last step
        ran in the session: every position before the last step in one pass filling a
        temporary cache (reserved in ``pool``), then the last step's positions on that
        cache, through the kernels of a session step. The output of every position."""
        hidden = self._check_hidden(hidden, batch_size=None)
        batch, total = hidden.shape[:2]
        if not steps or min(steps) < 1 or sum(steps) != total:
            raise InvalidShape(f"steps {list(steps)[:8]} do not split {total} positions")
        last = steps[-1]
        mask = None if attention_mask is None else _check_mask(attention_mask, hidden)
        parts = []
        with self.open_session(pool, batch_size=batch, max_length=total) as session:
            if total > last:
                before = None if mask is None else mask[:, :-last]
                parts.append(session.step(hidden[:, :-last], attention_mask=before))
            tail = None if mask is None else mask[:, -last:]
            parts.append(session.step(hidden[:, -last:], attention_mask=tail))
        return torch.cat(parts, dim=1)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gradient of ``(forward(hidden) * grad_output).sum()`` with respect to ``hidden``.

        The blocks' own weights stay frozen; this is what a client fine-tuning prompts or
        adapters on its side needs from the servers.
        """
        hidden = self._check_hidden(hidden, batch_size=None)
        grad_output = self._check_hidden(grad_output, batch_size=hidden.shape[0])
        if grad_output.shape != hidden.shape:
            raise InvalidShape(
                f"grad_output {list(grad_output.shape)} does not match hidden {list(hidden.shape)}"
            )
        geometry = self._geometry(hidden, _full_mask(hidden, attention_mask), 0, position_ids)
        with torch.enable_grad():
            inputs = hidden.detach().clone().requires_grad_()
            outputs = self._run(inputs, geometry, None)
            (grad,) = torch.autograd.grad(outputs, inputs, grad_output)
        return grad

    def open_session(
        self, pool: CachePool, *, batch_size: int, max_length: int
    ) -> InferenceSession:
        """Reserve a cache for ``batch_size`` sequences of up to ``max_length`` tokens.

        Raises ``CacheFull`` at once when the pool (or the device) has no room.
        """
        if batch_size < 1 or max_length < 1:
            raise BadRequest(f"session of batch {batch_size} x {max_length} tokens is empty")
        reservation = pool.reserve(
            self.cache_bytes(batch_size, max_length), batch_size=batch_size, max_length=max_length
        )
        try:
            cache = SessionCache(
                self.family,
                self.start,
                len(self.blocks),
                batch_size,
                max_length,
                self.dtype,
                self.device,
            )
        except RuntimeError as e:  # torch.OutOfMemoryError included: the device is full
            reservation.release()
            raise CacheFull(
                f"cannot allocate {reservation.nbytes} cache bytes on {self.device}: {e}",
                requested=reservation.nbytes,
                available=0,
            ) from e
        return InferenceSession(self, cache, reservation, batch_size, max_length)

    def _run(
        self, hidden: torch.Tensor, geometry: StepGeometry, cache: KVWriter | None
    ) -> torch.Tensor:
        family = self.family
        prepared = family.prepare(hidden, geometry)
        for offset, block in enumerate(self.blocks):
            hidden = family.run_block(self.start + offset, block, hidden, prepared, cache)
        return hidden

    def _check_hidden(self, hidden: torch.Tensor, *, batch_size: int | None) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            shape = (
                list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            )
            raise InvalidShape(f"hidden states must be [batch, tokens, hidden], got {shape}")
        batch, tokens, size = hidden.shape
        if size != self.hidden_size:
            raise InvalidShape(f"hidden size {size}, this model's is {self.hidden_size}")
        if batch_size is not None and batch != batch_size:
            raise InvalidShape(f"batch of {batch}, expected {batch_size}")
        if batch < 1 or tokens < 1:
            raise InvalidShape(f"empty hidden states {list(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise WrongDtype(
                f"hidden states in {hidden.dtype}, this span computes in {dtype_name(self.dtype)}"
            )
        limits = self.limits
        if batch > limits.max_batch_size:
            raise BadRequest(
                f"batch of {batch} exceeds RequestLimits.max_batch_size={limits.max_batch_size}"
            )
        if batch * tokens > limits.max_tokens:
            raise TooLong(
                f"{batch} x {tokens} tokens exceed RequestLimits.max_tokens={limits.max_tokens}"
            )
        return hidden.to(self.device)

    def _geometry(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor,
        past_length: int,
        position_ids: torch.Tensor | None,
    ) -> StepGeometry:
        batch, tokens = hidden.shape[:2]
        if position_ids is None:
            position_ids = positions_from_mask(key_mask, past_length)
        elif (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.shape != (batch, tokens)
            or position_ids.dtype not in (torch.int64, torch.int32)
        ):
            raise InvalidShape(f"position_ids must be integers of shape [{batch}, {tokens}]")
        else:
            position_ids = position_ids.to(device=self.device, dtype=torch.int64)
        padded = not bool(key_mask.all())
        return StepGeometry(key_mask, position_ids, past_length, padded)


class InferenceSession:
    """One generation on one span: a reserved KV cache and the padding mask seen so far.

    ``position`` tokens are held; ``step`` adds some, ``rollback`` forgets the ones after a
    position (e.g. rejected speculative tokens, or a replay after a failure upstream). A
    failed step leaves the session as it was. ``close`` (or leaving a ``with`` block) gives
    the cache back to the pool.
    """

    def __init__(
        self,
        span: Span,
        cache: SessionCache,
        reservation: CacheReservation,
        batch_size: int,
        max_length: int,
    ) -> None:
        self.span = span
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache: SessionCache | None = cache
        self._reservation = reservation
        self._key_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=span.device)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def position(self) -> int:
        """Tokens held in the cache."""
        return self._open().length

    @property
    def closed(self) -> bool:
        return self._cache is None

    def step(
        self,
        hidden: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the new tokens' hidden states ``[batch, new, hidden]`` through the span.

        ``attention_mask`` covers the new tokens only (``[batch, new]``); earlier tokens keep
        the mask they came with.
        """
        cache = self._open()
        span = self.span
        hidden = span._check_hidden(hidden, batch_size=self.batch_size)
        past, new = cache.length, hidden.shape[1]
        if past + new > self.max_length:
            raise TooLong(
                f"{past} tokens held + {new} new exceed this session's max_length={self.max_length}"
            )
        if attention_mask is None:
            self._key_mask[:, past : past + new] = True
        else:
            self._key_mask[:, past : past + new] = _check_mask(attention_mask, hidden).to(
                span.device
            )
        geometry = span._geometry(hidden, self._key_mask[:, : past + new], past, position_ids)
        with torch.no_grad():
            output = span._run(hidden, geometry, cache)
        cache.length = past + new
        return output

    def rollback(self, position: int) -> None:
        """Forget every token after the first ``position`` ones."""
        cache = self._open()
        if not 0 <= position <= cache.length:
            raise BadRequest(
                f"cannot roll back to {position}: the session holds {cache.length} tokens"
            )
        cache.length = position

    def close(self) -> None:
        """Free the cache and give its room back to the pool (idempotent)."""
        self._cache = None
        self._reservation.release()

    def _open(self) -> SessionCache:
        if self._cache is None:
            raise SessionClosed("the inference session is closed; open a new one")
        return self._cache


def _full_mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return _check_mask(attention_mask, hidden).to(hidden.device)


def _check_mask(attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != hidden.shape[:2]:
        raise InvalidShape(f"attention_mask must be [batch, tokens] = {list(hidden.shape[:2])}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise InvalidShape("attention_mask must hold integers or booleans (1: token, 0: padding)")
    return attention_mask != 0


def avoid_cudnn_attention() -> None:
    """Turn off cuDNN's scaled-dot-product attention for this process (torch's other CUDA
    backends stay). cuDNN builds a new plan for every key length, and a session's every
    step has a new one: on an H200 (torch 2.11) a one-token step of a Llama-7B-shaped
    bfloat16 block took 55.7 ms with it and 1.6 ms without (docs/benchmarks.md, "GPU
    check"). A process-wide switch, set when a span is loaded on CUDA."""
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        _log.info("cuDNN attention turned off: it plans anew for every step's key length")


def load_span(
    source: str | os.PathLike[str] | Checkpoint,
    start: int,
    end: int,
    *,
    dtype: torch.dtype | str | None = None,
    quantization: Quantization | str | None = None,
    device: torch.device | str | None = None,
    manifest: Manifest | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    limits: RequestLimits | None = None,
    progress: Progress | None = None,
) -> Span:
    """Load blocks ``[start, end)`` from a local checkpoint, reading only their tensors.

    ``source`` is a checkpoint directory, a Hub name already in the local cache (looked up
    in ``cache_dir``), or an open ``Checkpoint``. Defaults: the first CUDA device else the
    CPU; float32 on CPU, bfloat16 on CUDA; nf4 on CUDA, no quantization on CPU. With a
    ``manifest``, every block read is hashed and checked against it (``ManifestMismatch``).
    ``progress(done, total)`` is called after each block.
    """
    checkpoint = (
        source if isinstance(source, Checkpoint) else Checkpoint.open(source, cache_dir=cache_dir)
    )
    device = resolve_device(device)
    if device.type == "cuda":
        avoid_cudnn_attention()
    family = family_for(checkpoint.config, device)
    if not 0 <= start < end <= family.num_blocks:
        raise ValueError(
            f"span [{start}, {end}) is not inside the model's {family.num_blocks} blocks"
        )
    dtype = compute_dtype(dtype, device)
    quantization = resolve_quantization(quantization, device)
    if manifest is not None:
        _check_manifest_matches(manifest, checkpoint, family)
    blocks = _load_blocks(
        checkpoint, family, range(start, end), dtype, device, quantization, manifest, progress
    )
    return Span(
        family,
        blocks,
        start,
        dtype=dtype,
        device=device,
        quantization=quantization,
        limits=limits,
    )


def respan(
    span: Span,
    source: Checkpoint,
    start: int,
    end: int,
    *,
    manifest: Manifest | None = None,
    progress: Progress | None = None,
) -> Span:
    """The blocks ``[start, end)`` of ``span``'s model, loading only those ``span`` lacks.

    Blocks in both spans are ``span``'s own modules (shared, not copied); the others are
    read from ``source`` (hashed against ``manifest`` when given) and built in ``span``'s
    dtype, quantization and device. Once ``span`` is dropped, the blocks the new span does
    not hold are freed: memory follows the span. ``progress(done, total)`` counts the blocks
    loaded.
    """
    family = span.family
    if not 0 <= start < end <= family.num_blocks:
        raise ValueError(
            f"span [{start}, {end}) is not inside the model's {family.num_blocks} blocks"
        )
    if manifest is not None:
        _check_manifest_matches(manifest, source, family)
    kept = {span.start + offset: block for offset, block in enumerate(span.blocks)}
    missing = [index for index in range(start, end) if index not in kept]
    loaded = dict(
        zip(
            missing,
            _load_blocks(
                source,
                family,
                missing,
                span.dtype,
                span.device,
                span.quantization,
                manifest,
                progress,
            ),
            strict=True,
        )
    )
    return Span(
        family,
        [kept[index] if index in kept else loaded[index] for index in range(start, end)],
        start,
        dtype=span.dtype,
        device=span.device,
        quantization=span.quantization,
        limits=span.limits,
    )


def _load_blocks(
    checkpoint: Checkpoint,
    family: ModelFamily,
    indices: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    quantization: Quantization,
    manifest: Manifest | None,
    progress: Progress | None,
) -> list[nn.Module]:
    """Read, check and build the blocks ``indices``, one at a time."""
    blocks = []
    for done, index in enumerate(indices, 1):
        names = block_names(checkpoint, family, index)
        tensors = checkpoint.read(names)
        if manifest is not None:
            actual = hash_block(family, index, tensors)
            if actual != manifest.block_hashes[index]:
                raise ManifestMismatch(f"block {index}", manifest.block_hashes[index], actual)
        prefix = family.block_prefix(index)
        state = family.block_state({name.removeprefix(prefix): t for name, t in tensors.items()})
        del tensors
        blocks.append(_build_block(family, index, state, dtype, device, quantization))
        if progress is not None:
            progress(done, len(indices))
    return blocks


def _check_manifest_matches(
    manifest: Manifest, checkpoint: Checkpoint, family: ModelFamily
) -> None:
    if manifest.model_type != family.model_type or manifest.num_blocks != family.num_blocks:
        raise ManifestMismatch(
            "the checkpoint's model type and block count",
            f"{manifest.model_type}/{manifest.num_blocks}",
            f"{family.model_type}/{family.num_blocks}",
        )
    actual = config_hash(checkpoint.config_json)
    if actual != manifest.config_hash:
        raise ManifestMismatch("config.json", manifest.config_hash, actual)


def _build_block(
    family: ModelFamily,
    index: int,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    quantization: Quantization,
) -> nn.Module:
    with torch.device("meta"):
        block = family.build_block(index)
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    assign_state(block, state, what=f"block {index}")
    quantize_linears(block, quantization, dtype, device=device)
    block = block.to(device)
    block.eval()
    block.requires_grad_(False)
    return block
