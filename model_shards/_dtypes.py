"""Names of the torch dtypes that cross the package boundary (wire headers, manifests, options)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a span or the model ends can compute in."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; ValueError for a dtype with no wire name."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} has no name here; use one of {', '.join(DTYPES)}"
        ) from None


def compute_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """Resolve a requested compute dtype: a name, a torch dtype, or ``None`` for the default.

    The default is float32 on CPU (fast and exact there) and bfloat16 on accelerators.
    """
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in COMPUTE_DTYPES:
        names = ", ".join(DTYPE_NAMES[d] for d in COMPUTE_DTYPES)
        raise ValueError(f"compute dtype {dtype!r} is not supported; use one of {names}")
    return resolved


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` or ``"auto"`` -> the first CUDA device when there is one, else the CPU.

    ValueError for a name torch does not know, or a CUDA device on a machine without one.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N ({e})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device here; use cpu or auto")
    return resolved
