"""Swarms for tests: in-process (servers on a background event loop) or as real processes.

``LocalSwarm`` runs a bootstrap DHT node and shard servers on loopback TCP in this process,
on one event loop in a background thread, so a synchronous test can drive
``DistributedModelForCausalLM`` against them. ``ProcessSwarm`` starts ``python -m swarm``
processes and always stops (or kills) them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dht import DHT, DHTError
from model_shards._server_node import ServerConfig, ServerNode
from p2p import Host
from scheduler import ServerState
from security import KeyPair
from swarm._peer import start_peer, stop_peer
from swarm._procs import NodeProcess, stop_all
from tests.model_shards.tiny import TinyModel

T = TypeVar("T")

TCP_LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def private_copy(tm: TinyModel, directory: Path) -> TinyModel:
    """``tm`` with its checkpoint copied under ``directory``: servers and clients write the
    manifest cache beside a checkpoint, which must not leak into other tests' models."""
    path = directory / tm.path.name
    if not path.exists():
        shutil.copytree(tm.path, path)
    return dataclasses.replace(tm, path=path)


class LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class LocalSwarm:
    """A bootstrap node and shard servers in this process (loopback TCP)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.thread = LoopThread()
        self.peers: list[tuple[Host, DHT]] = []
        self.nodes: list[ServerNode] = []
        host, dht = self.thread.run(
            start_peer(KeyPair.generate(), [TCP_LOOPBACK], [], server_mode=True)
        )
        self.peers.append((host, dht))
        self.addr = str(host.addrs[0])

    def serve(self, model: Path, start: int, end: int, **config: Any) -> ServerNode:
        """A server of blocks ``[start, end)`` of ``model``, online when this returns."""

        async def launch() -> ServerNode:
            host, dht = await start_peer(
                KeyPair.generate(), [TCP_LOOPBACK], [self.addr], server_mode=True
            )
            self.peers.append((host, dht))
            return await ServerNode.start(
                host,
                dht,
                ServerConfig(
                    model=model, blocks=(start, end), swarm_cache_dir=self.cache_dir, **config
                ),
            )

        node = self.thread.run(launch())
        self.nodes.append(node)
        return node

    def stop(self, node: ServerNode) -> None:
        """Stop one server gracefully (it announces offline)."""
        self.thread.run(node.stop())

    def announce_throughput(self, node: ServerNode, throughput: float) -> None:
        """Make ``node`` claim ``throughput`` (block-tokens/s), announced now (again if the
        node's own announcement raced this one and made it stale)."""

        async def announce() -> None:
            node.server.throughput = throughput
            for attempt in range(5):
                try:
                    await node.announcer.announce(ServerState.ONLINE)
                    return
                except DHTError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.1)

        self.thread.run(announce())

    def close(self) -> None:
        async def shutdown() -> None:
            for node in self.nodes:
                await node.stop()
            for host, dht in reversed(self.peers):
                await stop_peer(host, dht)

        try:
            self.thread.run(shutdown())
        finally:
            self.thread.close()


class ProcessSwarm:
    """``python -m swarm`` processes on loopback; ``close()`` stops (or kills) every one."""

    def __init__(self, logs: Path, *, env: dict[str, str] | None = None) -> None:
        self.logs = logs
        self.env = env
        self.nodes: list[NodeProcess] = []

    def start(self, name: str, args: Sequence[str]) -> NodeProcess:
        node = NodeProcess(args, log_path=self.logs / f"{name}.log", env=self.env)
        self.nodes.append(node)
        return node

    def close(self, *, graceful: bool = True) -> None:
        """Stop every node (SIGINT, then SIGKILL after a while), or kill them at once."""
        if graceful:
            stop_all(self.nodes, timeout=20)
        for node in self.nodes:
            node.kill()
