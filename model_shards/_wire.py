"""Tensors on the wire: a small msgpack header, then the raw bytes.

Wire form of one tensor::

    u32 big-endian  header length H
    H bytes         msgpack map {"dtype": str, "shape": [int, ...], "compression": str}
                    (+ "block": int for blockwise 8-bit)
    payload         the tensor's bytes, little-endian, C order

Compression, chosen per call (``Compression``):

* ``none``: the payload is the tensor's own bytes in its dtype (model dtype for hidden states);
* ``float16``: floating tensors sent as float16 (clamped to its range), restored to their dtype;
* ``blockwise8``: floating tensors cut into blocks of ``block`` values; per block a float32
  absmax, then one int8 per value (value ~ code * absmax / 127); about a quarter of float32.

``encode_tensor`` returns buffers to write one after the other; without compression the
payload is a view of the tensor's memory (no copy for a contiguous CPU tensor).
``decode_tensor`` checks everything against ``WireLimits`` before touching the payload,
raises ``MalformedTensor`` / ``TensorTooLarge`` on bad input, and without compression
returns a tensor over the given buffer itself (``torch.frombuffer``): keep the buffer alive
and unchanged while the tensor is in use.
"""

from __future__ import annotations

import math
import struct
import warnings
from enum import StrEnum
from typing import Any

import msgpack
import torch

from ._dtypes import DTYPES, dtype_name
from ._errors import MalformedTensor, TensorTooLarge
from ._limits import WireLimits

_PREFIX = struct.Struct(">I")
_HEADER_KEYS = frozenset({"dtype", "shape", "compression"})
_FLOAT16_MAX = torch.finfo(torch.float16).max

Buffer = bytes | bytearray | memoryview


class Compression(StrEnum):
    """How a tensor's values travel."""

    NONE = "none"
    FLOAT16 = "float16"
    BLOCKWISE8 = "blockwise8"


def encode_tensor(
    tensor: torch.Tensor, compression: Compression = Compression.NONE, *, block_size: int = 64
) -> list[Buffer]:
    """Buffers whose concatenation is ``tensor``'s wire form (write them in order)."""
    compression = Compression(compression)
    tensor = tensor.detach()
    if compression is not Compression.NONE and not tensor.is_floating_point():
        raise ValueError(f"{compression} compression needs a floating tensor, not {tensor.dtype}")
    header: dict[str, Any] = {
        "dtype": dtype_name(tensor.dtype),
        "shape": list(tensor.shape),
        "compression": str(compression),
    }
    flat = tensor.cpu().contiguous().reshape(-1)
    if compression is Compression.NONE:
        payload = [_bytes_of(flat)]
    elif compression is Compression.FLOAT16:
        if tensor.dtype != torch.float16:
            flat = flat.float().clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
        payload = [_bytes_of(flat)]
    else:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size}")
        header["block"] = block_size
        absmax, codes = _quantize_blockwise(flat, block_size)
        payload = [_bytes_of(absmax), _bytes_of(codes)]
    packed = msgpack.packb(header)
    return [_PREFIX.pack(len(packed)) + packed, *payload]


def serialize_tensor(
    tensor: torch.Tensor, compression: Compression = Compression.NONE, *, block_size: int = 64
) -> bytes:
    """The wire form as one ``bytes`` (one copy; prefer ``encode_tensor`` to write buffers)."""
    return b"".join(encode_tensor(tensor, compression, block_size=block_size))


def decode_tensor(data: Buffer, limits: WireLimits | None = None) -> torch.Tensor:
    """The tensor whose wire form is exactly ``data``; typed errors for anything malformed."""
    limits = limits or WireLimits()
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise MalformedTensor(f"tensor of {len(view)} bytes is shorter than its length prefix")
    (header_len,) = _PREFIX.unpack_from(view)
    if header_len > limits.max_header_bytes:
        raise TensorTooLarge(
            f"tensor header of {header_len} bytes exceeds WireLimits.max_header_bytes="
            f"{limits.max_header_bytes}"
        )
    payload_start = _PREFIX.size + header_len
    if payload_start > len(view):
        raise MalformedTensor(f"tensor header of {header_len} bytes but {len(view)} bytes in all")
    header = _parse_header(view[_PREFIX.size : payload_start], limits)
    dtype, shape, compression, block = header
    payload = view[payload_start:]
    numel = math.prod(shape)
    expected = _payload_bytes(dtype, numel, compression, block)
    if len(payload) != expected:
        raise MalformedTensor(
            f"{compression} {dtype_name(dtype)} tensor {list(shape)} needs {expected} "
            f"payload bytes, got {len(payload)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if compression is Compression.NONE:
        if dtype == torch.bool:
            return (_from_buffer(payload, torch.uint8, numel) != 0).reshape(shape)
        return _from_buffer(payload, dtype, numel).reshape(shape)
    if compression is Compression.FLOAT16:
        return _from_buffer(payload, torch.float16, numel).to(dtype).reshape(shape)
    blocks = math.ceil(numel / block)
    absmax = _from_buffer(payload[: 4 * blocks], torch.float32, blocks)
    codes = _from_buffer(payload[4 * blocks :], torch.int8, numel)
    return _dequantize_blockwise(absmax, codes, block).to(dtype).reshape(shape)


def _parse_header(
    raw: memoryview, limits: WireLimits
) -> tuple[torch.dtype, tuple[int, ...], Compression, int]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise MalformedTensor(f"tensor header is not msgpack: {e}") from e
    if not isinstance(header, dict):
        raise MalformedTensor(f"tensor header is a {type(header).__name__}, not a map")
    try:
        compression = Compression(header.get("compression"))
    except (ValueError, TypeError):
        raise MalformedTensor(f"unknown compression {header.get('compression')!r}") from None
    keys = _HEADER_KEYS | ({"block"} if compression is Compression.BLOCKWISE8 else set())
    if set(header) != keys:
        raise MalformedTensor(
            f"tensor header keys {sorted(map(str, header))}, expected {sorted(keys)}"
        )
    dtype = DTYPES.get(header["dtype"]) if isinstance(header["dtype"], str) else None
    if dtype is None:
        raise MalformedTensor(f"unknown dtype {header['dtype']!r}")
    if compression is not Compression.NONE and not dtype.is_floating_point:
        raise MalformedTensor(f"{compression} compression of a {dtype_name(dtype)} tensor")
    shape = header["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MalformedTensor(f"tensor shape {shape!r} is not a list of sizes")
    if len(shape) > limits.max_ndim:
        raise TensorTooLarge(
            f"tensor of {len(shape)} dims exceeds WireLimits.max_ndim={limits.max_ndim}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise TensorTooLarge(
            f"tensor {shape} of {nbytes} bytes exceeds WireLimits.max_tensor_bytes="
            f"{limits.max_tensor_bytes}"
        )
    block = header.get("block", 1)
    if type(block) is not int or not 1 <= block <= limits.max_block_size:
        raise MalformedTensor(
            f"block size {block!r} is not in [1, WireLimits.max_block_size={limits.max_block_size}]"
        )
    return dtype, tuple(shape), compression, block


def _payload_bytes(dtype: torch.dtype, numel: int, compression: Compression, block: int) -> int:
    if compression is Compression.NONE:
        return numel * dtype.itemsize
    if compression is Compression.FLOAT16:
        return numel * 2
    return 4 * math.ceil(numel / block) + numel


def _bytes_of(flat: torch.Tensor) -> memoryview:
    return memoryview(flat.view(torch.uint8).numpy())


def _from_buffer(payload: memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    with warnings.catch_warnings():
        # read-only buffers (bytes) are fine: the tensor is handed out, never written here
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(payload, dtype=dtype, count=count)


def _quantize_blockwise(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    numel = flat.numel()
    values = torch.nn.functional.pad(flat.float(), (0, -numel % block)).view(-1, block)
    absmax = values.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    codes = torch.round(values / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return absmax, codes.reshape(-1)[:numel]


def _dequantize_blockwise(absmax: torch.Tensor, codes: torch.Tensor, block: int) -> torch.Tensor:
    numel = codes.numel()
    values = torch.nn.functional.pad(codes.float(), (0, -numel % block)).view(-1, block)
    return (values * (absmax / 127)[:, None]).reshape(-1)[:numel]
