"""A server's compute throughput: measured once per model, device, dtype and quantization.

Throughput is in block-tokens per second (``scheduler`` units): tokens per second through
one block during generation, i.e. one-token inference steps on a cache. It is measured on
the model's first block, loaded alone, before the server picks or loads its span, and
cached in a JSON file (``~/.cache/swarm/throughput.json`` by default) so that a restart
does not measure again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from ._cache import CachePool
from ._checkpoint import Checkpoint
from ._dtypes import dtype_name
from ._quant import Quantization
from ._span import load_span

_log = logging.getLogger("model_shards.throughput")

CACHE_FILE = "throughput.json"


def default_cache_dir() -> Path:
    """``$SWARM_CACHE_DIR``, else ``~/.cache/swarm``."""
    return Path(os.environ.get("SWARM_CACHE_DIR", Path.home() / ".cache" / "swarm"))


def device_name(device: torch.device) -> str:
    """What distinguishes one compute device from another for throughput purposes."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{torch.get_num_threads()}threads"


def measure_throughput(
    checkpoint: Checkpoint,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization: Quantization,
    steps: int = 24,
    warmup: int = 4,
) -> float:
    """Block-tokens per second of one-token inference steps through the model's first block."""
    span = load_span(checkpoint, 0, 1, dtype=dtype, device=device, quantization=quantization)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 1, span.hidden_size, generator=generator).to(device, dtype)
    with span.open_session(CachePool(), batch_size=1, max_length=warmup + steps) as session:
        for _ in range(warmup):
            session.step(hidden)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            session.step(hidden)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
    return steps / max(elapsed, 1e-9)


def throughput_for(
    checkpoint: Checkpoint,
    model_id: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantization: Quantization,
    cache_dir: Path | None = None,
) -> float:
    """The cached throughput for this model on this device, measured first if absent."""
    path = (cache_dir or default_cache_dir()) / CACHE_FILE
    key = "|".join([model_id, device_name(device), dtype_name(dtype), str(quantization)])
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    value = cached.get(key)
    if isinstance(value, int | float) and value > 0:
        _log.info("throughput %.0f block-tokens/s (cached in %s)", value, path)
        return float(value)
    _log.info("measuring throughput on %s", device_name(device))
    value = measure_throughput(checkpoint, dtype=dtype, device=device, quantization=quantization)
    _log.info("throughput %.0f block-tokens/s, cached in %s", value, path)
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cached, indent=1, sort_keys=True))
        temporary.replace(path)
    except OSError as e:
        _log.warning("throughput not cached at %s: %s", path, e)
    return value
