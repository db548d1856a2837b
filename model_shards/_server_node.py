"""A shard server's life: pick a span, announce it, load it, serve it, leave gracefully.

``ServerNode.start(host, dht, config)`` runs, in order: open the checkpoint and its
manifest (the model's name in the swarm), measure (or read the cached) throughput, choose
the span (``config.blocks``, or ``scheduler.choose_span`` over what the DHT announces),
announce *joining*, load the span checking every block against the manifest, serve it and
announce *online*; the records are then refreshed until ``stop()``, which announces
*offline* first, then drains the open sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dht import DHT, DHTError
from p2p import Host
from scheduler import ServerState, choose_span

from ._announce import Announcer, ModelRecord, ServerRecord, read_servers, snapshot_of
from ._checkpoint import Checkpoint
from ._dtypes import compute_dtype, dtype_name, resolve_device
from ._manifest import Manifest, load_manifest
from ._progress import Progress
from ._quant import resolve_quantization
from ._server import ShardServer
from ._server_limits import ServerLimits
from ._server_throughput import throughput_for
from ._span import load_span

_log = logging.getLogger("model_shards.node")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What a shard server serves and how."""

    model: str | os.PathLike[str]
    """Checkpoint directory, or a Hub name already in the local Hugging Face cache."""
    blocks: tuple[int, int] | None = None
    """The span ``(start, end)``; None picks one with ``scheduler.choose_span``."""
    num_blocks: int | None = None
    """With automatic placement: how many blocks to take (None: the whole model)."""
    quantization: str | None = None
    """``none``, ``int8``, ``nf4``; None: nf4 on CUDA, none on CPU."""
    dtype: str | None = None
    device: str | None = None
    torch_threads: int | None = None
    hf_cache_dir: Path | None = None
    swarm_cache_dir: Path | None = None
    """Where measured throughputs are cached (default ``~/.cache/swarm``)."""
    limits: ServerLimits = field(default_factory=ServerLimits)


class ServerNode:
    """A running shard server and its announcements; built by ``ServerNode.start``."""

    def __init__(self, server: ShardServer, announcer: Announcer) -> None:
        self.server = server
        self.announcer = announcer
        self._refresh: asyncio.Task[Any] | None = None
        self._stopped = False

    @property
    def span(self) -> tuple[int, int]:
        return self.server.span.start, self.server.span.end

    @classmethod
    async def start(
        cls,
        host: Host,
        dht: DHT,
        config: ServerConfig,
        *,
        progress: Callable[[str], Progress] | None = None,
        on_joining: Callable[[ServerRecord], None] | None = None,
    ) -> ServerNode:
        """Load, serve and announce a span; ``progress(what)`` makes a progress callback."""
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        checkpoint = await asyncio.to_thread(
            Checkpoint.open, config.model, cache_dir=config.hf_cache_dir
        )
        manifest = await asyncio.to_thread(
            load_manifest,
            checkpoint,
            progress=None if progress is None else progress("hashing the checkpoint"),
        )
        device = resolve_device(config.device)
        dtype = compute_dtype(config.dtype, device)
        quantization = resolve_quantization(config.quantization, device)
        throughput = await asyncio.to_thread(
            throughput_for,
            checkpoint,
            manifest.model_id,
            dtype=dtype,
            device=device,
            quantization=quantization,
            cache_dir=config.swarm_cache_dir,
        )
        if config.blocks is not None:
            start, end = config.blocks
            if not 0 <= start < end <= manifest.num_blocks:
                raise ValueError(
                    f"blocks {start}:{end} are not inside the model's {manifest.num_blocks} blocks"
                )
        else:
            start, end = await _auto_span(dht, manifest, config, throughput)
        model = ModelRecord(
            model_id=manifest.model_id,
            short_name=manifest.short_name,
            model_type=manifest.model_type,
            num_blocks=manifest.num_blocks,
        )
        node: ServerNode | None = None

        def describe(state: ServerState) -> ServerRecord:
            if node is not None:
                return node.server.describe(state)
            return ServerRecord(
                peer_id=host.peer_id,
                state=state,
                start=start,
                end=end,
                throughput=throughput,
                cache_tokens_left=0,
                quantization=str(quantization),
                dtype=dtype_name(dtype),
                addrs=tuple(host.addrs),
            )

        announcer = Announcer(dht, model, describe, config.limits)
        joining = await announcer.announce(ServerState.JOINING)
        if on_joining is not None:
            on_joining(joining)
        try:
            _log.info("loading blocks [%d, %d) of %s", start, end, manifest.display_name)
            span = await asyncio.to_thread(
                load_span,
                checkpoint,
                start,
                end,
                dtype=dtype,
                quantization=quantization,
                device=device,
                manifest=manifest,
                limits=config.limits.request,
                progress=None if progress is None else progress(f"loading blocks {start}:{end}"),
            )
            server = ShardServer(
                host,
                span,
                manifest,
                throughput=throughput,
                limits=config.limits,
                torch_threads=config.torch_threads,
            )
            server.start()
            node = cls(server, announcer)
            await announcer.announce(ServerState.ONLINE)
        except BaseException:
            # the blocks were announced as being loaded: take the announcement back
            await asyncio.shield(_withdraw(announcer))
            raise
        node._refresh = asyncio.get_running_loop().create_task(announcer.run())
        return node

    async def stop(self) -> None:
        """Announce offline, drain the open sessions, stop serving (the Host keeps running)."""
        if self._stopped:
            return
        self._stopped = True
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        await _withdraw(self.announcer)
        await self.server.stop()


async def _withdraw(announcer: Announcer) -> None:
    try:
        await announcer.announce(ServerState.OFFLINE)
    except DHTError as e:
        _log.warning("could not announce going offline: %s", e)


async def _auto_span(
    dht: DHT, manifest: Manifest, config: ServerConfig, throughput: float
) -> tuple[int, int]:
    """The span ``scheduler.choose_span`` picks given what the swarm announces now."""
    num_blocks = manifest.num_blocks
    try:
        servers = await read_servers(dht, manifest.model_id, num_blocks)
    except DHTError as e:
        _log.warning("could not read the swarm's servers, placing as if alone: %s", e)
        servers = {}
    snapshot = snapshot_of(num_blocks, servers.values(), keep=lambda s: s.peer_id != dht.peer_id)
    length = config.num_blocks or num_blocks
    start, end = choose_span(snapshot, length, throughput)
    _log.info(
        "automatic placement: blocks [%d, %d) of %d (%d server(s) announced)",
        start,
        end,
        num_blocks,
        len(snapshot),
    )
    return start, end
