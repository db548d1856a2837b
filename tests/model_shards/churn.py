"""Swarms for failover tests: in-process servers, plus ``swarm join`` processes to kill.

Starting a server process costs an interpreter, torch and transformers (tens of seconds
on a busy machine), so a ``ChurnSwarm`` runs the bootstrap node and the servers that
stay up in this process (``LocalSwarm``) and starts as processes only the servers a
test kills (SIGKILL) or stops (SIGTERM, the graceful path), or that join mid-test.
In-process spares announce a tenth of the processes' throughput, so that routing picks
the process while it lives.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from model_shards._server_node import ServerNode
from swarm._join import add_arguments
from swarm._procs import NodeProcess
from tests.swarm.harness import LocalSwarm, ProcessSwarm

TCP = "/ip4/127.0.0.1/tcp/0"
QUIC = "/ip4/127.0.0.1/udp/0/quic-v1"
START_S = 120.0
"""How long a server process may take to start (interpreter, torch, loading)."""


def join_takes(option: str) -> bool:
    """Whether ``swarm join`` accepts ``option`` (e.g. ``--drain-timeout``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return any(option in action.option_strings for action in parser._actions)


class ChurnSwarm:
    """In-process bootstrap and servers, and server processes; ``close`` ends them all."""

    def __init__(self, model: Path, cache_dir: Path, logs: Path) -> None:
        self.model = model
        self.cache_dir = cache_dir
        self.local = LocalSwarm(cache_dir)
        self.procs = ProcessSwarm(logs)
        self.addr = self.local.addr
        self.peers: dict[NodeProcess, str] = {}
        self._count = 0

    def serve(self, start: int, end: int) -> ServerNode:
        """An in-process server of blocks ``[start, end)`` (never moves)."""
        return self.local.serve(self.model, start, end, rebalance=False)

    def join(self, start: int, end: int, *, drain_s: float | None = None) -> NodeProcess:
        """Start ``swarm join`` of blocks ``[start, end)`` (``online`` waits for it)."""
        self._count += 1
        args = ["join", "--model", str(self.model), "--blocks", f"{start}:{end}"]
        args += ["--listen", TCP, "--listen", QUIC, "--bootstrap", self.addr]
        args += ["--threads", "1", "--cache-dir", str(self.cache_dir)]
        if drain_s is not None and join_takes("--drain-timeout"):
            args += ["--drain-timeout", str(drain_s)]
        return self.procs.start(f"server{self._count}-{start}-{end}", args)

    def online(self, *nodes: NodeProcess) -> None:
        """Wait until every one of ``nodes`` serves (and learn its PeerID)."""
        for node in nodes:
            if node not in self.peers:
                self.peers[node] = node.addr(START_S).rsplit("/p2p/", 1)[1]
        for node in nodes:
            node.wait_for("online", START_S)

    def node_of(self, peer: str) -> NodeProcess:
        """The process of the server with PeerID ``peer``."""
        (node,) = (n for n, p in self.peers.items() if p == peer)
        return node

    @staticmethod
    def terminate(node: NodeProcess) -> None:
        """SIGTERM: the server announces offline, drains, then ends its sessions."""
        node.popen.send_signal(signal.SIGTERM)

    def close(self) -> None:
        try:
            self.procs.close(graceful=False)
        finally:
            self.local.close()
