"""Tensor wire format: round trips, compression error bounds, zero copy, garbage in."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_shards import (
    Compression,
    MalformedTensor,
    TensorTooLarge,
    WireLimits,
    decode_tensor,
    encode_tensor,
    serialize_tensor,
)

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    low = 0 if dtype == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=generator).to(dtype)


def frame(header: object, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header)
    return struct.pack(">I", len(packed)) + packed + payload


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 5, 32)])
def test_uncompressed_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample(dtype, shape)
    decoded = decode_tensor(serialize_tensor(tensor))
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_non_contiguous_and_grad_tensors_encode() -> None:
    base = torch.randn(4, 6, requires_grad=True)
    view = base.t()[1:3]
    assert torch.equal(decode_tensor(serialize_tensor(view)), view.detach())


def test_no_copies_on_either_side() -> None:
    tensor = torch.randn(3, 8)
    header, payload = encode_tensor(tensor)
    assert torch.frombuffer(payload, dtype=torch.float32).data_ptr() == tensor.data_ptr()
    buffer = bytearray(b"".join([header, payload]))
    decoded = decode_tensor(buffer)
    buffer[-4:] = struct.pack("<f", 42.0)
    assert decoded[-1, -1].item() == 42.0
    assert decode_tensor(memoryview(buffer)).shape == (3, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float16_compression(dtype: torch.dtype) -> None:
    tensor = sample(dtype, (4, 33))
    tensor[0, 0] = 1e6 if dtype != torch.float16 else 100
    wire = serialize_tensor(tensor, Compression.FLOAT16)
    assert len(wire) < tensor.numel() * 2 + 64
    decoded = decode_tensor(wire)
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.isfinite(decoded).all()
    torch.testing.assert_close(decoded[1:], tensor[1:], rtol=1e-3, atol=1e-3)
    if dtype != torch.float16:
        clamped = torch.tensor(torch.finfo(torch.float16).max).to(dtype)
        assert decoded[0, 0].item() == clamped.item()


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_8bit_compression(dtype: torch.dtype, block: int) -> None:
    tensor = sample(dtype, (3, 50, 32))
    tensor[0, 0] = 0
    parts = encode_tensor(tensor, Compression.BLOCKWISE8, block_size=block)
    blocks = -(-tensor.numel() // block)
    assert [memoryview(p).nbytes for p in parts[1:]] == [4 * blocks, tensor.numel()]
    wire = b"".join(parts)
    decoded = decode_tensor(wire)
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    flat = tensor.float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    bound = (padded.abs().amax(1, keepdim=True) / 254).expand_as(padded).reshape(-1)[: flat.numel()]
    error = (decoded.float().reshape(-1) - flat).abs()
    slack = 1e-6 if dtype == torch.float32 else 2e-2 * flat.abs()
    assert (error <= bound + slack).all()
    assert decoded[0, 0].abs().max() == 0


def test_blockwise_is_about_a_quarter_of_float32() -> None:
    tensor = torch.randn(8, 128, 64)
    ratio = len(serialize_tensor(tensor, Compression.BLOCKWISE8)) / len(serialize_tensor(tensor))
    assert 0.25 < ratio < 0.27


def test_compression_needs_floating_tensors() -> None:
    for compression in (Compression.FLOAT16, Compression.BLOCKWISE8):
        with pytest.raises(ValueError, match="floating"):
            encode_tensor(torch.arange(4), compression)
    with pytest.raises(ValueError, match="float64 has no name"):
        encode_tensor(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        encode_tensor(torch.zeros(4), Compression.BLOCKWISE8, block_size=0)


def good_header(**changes: object) -> dict[str, object]:
    return {"dtype": "float32", "shape": [2, 3], "compression": "none", **changes}


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", MalformedTensor, "shorter than its length prefix"),
        (b"\x00\x00", MalformedTensor, "shorter"),
        (struct.pack(">I", 5000), TensorTooLarge, "max_header_bytes"),
        (struct.pack(">I", 100) + b"\x80", MalformedTensor, "100 bytes"),
        (struct.pack(">I", 1) + b"\xc1", MalformedTensor, "not msgpack"),
        (struct.pack(">I", 2) + b"\x91\xc0" + bytes(24), MalformedTensor, "not a map"),
        (frame([1, 2]), MalformedTensor, "not a map"),
        (frame({1: 2}), MalformedTensor, "not msgpack"),
        (frame(good_header(compression="zip")), MalformedTensor, "unknown compression"),
        (frame(good_header(compression=[1])), MalformedTensor, "unknown compression"),
        (frame(good_header(extra=1), bytes(24)), MalformedTensor, "keys"),
        (frame({"dtype": "float32", "compression": "none"}), MalformedTensor, "keys"),
        (frame(good_header(dtype="float64"), bytes(48)), MalformedTensor, "unknown dtype"),
        (frame(good_header(dtype=7)), MalformedTensor, "unknown dtype"),
        (frame(good_header(dtype="int8", compression="float16")), MalformedTensor, "int8"),
        (frame(good_header(shape=[2, -3])), MalformedTensor, "shape"),
        (frame(good_header(shape=[2, True])), MalformedTensor, "shape"),
        (frame(good_header(shape=[2, 1.5])), MalformedTensor, "shape"),
        (frame(good_header(shape="2x3")), MalformedTensor, "shape"),
        (frame(good_header(shape=[1] * 9)), TensorTooLarge, "max_ndim"),
        (frame(good_header(shape=[2**40, 2**40])), TensorTooLarge, "max_tensor_bytes"),
        (frame(good_header(), bytes(23)), MalformedTensor, "needs 24 payload bytes, got 23"),
        (frame(good_header(), bytes(25)), MalformedTensor, "got 25"),
        (frame(good_header(compression="float16"), bytes(24)), MalformedTensor, "needs 12"),
        (frame(good_header(compression="blockwise8"), bytes(10)), MalformedTensor, "keys"),
        (frame(good_header(compression="blockwise8", block=0)), MalformedTensor, "block size"),
        (frame(good_header(compression="blockwise8", block=5000)), MalformedTensor, "block size"),
        (frame(good_header(compression="blockwise8", block="8")), MalformedTensor, "block size"),
        (frame(good_header(compression="blockwise8", block=4), bytes(6)), MalformedTensor, "14"),
    ],
)
def test_malformed_input_raises_typed_errors(data: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        decode_tensor(data)
    assert isinstance(raised.value, MalformedTensor)


def test_tiny_limits_are_enforced() -> None:
    wire = serialize_tensor(torch.zeros(4, 4))
    limits = WireLimits(max_tensor_bytes=63)
    with pytest.raises(TensorTooLarge, match="max_tensor_bytes=63"):
        decode_tensor(wire, limits)
    assert decode_tensor(wire, WireLimits(max_tensor_bytes=64)).shape == (4, 4)


def test_bool_payloads_are_normalised() -> None:
    decoded = decode_tensor(frame(good_header(dtype="bool", shape=[3]), bytes([0, 1, 7])))
    assert decoded.tolist() == [False, True, True]


def test_every_truncation_of_a_valid_tensor_is_rejected() -> None:
    wire = serialize_tensor(torch.randn(3, 5), Compression.BLOCKWISE8, block_size=4)
    for end in range(len(wire)):
        with pytest.raises(MalformedTensor):
            decode_tensor(wire[:end])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        decode_tensor(data)
    except MalformedTensor:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["float32", "bfloat16", "int64", "bool", "float64", 3]),
            "shape": st.lists(st.integers(-2, 6), max_size=4) | st.integers(-(2**63), 2**64 - 1),
            "compression": st.sampled_from(["none", "float16", "blockwise8", "lz4"]),
        },
        optional={"block": st.integers(-1, 9) | st.text(max_size=2)},
    ),
    st.binary(max_size=300),
)
def test_random_headers_never_escape_as_other_errors(header: dict, payload: bytes) -> None:
    try:
        tensor = decode_tensor(frame(header, payload))
    except MalformedTensor:
        return
    assert list(tensor.shape) == header["shape"]
